"""Loading a text encoder by name or folder (`load_text_model`, what every CLI command's --text-model goes through)."""

import pytest

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.conversion.model_loading import load_text_model
from llm2clip_hf.modeling import TEXT_TEMPLATES


@pytest.fixture(scope="module")
def saved_encoder(tiny_llm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder")
    LLM2CLIPTextModel.from_llm(tiny_llm_dir, text_template="mistral-instruct", pooling_mode="mean").save_pretrained(
        folder)
    return folder


@pytest.mark.parametrize("template", ["mistral-instruct", TEXT_TEMPLATES["mistral-instruct"]])
def test_a_saved_encoder_takes_its_own_settings_by_preset_name_or_template(saved_encoder, template):
    """One recipe line can pass the same --text-template to the raw LLM and to the stage-1 encoder trained with it."""
    encoder = load_text_model(str(saved_encoder), text_template=template, pooling_mode="mean")
    assert encoder.config.text_template == TEXT_TEMPLATES["mistral-instruct"]


@pytest.mark.parametrize("option, value", [("text_template", "qwen2-instruct"), ("pooling_mode", "eos"),
                                           ("max_length", 7)])
def test_a_saved_encoder_refuses_settings_that_would_change_its_embeddings(saved_encoder, option, value):
    with pytest.raises(ValueError, match=f"{option if option != 'max_length' else 'max_seq_length'}=.*saved"):
        load_text_model(str(saved_encoder), **{option: value})
