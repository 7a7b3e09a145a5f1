"""The embedding cache is tied to the data and to what the text encoder computes (review defects 1 and 2)."""

import copy

import pytest
import torch
from datasets import Dataset, load_from_disk

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.data import precompute_text_embeddings, read_cache_metadata, text_model_fingerprint
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

CAPTIONS = ["short_caption", "long_caption"]


def pairs(count):
    return Dataset.from_list(tiny_caption_pair_rows()[:count])


def test_a_cache_folder_is_never_reused_for_other_data(text_model, tmp_path):
    folder = tmp_path / "cache"
    first = precompute_text_embeddings(pairs(10), text_model, CAPTIONS, output_dir=folder)
    assert len(first) == 10 and read_cache_metadata(first)["num_rows"] == 10
    with pytest.raises(ValueError, match=r"other data \(10 rows.*\(20 rows.*another folder.*delete"):
        precompute_text_embeddings(pairs(20), text_model, CAPTIONS, output_dir=folder)
    edited = pairs(10).map(lambda row, i: {"short_caption": row["short_caption"] + (" here" if i == 3 else "")},
                           with_indices=True)
    with pytest.raises(ValueError, match="other data"):  # same row count, one caption changed
        precompute_text_embeddings(edited, text_model, CAPTIONS, output_dir=folder)
    assert len(load_from_disk(str(folder))) == 10  # nothing was overwritten
    # The same captions in a new Dataset object (another in-memory fingerprint) reuse the cache.
    again = precompute_text_embeddings(pairs(10), text_model, CAPTIONS, output_dir=folder)
    assert again["short_caption_llm_embedding"] == first["short_caption_llm_embedding"]


def test_stage1_encoder_in_memory_and_saved_have_one_fingerprint(tiny_llm_dir, tmp_path):
    """After stage 1 the user's model holds LoRA layers; its fingerprint is that of the merged, saved encoder."""
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    untrained = text_model_fingerprint(text_model)
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "out"), stage="caption", max_steps=2,
                                     per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=0, use_cpu=True,
                                     save_strategy="no", disable_tqdm=True, report_to="none")
    trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=pairs(16))
    trainer.train()
    trainer.save_model(str(tmp_path / "encoder"))
    assert any("lora_A" in key for key in text_model.state_dict())  # the in-memory model carries the adapter
    in_memory = text_model_fingerprint(text_model)
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path / "encoder")
    assert in_memory == text_model_fingerprint(reloaded)
    assert in_memory != untrained  # training changed what it computes


@pytest.mark.parametrize("change", [
    lambda config: config.rope_parameters.update(rope_theta=config.rope_parameters["rope_theta"] * 2),
    lambda config: setattr(config, "rms_norm_eps", config.rms_norm_eps * 10),
    lambda config: setattr(config, "hidden_act", "gelu"),
])
def test_fingerprint_covers_llm_settings_that_change_embeddings(text_model, change):
    other = copy.deepcopy(text_model)
    change(other.config.llm_config)
    assert text_model_fingerprint(other) != text_model_fingerprint(text_model)


def test_fingerprint_ignores_bookkeeping(text_model, tmp_path):
    text_model.save_pretrained(tmp_path / "saved")
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path / "saved")  # other name, architectures, auto_map, dtype
    assert text_model_fingerprint(reloaded) == text_model_fingerprint(text_model)
