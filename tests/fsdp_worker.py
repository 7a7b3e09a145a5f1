"""One LLM2CLIPTrainer run for tests/test_fsdp.py: under `accelerate launch` (DDP over gloo on a CPU, FSDP on GPUs
with examples/accelerate/fsdp.yaml) or in-process as the 1-process reference.

Stage "clip" trains the tiny EVA02 tower, the adapter, ``logit_scale`` and a LoRA on the embedded LLM
(``text_source="lora"``); stage "caption" trains a LoRA on the LLM. ``STEPS`` SGD steps of a global batch of 8
from 24 shuffled rows (as tests/distributed_worker.py), with ``logit_scale_max`` below the value the first step
reaches (2.443 from 2.659; then 2.412, 2.402 without the clamp), so the clamp changes the trajectory, then
``save_model()``. Every process writes ``run-<rank>.json`` (distributed type, FSDP or not, logit_scale as this
process's optimizer holds it, the retrieval metrics on ``EVAL_ROWS`` training rows right after training); the main process also writes ``losses.json`` and the final model in ``model/``.

``force_fsdp2`` runs FSDP2 where accelerate would not (on a CPU, over gloo; see :class:`ForcedFSDP2Trainer`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from torch.distributed.tensor import DTensor

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

from launching import end_worker_process

GLOBAL_BATCH, STEPS, ROWS, EVAL_ROWS = 8, 3, 24, 12
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 2.3


def build(stage: str, llm_dir: str) -> tuple[torch.nn.Module, Dataset]:
    """The model and the dataset of a run (the same in every process: fixed seeds)."""
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(llm_dir)
    if stage == "caption":
        return text_model, Dataset.from_list(tiny_caption_pair_rows()[:ROWS])
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), projection_dim=32,
                                          logit_scale_init_value=LOGIT_SCALE_INIT)
    return model, Dataset.from_list(tiny_image_caption_rows()[:ROWS])


class ForcedFSDP2Trainer(LLM2CLIPTrainer):
    """Trains and saves under FSDP2 on a CPU. accelerate runs FSDP on GPUs only: without one, AcceleratorState
    becomes MULTI_CPU (DDP over gloo) whatever the launch asked. This sets the state to FSDP with an FSDP2 plugin
    (transformer auto-wrap from ``_no_split_modules``, FULL_STATE_DICT) before training and saving (the Trainer's
    set-up resets it), so accelerate's own FSDP2 wrapping and state-dict gathering run, with torch's fully_shard."""

    def _force_fsdp2(self) -> None:
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True)
        self.is_fsdp_enabled = True

    def train(self, *args, **kwargs):
        self._force_fsdp2()
        return super().train(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        self._force_fsdp2()
        return super().save_model(*args, **kwargs)


def run(stage: str, llm_dir: str, output_dir: str, world_size: int, force_fsdp2: bool = False) -> LLM2CLIPTrainer:
    model, data = build(stage, llm_dir)
    args = LLM2CLIPTrainingArguments(
        output_dir=output_dir, stage=stage, text_source="lora", per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS, optim="sgd", learning_rate=0.5, warmup_steps=0, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, lora_dropout=0.0, logging_steps=1, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0, dataloader_drop_last=True,
        image_augmentation=False, logit_scale_max=LOGIT_SCALE_MAX, report_to="none",
    )
    trainer_class = ForcedFSDP2Trainer if force_fsdp2 else LLM2CLIPTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=data)
    if trainer.args.world_size != world_size:
        raise RuntimeError(f"expected {world_size} processes, the Trainer sees {trainer.args.world_size}")
    trainer.train()
    # Retrieval metrics straight after training (no evaluation forward first): under FSDP2 the root module's own
    # parameters (patch embedding, norms, projection, adapter; the LLM's embeddings) are still sharded here.
    metrics = trainer.retrieval_metrics(trainer.stage.prepare_dataset(data.select(range(EVAL_ROWS)), False))
    trainer.save_model(str(Path(output_dir) / "model"))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"distributed_type": str(trainer.accelerator.distributed_type), "fsdp": trainer.is_fsdp_enabled,
              "metrics": metrics}
    if stage == "clip":
        logit_scale = trainer.accelerator.unwrap_model(trainer.model_wrapped).logit_scale.detach()
        local = logit_scale.to_local() if isinstance(logit_scale, DTensor) else logit_scale
        report["logit_scale"] = local.float().cpu().reshape(-1).tolist()
    (out / f"run-{trainer.args.process_index}.json").write_text(json.dumps(report))
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (out / "losses.json").write_text(json.dumps(losses))
    return trainer


if __name__ == "__main__":
    stage_arg, llm_dir_arg, output_arg, world_size_arg = sys.argv[1:5]
    run(stage_arg, llm_dir_arg, output_arg, int(world_size_arg), force_fsdp2="force-fsdp2" in sys.argv[5:])
    end_worker_process()
