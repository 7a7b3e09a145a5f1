"""build_model_card: tower, loss, pooling and batch sizes come from the saved model and the arguments."""

from types import SimpleNamespace

from transformers import CLIPVisionConfig, PretrainedConfig

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.modeling import LLM2CLIPConfig
from llm2clip_hf.testing import tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.model_card import build_model_card


def card(args, model=None, world_size=1):
    return build_model_card(repo="user/tiny", args=args, base_models=["tiny"], datasets=["data"],
                            num_train_examples=10, metrics={}, world_size=world_size, model=model)


def training_args(tmp_path, stage, **settings):
    return LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage=stage, use_cpu=True, report_to="none",
                                     **settings)


def test_clip_tower_with_sigmoid_loss_is_named_as_such(tmp_path):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=vision, projection_dim=16, text_embedding_dim=32,
                                         logit_bias_init_value=-10.0, text_model_name_or_path="org/llm"))
    text = card(training_args(tmp_path, "clip", loss_type="siglip"), model)
    assert "OpenAI-CLIP ViT" in text and "width 32, depth 2, image 32, patch 8" in text
    assert "sigmoid loss" in text and "learnable bias" in text
    assert "EVA02" not in text and "InfoNCE" not in text
    assert "cached LLM `org/llm`" in text and "mean-pooled" not in text


def test_eva02_tower_with_clip_loss_and_embedded_text_pooling(tmp_path, text_model):
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), projection_dim=16)
    text = card(training_args(tmp_path, "clip", text_source="frozen"), model)
    assert "an EVA02 vision tower (width 64, depth 2" in text
    assert "symmetric image-text InfoNCE with a learnable temperature" in text and "sigmoid" not in text
    assert "frozen caption-tuned LLM, computed at every step" in text and "mean-pooled" in text


def test_unknown_tower_is_named_by_its_model_type(tmp_path):
    class OtherVisionConfig(PretrainedConfig):
        model_type = "other_vision"

    model = SimpleNamespace(config=SimpleNamespace(vision_config=OtherVisionConfig(hidden_size=8), text_config=None))
    assert "an other_vision vision tower (width 8)" in card(training_args(tmp_path, "clip"), model)


def test_text_model_pooling_comes_from_its_config(tmp_path, tiny_llm_dir):
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, pooling_mode="weighted_mean")
    text = card(training_args(tmp_path, "caption"), model)
    assert "weighted-mean" in text and "pooling_mode=weighted_mean" in text and "EVA02" not in text


def test_without_a_model_the_card_claims_no_tower_or_pooling(tmp_path):
    assert "pooled" not in card(training_args(tmp_path, "caption"))
    text = card(training_args(tmp_path, "clip"))
    assert "a vision tower and a text adapter" in text and "EVA02" not in text and "pooled" not in text


def test_gradient_accumulation_adds_no_contrastive_candidates(tmp_path):
    args = training_args(tmp_path, "clip", per_device_train_batch_size=8, gradient_accumulation_steps=4)
    text = card(args, world_size=2)
    assert "| contrastive_batch_size | 16 |" in text and "| samples_per_optimizer_step | 64 |" in text
    assert "| gradient_accumulation_steps | 4 |" in text and "global_batch_size" not in text
    chunked = card(training_args(tmp_path, "caption", per_device_train_batch_size=8, gradcache_chunk_size=2),
                   world_size=2)
    assert "| contrastive_batch_size | 16 |" in chunked and "| gradcache_chunk_size | 2 |" in chunked
    assert "chunks of 2 rows" in chunked and "the contrastive batch is unchanged" in chunked
