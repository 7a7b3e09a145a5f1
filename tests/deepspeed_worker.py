"""One LLM2CLIPTrainer run under DeepSpeed ZeRO, launched by tests/test_deepspeed.py with
``accelerate launch --use_deepspeed`` (or, with ``none`` for the ZeRO stage, without DeepSpeed in-process).

AdamW with a global batch of 8 for ``STEPS`` steps on the rows of tests/distributed_worker.py: stage "caption" (LoRA on the tiny LLM) or stage
"clip" (cached embeddings; ``logit_scale_max`` below the initial ``logit_scale``, so the clamp acts at every step).
The main process writes the losses and (stage "clip") the ``logit_scale`` the optimizer holds (DeepSpeed's float32
master copy); the final save (``saved/``) holds the trained weights, consolidated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

from distributed_worker import model_and_data
from launching import end_worker_process

GLOBAL_BATCH, STEPS, LOGIT_SCALE_MAX = 8, 3, 2.0


def run(zero_stage: str, llm_dir: str, output_dir: str, world_size: int, stage: str = "clip") -> None:
    model, data = model_and_data(stage, llm_dir)
    # No "optimizer": the trainer's (layer-wise lr decay, no weight decay on biases) runs under ZeRO. ZeRO-3
    # partitions every parameter (by default it keeps those under 100k elements whole: all of this tiny model's).
    deepspeed = None if zero_stage == "none" else {
        "zero_optimization": {"stage": int(zero_stage), "stage3_gather_16bit_weights_on_model_save": True,
                              "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto"}
    args = LLM2CLIPTrainingArguments(
        output_dir=output_dir, stage=stage, lora_dropout=0.0, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS, learning_rate=1e-2, warmup_steps=0, lr_scheduler_type="constant", weight_decay=0.1,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, report_to="none",
        seed=0, dataloader_drop_last=True, logit_scale_max=LOGIT_SCALE_MAX, deepspeed=deepspeed)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data)
    if trainer.args.world_size != world_size:
        raise RuntimeError(f"expected {world_size} processes, the Trainer sees {trainer.args.world_size}")
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "saved"))
    master = None
    if stage == "clip":
        logit_scale = trainer.accelerator.unwrap_model(trainer.model).logit_scale
        if trainer.is_deepspeed_enabled:
            from deepspeed.utils import safe_get_full_fp32_param

            master = float(safe_get_full_fp32_param(logit_scale))  # a collective: every process takes part
        else:
            master = float(logit_scale)
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        Path(output_dir, "result.json").write_text(json.dumps({"losses": losses, "master_logit_scale": master}))


if __name__ == "__main__":
    zero_stage_arg, llm_dir_arg, output_arg, world_size_arg, stage_arg = sys.argv[1:6]
    run(zero_stage_arg, llm_dir_arg, output_arg, int(world_size_arg), stage_arg)
    end_worker_process()
