"""Saving a LoRA-adapted model merges into a copy: the training weights stay bit-identical (review defect 5)."""

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.conversion.lora_merge import merged_state_dict
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.stages import default_lora_config


def bf16_lora_trainer(tiny_llm_dir, tmp_path):
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, dtype=torch.bfloat16)
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "out"), stage="caption", use_cpu=True,
                                     disable_tqdm=True, report_to="none", save_strategy="no")
    model = get_peft_model(text_model, default_lora_config(args))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:8]))
    return trainer, text_model


def test_save_model_leaves_bf16_training_weights_bit_identical(tiny_llm_dir, tmp_path):
    trainer, text_model = bf16_lora_trainer(tiny_llm_dir, tmp_path)
    before = {k: v.clone() for k, v in text_model.state_dict().items()}
    for _ in range(3):
        trainer.save_model(str(tmp_path / "saved"))
    after = text_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.bfloat16 for k, v in after.items() if "base_layer" in k)


def test_merged_weights_follow_the_lora_formula_in_float32(tiny_llm_dir, tmp_path):
    """W' = round_bf16(W + (alpha / r) * B @ A), computed here in float32 from the raw tensors."""
    trainer, text_model = bf16_lora_trainer(tiny_llm_dir, tmp_path)
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    state = text_model.state_dict()
    scaling = trainer.args.lora_alpha / trainer.args.lora_r
    layers = [k[: -len(".base_layer.weight")] for k in state if k.endswith(".base_layer.weight")]
    assert layers
    for layer in layers:
        a, b = state[f"{layer}.lora_A.default.weight"].float(), state[f"{layer}.lora_B.default.weight"].float()
        expected = (state[f"{layer}.base_layer.weight"].float() + scaling * b @ a).to(torch.bfloat16)
        assert torch.equal(saved[f"{layer}.weight"], expected), layer
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    assert merged_state_dict(text_model).keys() == saved.keys()
