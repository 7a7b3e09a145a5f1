"""Launched by tests/test_reliability.py on 2 processes: stage 1 where only process 1's loss is NaN at step 2.

Each process writes the FloatingPointError it stopped with to ``error-<rank>.txt`` and its trainable weights after
stopping to ``weights-<rank>.safetensors``; checkpoints go to ``<output>/out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import CaptionContrastiveLoss, LLM2CLIPTrainer, LLM2CLIPTrainingArguments

from launching import end_worker_process


class NaNOnProcess1AtStep2(CaptionContrastiveLoss):
    calls = 0

    def forward(self, *args):
        type(self).calls += 1
        loss = super().forward(*args)
        return loss * float("nan") if self.rank == 1 and type(self).calls == 2 else loss


def main(llm_dir: str, output: str) -> None:
    torch.manual_seed(0)
    args = LLM2CLIPTrainingArguments(output_dir=str(Path(output) / "out"), stage="caption", max_steps=4,
                                     use_cpu=True, save_strategy="no", per_device_train_batch_size=2,
                                     disable_tqdm=True, report_to="none", lora_dropout=0.0)
    loss = NaNOnProcess1AtStep2(world_size=args.world_size, rank=args.process_index)
    trainer = LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(llm_dir), args=args,
                              train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:16]), loss=loss)
    try:
        trainer.train()
        message = "no error"
    except FloatingPointError as error:
        message = str(error)
    rank = args.process_index
    (Path(output) / f"error-{rank}.txt").write_text(message)
    weights = {name: p.detach().clone().contiguous() for name, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(weights, str(Path(output) / f"weights-{rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    end_worker_process()
