"""GradCache gives the full-batch gradients, for both stages, and replays dropout exactly."""

import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.grad_cache import grad_cache_backward, grad_cache_loss
from numerics import assert_same_tensor


def gradients_of_one_step(stage, model, data, tmp_path, chunk_size, **extra):
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage=stage, per_device_train_batch_size=len(data), max_steps=1,
        gradcache_chunk_size=chunk_size, lora_dropout=0.0, use_cpu=True, disable_tqdm=True,
        image_augmentation=False, **extra)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_same_gradients(reference, cached):
    assert reference.keys() == cached.keys() and reference
    for name in reference:
        assert_same_tensor(cached[name], reference[name], 1e-4, name)


@pytest.mark.parametrize("chunk_size", [3, 8])
def test_caption_stage_gradcache_equals_full_batch(tiny_llm_dir, tmp_path, chunk_size):
    from llm2clip_hf import LLM2CLIPTextModel

    data = Dataset.from_list(tiny_caption_pair_rows()[:8])
    results = []
    for chunk in (None, chunk_size):
        torch.manual_seed(0)
        model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
        results.append(gradients_of_one_step("caption", model, data, tmp_path / str(chunk), chunk))
    (loss, full), (cached_loss, cached) = results
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    assert_same_gradients(full, cached)


@pytest.mark.parametrize("precision, loss_tolerance, gradient_tolerance", [
    ({}, 1e-5, 1e-4),
    # the Trainer's bf16 autocast (CPU): bf16 keeps 8 bits of mantissa and chunks change the matmuls' rounding
    ({"bf16": True}, 2e-2, 5e-2),
])
def test_clip_stage_gradcache_equals_full_batch(text_model, tmp_path, precision, loss_tolerance, gradient_tolerance):
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:10]), text_model,
                                      ["short_caption", "long_caption"])
    results = []
    for chunk in (None, 4):
        torch.manual_seed(0)
        model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                              projection_dim=32)
        results.append(gradients_of_one_step("clip", model, data, tmp_path / str(chunk), chunk, **precision))
    (loss, full), (cached_loss, cached) = results
    assert cached_loss == pytest.approx(loss, rel=loss_tolerance)
    assert "logit_scale" in cached and full.keys() == cached.keys()
    for name in full:
        assert_same_tensor(cached[name], full[name], gradient_tolerance, name)


def test_recomputation_replays_the_dropout_masks_of_the_first_pass():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(6, 4))
    outputs = []

    def encoder(batch):
        out = layer(batch["x"])
        outputs.append(out.detach().clone())
        return out

    x = torch.randn(10, 6)
    grad_cache_backward({"a": encoder}, {"a": {"x": x}}, lambda e: e["a"].pow(2).sum(), chunk_size=4)
    first, replay = outputs[:3], outputs[3:]
    assert all(torch.equal(a, b) for a, b in zip(first, replay))
    assert not torch.equal(first[0][:2], first[1][:2])  # chunks draw different masks
    assert layer[1].weight.grad.abs().sum() > 0


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        grad_cache_backward({"a": lambda b: b["x"]}, {"a": {"x": torch.ones(2, 2)}}, lambda e: e["a"].sum(), 0)


def test_trainer_gradcache_replays_lora_dropout(tiny_llm_dir, tmp_path):
    """With LoRA dropout on, GradCache's gradients are those of the loss on the embeddings of its first, no-grad
    pass: the recomputation must draw the same dropout masks. Reference: the same chunks embedded with gradients in
    the same RNG order, then one backward of the loss (a recomputation with fresh masks fails this)."""
    from llm2clip_hf import LLM2CLIPTextModel

    torch.manual_seed(0)
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="caption", per_device_train_batch_size=8, max_steps=1, gradcache_chunk_size=3,
        lora_dropout=0.3, use_cpu=True, disable_tqdm=True, report_to="none")
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:8]))
    with torch.no_grad():  # LoRA B starts at zero, which would hide the dropout of the LoRA branch
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1

    torch.manual_seed(7)
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, dict(batch))
    cached = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    torch.manual_seed(7)
    trainer.model.zero_grad()
    trainer.model.train()
    texts = batch["texts"]  # query, positive and negative blocks of 8 rows, chunked across blocks as GradCache does
    rows = len(texts["input_ids"])
    assert rows == 24 and batch["roles"] == ["query", "positive", "negative"]
    chunked = torch.cat([trainer.model(**{k: v[i:i + 3] for k, v in texts.items()}).text_embeds
                         for i in range(0, rows, 3)])
    embeddings = dict(zip(batch["roles"], chunked.chunk(3)))
    reference_loss = trainer.loss(embeddings["query"], embeddings["positive"], embeddings.get("negative"))
    reference_loss.backward()
    reference = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    torch.manual_seed(7)
    trainer.model.zero_grad()
    whole_batch = dict(zip(batch["roles"], trainer.model(**texts).text_embeds.chunk(3)))
    other_masks = trainer.loss(whole_batch["query"], whole_batch["positive"], whole_batch.get("negative"))
    assert abs(other_masks.item() - reference_loss.item()) > 1e-4  # dropout is on: other masks, other loss

    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    assert_same_gradients(reference, cached)


def scaled_gradients(encoder, temperature, x, chunk_size, scaler):
    """Gradients after ``scaler.scale(loss).backward()`` of a contrastive-style loss with its own parameter."""
    def loss_fn(embeddings):
        e = torch.nn.functional.normalize(embeddings["a"].float(), dim=-1)
        return torch.nn.functional.cross_entropy(temperature.exp() * e @ e.flip(0).t(), torch.arange(len(e)))

    encoder.zero_grad()
    temperature.grad = None
    torch.manual_seed(1)  # dropout masks
    with torch.autocast("cpu", dtype=torch.float16):
        if chunk_size is None:
            loss = loss_fn({"a": encoder(x)})
        else:
            loss = grad_cache_loss({"a": lambda b: encoder(b["x"])}, {"a": {"x": x}}, loss_fn, chunk_size,
                                   [temperature])
    scaler.scale(loss).backward()
    return {**{n: p.grad.clone() for n, p in encoder.named_parameters()}, "temperature": temperature.grad.clone()}


def test_gradcache_gradients_follow_the_loss_scale_of_fp16_training():
    """Backpropagated through a GradScaler (scale 2**16), GradCache gives the full batch's scaled gradients, also
    for the loss's own parameter; unscaled, the true ones. (The old GradCache ran its own unscaled backward.)"""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8))
    temperature = torch.nn.Parameter(torch.tensor(1.5))
    x = torch.randn(12, 6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    full = scaled_gradients(encoder, temperature, x, None, scaler)
    cached = scaled_gradients(encoder, temperature, x, 4, scaler)
    assert full["temperature"].abs() > 1.0  # scaled: the unscaled gradient is O(1e-1)
    for name in full:
        assert_same_tensor(cached[name], full[name], 2e-2, name)
    unscaled = scaled_gradients(encoder, temperature, x, 4, torch.amp.GradScaler("cpu", init_scale=1.0))
    for name in full:
        assert_same_tensor(unscaled[name] * 2.0 ** 16, cached[name], 2e-2, name)
