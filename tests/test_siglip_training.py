"""Stage 2 with SigLIP's sigmoid loss (loss_type="siglip"): the trainer's loss, learning the logit_bias, saving it,
the clamp of logit_scale only, the errors, and GradCache's exact gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import SiglipVisionConfig

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.testing import tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments, SigLIPContrastiveLoss
from numerics import assert_same_tensor
from test_grad_cache import gradients_of_one_step

CAPTIONS = ["short_caption", "long_caption"]
SIGLIP_INIT = dict(logit_bias_init_value=-10.0, logit_scale_init_value=math.log(10.0))


@pytest.fixture(scope="module")
def text_model(tiny_llm_dir):
    torch.manual_seed(0)
    return LLM2CLIPTextModel.from_llm(tiny_llm_dir)


@pytest.fixture(scope="module")
def cached(text_model):
    return precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()), text_model, CAPTIONS,
                                      show_progress_bar=False)


def tiny_siglip_tower():
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)


def siglip_model(text_model, tower="eva02", **overrides):
    torch.manual_seed(0)
    vision = tiny_vision_config() if tower == "eva02" else tiny_siglip_tower()
    settings = dict(SIGLIP_INIT, projection_dim=32) if tower == "eva02" else dict(SIGLIP_INIT)
    settings.update(overrides)
    return LLM2CLIPModel.from_text_model(text_model, vision, embed_text_model=False, **settings)


def siglip_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), stage="clip", loss_type="siglip", per_device_train_batch_size=16,
                    max_steps=6, learning_rate=2e-3, logging_steps=1, save_strategy="no", use_cpu=True,
                    disable_tqdm=True, seed=0, layer_decay=0.9, image_augmentation=False, report_to="none",
                    lr_scheduler_type="constant")
    settings.update(overrides)
    return LLM2CLIPTrainingArguments(**settings)


def naive_sigmoid_loss(images, texts, logit_scale, logit_bias):
    """Per pair: -log sigmoid(+logit) on the diagonal, -log sigmoid(-logit) elsewhere; summed, / number of images."""
    logits = logit_scale.exp() * F.normalize(images.double(), dim=-1) @ F.normalize(texts.double(), dim=-1).t()
    logits = (logits + logit_bias.double()).detach()
    total = 0.0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            z = float(logits[i, j]) * (1.0 if i == j else -1.0)
            total += math.log1p(math.exp(-z))
    return total / logits.shape[0]


@pytest.mark.parametrize("tower", ["eva02", "siglip"])
def test_siglip_stage_learns_logit_bias_and_saves_it(text_model, cached, tmp_path, tower):
    model = siglip_model(text_model, tower)
    # lr 1e-3: at 2e-3 the EVA02 tower's image embeddings collapse to 0.2 % of their first spread (the per-side
    # collapse check stops that run; the check on the minimum over both sides hid it)
    trainer = LLM2CLIPTrainer(model=model, args=siglip_args(tmp_path, learning_rate=1e-3), train_dataset=cached,
                              text_model=text_model)
    assert isinstance(trainer.loss, SigLIPContrastiveLoss)
    # the trainer's loss on a batch is the sigmoid loss with the model's logit_scale and logit_bias
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if not k.startswith("__llm2clip")}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        out = model(**inputs, return_loss=True)
    assert loss == pytest.approx(naive_sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale,
                                                    model.logit_bias), rel=1e-5)
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)  # the model's own return_loss agrees

    bias_before = model.logit_bias.item()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    # at init nearly every pair is predicted negative; the positives push the bias up (AdamW: ~lr per step)
    assert model.logit_bias.item() > bias_before + 5e-4
    assert model.logit_scale.item() != pytest.approx(math.log(10.0), abs=1e-6)

    trainer.save_model()
    reloaded = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    assert reloaded.logit_bias is not None
    assert torch.equal(reloaded.logit_bias, model.logit_bias.detach())
    assert torch.equal(reloaded.logit_scale, model.logit_scale.detach())


def test_clamp_acts_on_logit_scale_only(text_model, cached, tmp_path, caplog):
    model = siglip_model(text_model)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above ln(100)
    args = siglip_args(tmp_path, max_steps=1, logit_scale_max=math.log(100.0))  # an explicit bound below it
    with caplog.at_level("WARNING"):
        trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=cached)
    assert "lowers its temperature from 148.41 to 100.00" in caplog.text
    trainer.train()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    assert -10.01 < model.logit_bias.item() < -9.99  # negative: not clamped into [0, logit_scale_max]


@pytest.mark.parametrize("tower", ["eva02", "siglip"])
def test_a_pretrained_temperature_above_the_official_clamp_is_kept(text_model, cached, tmp_path, tower):
    """A pretrained SigLIP's pair (logit_scale ~ln 112, logit_bias ~-16.5) survives post-training at a tiny lr: the
    default bound is the starting value, not ln 100 (which cut the scale to 100 at the first step)."""
    model = siglip_model(text_model, tower, logit_scale_init_value=math.log(112.0), logit_bias_init_value=-16.5)
    trainer = LLM2CLIPTrainer(model=model, args=siglip_args(tmp_path, max_steps=1, learning_rate=1e-12),
                              train_dataset=cached)
    assert trainer.args.logit_scale_max == pytest.approx(math.log(112.0))
    trainer.train()
    assert math.exp(model.logit_scale.item()) == pytest.approx(112.0, abs=1e-4)
    assert model.logit_bias.item() == pytest.approx(-16.5, abs=1e-6)
    # a starting value under ln 100 keeps the official bound
    trainer = LLM2CLIPTrainer(model=siglip_model(text_model, tower), args=siglip_args(tmp_path, max_steps=1),
                              train_dataset=cached)
    assert trainer.args.logit_scale_max == pytest.approx(math.log(100.0))


def test_siglip_needs_a_model_with_logit_bias(text_model, cached, tmp_path):
    plain = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
    with pytest.raises(ValueError, match=r"logit_bias_init_value=-10\.0"):
        LLM2CLIPTrainer(model=plain, args=siglip_args(tmp_path), train_dataset=cached)
    # the CLIP loss on a model with a logit_bias is allowed (the bias then only shifts the model's logits)
    trainer = LLM2CLIPTrainer(model=siglip_model(text_model), args=siglip_args(tmp_path, loss_type="clip"),
                              train_dataset=cached)
    assert not isinstance(trainer.loss, SigLIPContrastiveLoss)


def test_loss_type_is_validated(tmp_path):
    with pytest.raises(ValueError, match="loss_type must be"):
        siglip_args(tmp_path, loss_type="sigmoid")
    with pytest.raises(ValueError, match="stage-'clip' objective"):
        siglip_args(tmp_path, stage="caption")
    assert LLM2CLIPTrainingArguments(str(tmp_path), stage="clip", use_cpu=True).loss_type == "clip"


def test_siglip_gradcache_equals_full_batch(text_model, cached, tmp_path):
    data = cached.select(range(10))
    (loss, full), (cached_loss, chunked) = [
        gradients_of_one_step("clip", siglip_model(text_model, logit_bias_init_value=-2.0), data, tmp_path / str(chunk),
                              chunk, loss_type="siglip")
        for chunk in (None, 4)]
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    assert full.keys() == chunked.keys() and {"logit_scale", "logit_bias"} <= full.keys()
    assert all(full[name].abs().sum() > 0 for name in ("logit_scale", "logit_bias"))
    for name in full:
        assert_same_tensor(chunked[name], full[name], 1e-4, name)
