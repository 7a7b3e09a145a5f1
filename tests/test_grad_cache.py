"""GradCache gives the full-batch gradients, for both stages, and replays dropout exactly."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.grad_cache import grad_cache_backward, grad_cache_loss
from numerics import assert_same_tensor


class RecordGradients(TrainerCallback):
    """The gradients of the first optimizer step, as the optimizer receives them."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradients_of_one_step(stage, model, data, tmp_path, chunk_size, **extra):
    """Loss and gradients of one optimizer step of ``trainer.train()`` on the whole of ``data`` (the model
    prepared by accelerate, so ``bf16=True`` runs in its autocast as real training does)."""
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage=stage, per_device_train_batch_size=len(data), max_steps=1,
        gradcache_chunk_size=chunk_size, lora_dropout=0.0, use_cpu=True, disable_tqdm=True, report_to="none",
        image_augmentation=False, save_strategy="no", logging_steps=1, **extra)
    recorder = RecordGradients()
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, recorder.gradients


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


def clip_stage_gradients(text_model, data, tmp_path, chunk_size, **precision):
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
    return gradients_of_one_step("clip", model, data, tmp_path / f"{chunk_size}-{precision}", chunk_size, **precision)


def test_clip_stage_gradcache_equals_full_batch(text_model, tmp_path):
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:10]), text_model,
                                      ["short_caption", "long_caption"])
    loss, full = clip_stage_gradients(text_model, data, tmp_path, None)
    cached_loss, cached = clip_stage_gradients(text_model, data, tmp_path, 4)
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    assert "logit_scale" in cached and full.keys() == cached.keys()
    assert_same_gradients(full, cached)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def test_clip_stage_gradcache_runs_the_tower_in_bf16_under_bf16_training(text_model, tmp_path):
    """``--bf16 --gradcache-chunk-size``: both GradCache passes run the vision tower's matmuls in bf16, as the
    wrapped forward of plain training does (accelerate's autocast wraps only ``forward``). GradCache's gradients
    are then as close to the bf16 full batch as bf16 itself is to float32 (measured: 2.4 % and 2.9 %; bf16 keeps 8
    bits of mantissa and the chunks round differently), and they are not the float32 ones."""
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:10]), text_model,
                                      ["short_caption", "long_caption"])
    dtypes = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype)
        if isinstance(module, torch.nn.Linear) and module.in_features == tiny_vision_config().hidden_size else None)
    try:
        _, cached = clip_stage_gradients(text_model, data, tmp_path, 4, bf16=True)
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the first pass and the re-embedding pass
    _, full = clip_stage_gradients(text_model, data, tmp_path, None, bf16=True)
    _, float32 = clip_stage_gradients(text_model, data, tmp_path, None)
    bf16_rounding = relative_difference(full, float32)
    assert bf16_rounding > 1e-3  # the full batch did run in bf16
    assert relative_difference(cached, full) < 1.5 * bf16_rounding
    assert relative_difference(cached, float32) > 1e-3


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
