"""The adapter's optional input normalisation: the formula, its fit on the training cache by the trainer, and its
round trip through save_pretrained / remote code."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModel

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.data import embedding_column, embeddings_as_float32, precompute_text_embeddings
from llm2clip_hf.modeling.text_adapter import TextAdapter
from llm2clip_hf.testing import tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

CAPTIONS = ["short_caption", "long_caption"]


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_normalised_adapter_is_the_official_adapter_on_normalised_inputs(mode):
    torch.manual_seed(0)
    adapter = TextAdapter(16, 8, input_normalization=mode)
    mean, std = torch.randn(16), torch.rand(16) + 0.5
    adapter.set_input_statistics(mean, std)
    official = TextAdapter(16, 8)
    official.layers.load_state_dict(adapter.layers.state_dict())
    x = torch.randn(5, 16) * 3 + 7
    expected = official((x - mean) / (std if mode == "standardize" else 1.0))
    torch.testing.assert_close(adapter(x), expected)
    # the official adapter normalises the raw input: a different function
    assert not torch.allclose(official(x), expected, atol=1e-3)
    with pytest.raises(ValueError, match="input_normalization must be"):
        TextAdapter(16, 8, input_normalization="whiten")


@pytest.fixture()
def cached(text_model):
    return precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:12]), text_model, CAPTIONS)


def args(tmp_path, **settings):
    return LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="clip", max_steps=1, use_cpu=True,
                                     save_strategy="no", report_to="none", disable_tqdm=True,
                                     per_device_train_batch_size=4, **settings)


def test_trainer_fits_the_statistics_once_on_the_training_cache_and_they_survive_a_reload(text_model, cached,
                                                                                          tmp_path):
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                          projection_dim=32, adapter_input_normalization="standardize")
    trainer = LLM2CLIPTrainer(model=model, args=args(tmp_path / "one"), train_dataset=cached, text_model=text_model)
    vectors = np.concatenate([embeddings_as_float32(np.asarray(cached[embedding_column(c)])) for c in CAPTIONS])
    assert model.config.adapter_input_statistics_rows == len(vectors) == 24
    torch.testing.assert_close(model.text_adapter.input_mean, torch.from_numpy(vectors.mean(0)), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(model.text_adapter.input_scale, torch.from_numpy(vectors.std(0)), rtol=1e-4,
                               atol=1e-6)
    trainer.train()
    trainer.save_model()
    reloaded = AutoModel.from_pretrained(tmp_path / "one", trust_remote_code=True)
    assert reloaded.config.adapter_input_statistics_rows == 24
    llm = torch.from_numpy(vectors[:5])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_text_features(llm), model.get_text_features(llm))
    # continued training on other data keeps the fitted statistics
    fitted = model.text_adapter.input_mean.clone()
    LLM2CLIPTrainer(model=model, args=args(tmp_path / "two"), train_dataset=cached.select(range(4)),
                    text_model=text_model)
    assert torch.equal(model.text_adapter.input_mean, fitted)


def test_statistics_need_cached_embeddings(text_model, tmp_path):
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=True,
                                          projection_dim=32, adapter_input_normalization="center")
    with pytest.raises(ValueError, match="fits its statistics on the training set's cached embeddings"):
        LLM2CLIPTrainer(model=model, args=args(tmp_path, text_source="frozen"),
                        train_dataset=Dataset.from_list(tiny_image_caption_rows()[:8]))
    assert not model.text_adapter.input_mean.any()  # nothing was fitted
