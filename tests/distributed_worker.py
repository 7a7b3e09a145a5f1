"""One LLM2CLIPTrainer run, launched by tests/test_distributed.py under `accelerate launch` (or called in-process).

It trains ``STEPS`` SGD steps with a global batch of 8 on a 24-row dataset, shuffled (one epoch: every step sees
other rows, and each process takes its share of each global batch) and, on the main process, saves the loss and the
gradients of every step plus the final weights. Stage "clip" trains with ``loss_type`` "clip" (InfoNCE) or "siglip"
(sigmoid loss; the model then has SigLIP's logit_bias, initialised as SigLIP does).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import TrainerCallback

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.data import precompute_text_embeddings

from launching import end_worker_process

GLOBAL_BATCH, STEPS, ROWS = 8, 3, 24


class RecordGradients(TrainerCallback):
    """Keeps a copy of every trainable parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                self.gradients[f"step{state.global_step + 1}/{name}"] = parameter.grad.detach().clone()


def model_and_data(stage: str, llm_dir: str, loss_type: str = "clip") -> tuple[torch.nn.Module, Dataset]:
    """The tiny LLM's encoder and ``ROWS`` caption pairs (stage "caption"), or a new tiny CLIP and ``ROWS`` image rows
    with the LLM's cached embeddings (stage "clip"); seeded, so every process and run builds the same."""
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(llm_dir)
    if stage == "caption":
        model, data = text_model, Dataset.from_list(tiny_caption_pair_rows()[:ROWS])
    else:
        images = Dataset.from_list(tiny_image_caption_rows()[:ROWS])
        data = precompute_text_embeddings(images, text_model, ["short_caption", "long_caption"],
                                          show_progress_bar=False)
        torch.manual_seed(0)
        siglip = {} if loss_type == "clip" else dict(logit_bias_init_value=-10.0,
                                                      logit_scale_init_value=math.log(10.0))
        model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                              projection_dim=32, **siglip)
    return model, data


def run(stage: str, llm_dir: str, output_dir: str, world_size: int, gradcache_chunk_size: int | None = None,
        loss_type: str = "clip") -> None:
    model, data = model_and_data(stage, llm_dir, loss_type)
    args = LLM2CLIPTrainingArguments(
        output_dir=output_dir, stage=stage, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS, optim="sgd", learning_rate=0.5, warmup_steps=0, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, lora_dropout=0.0, logging_steps=1, save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_drop_last=True, gradcache_chunk_size=gradcache_chunk_size,
        loss_type=loss_type,
    )
    recorder = RecordGradients()
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    if trainer.args.world_size != world_size:
        raise RuntimeError(f"expected {world_size} processes, the Trainer sees {trainer.args.world_size}")
    trainer.train()
    if trainer.is_world_process_zero():
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = {f"final/{k}": v.detach().clone().contiguous()
                   for k, v in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if v.requires_grad}
        save_file({**recorder.gradients, **weights}, str(out / "tensors.safetensors"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    stage_arg, llm_dir_arg, output_arg, world_size_arg = sys.argv[1:5]
    chunk_arg = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "none" else None
    loss_type_arg = sys.argv[6] if len(sys.argv) > 6 else "clip"
    run(stage_arg, llm_dir_arg, output_arg, int(world_size_arg), chunk_arg, loss_type_arg)
    end_worker_process()
