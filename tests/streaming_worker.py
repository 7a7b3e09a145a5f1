"""One stage-2 run on a parquet stream, launched twice by tests/test_streaming.py under `accelerate launch`.

Each process records the rows (``ROW_INDEX``, the key hashes) its training DataLoader yields in epochs 0 and 1,
then trains ``STEPS`` steps, and writes both to ``rank<N>.json`` in the output folder.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import datasets
import torch
from datasets import load_dataset, load_from_disk

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import ROW_INDEX, join_stream_embeddings
from llm2clip_hf.testing import tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

from launching import end_worker_process

BATCH, STEPS = 4, 3


def run(llm_dir: str, shards_dir: str, cache_dir: str, output_dir: str) -> None:
    # datasets sleeps this long whenever it closes parquet readers, so that Arrow's I/O threads end first
    # (apache/arrow#45214); 0.1 s per close keeps this run short, and the worker leaves without the exit-time
    # teardown that a live Arrow thread can abort (tests/launching.py: end_worker_process).
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.1
    text_model = LLM2CLIPTextModel.from_llm(llm_dir)
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
    stream = load_dataset("parquet", data_files=f"{shards_dir}/*.parquet", split="train", streaming=True)
    stream = join_stream_embeddings(stream, load_from_disk(cache_dir), key_column="key")
    args = LLM2CLIPTrainingArguments(
        output_dir=output_dir, stage="clip", per_device_train_batch_size=BATCH, max_steps=STEPS, logging_steps=1,
        save_strategy="no", use_cpu=True, disable_tqdm=True, report_to="none", seed=0, dataloader_num_workers=2,
    )
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=stream, text_model=text_model)
    if trainer.args.world_size != 2:
        raise RuntimeError(f"expected 2 processes, the Trainer sees {trainer.args.world_size}")
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([int(row) for batch in loader for row in batch[ROW_INDEX]])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(output_dir, f"rank{trainer.args.process_index}.json").write_text(json.dumps({
        "epochs": epochs, "losses": losses, "finite": all(math.isfinite(loss) for loss in losses)}))


if __name__ == "__main__":
    run(*sys.argv[1:5])
    end_worker_process()
