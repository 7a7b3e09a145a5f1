#!/usr/bin/env python
"""One stage-1 run of the collapse grid (docs/results.md): SmolLM2-135M on a caption-pair DatasetDict (train / test, columns
short_caption / long_caption, e.g. from scripts/build_caption_pairs.py), every trainer default unless given; logs
the loss and gradient norm per step, held-out CRA raw and on centered embeddings, the mean pairwise cosine after
training, minutes and peak RSS to OUT.json, and saves the encoder in OUT/final (a stopped, collapsed run: its
last-good weights, kept by the trainer).

    python scripts/experiments/stage1_run.py --data wordnet/ --steps 40 --out runs/wordnet_centered
    python scripts/experiments/stage1_run.py --data wordnet/ --steps 40 --set loss_centering=false --out runs/plain
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from datasets import load_from_disk

from llm2clip_hf import load_text_model
from llm2clip_hf.evaluation.teacher_quality import caption_pair_teacher_check
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments


def held_out(model, test) -> dict[str, float]:
    """CRA raw and centered, and the spread of the embeddings (mean / std of the pairwise cosines)."""
    model.eval()
    with torch.no_grad():
        short = model.encode(test["short_caption"], batch_size=64, show_progress_bar=False).float()
        long = model.encode(test["long_caption"], batch_size=64, show_progress_bar=False).float()
    report = caption_pair_teacher_check(short, long)[1]
    return {"cra": report["cra"], "cra_centered": report["centered_cra"], "mean_cos": report["mean_cosine"],
            "std_cos": report["std_cosine"]}


def setting(text: str) -> tuple[str, object]:
    name, value = text.split("=", 1)
    return name, json.loads(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=setting, action="append", default=[],
                        help="NAME=JSON_VALUE, an LLM2CLIPTrainingArguments setting (e.g. loss_scale=20).")
    parser.add_argument("--text-model", default=None,
                        help="Base text model (default SmolLM2-135M): an LLM, or a sentence-transformers model.")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = load_from_disk(args.data)
    test = data["test"].select(range(min(args.test_rows, len(data["test"]))))
    model = load_text_model(args.text_model, max_length=args.max_length)
    result = {"args": {**vars(args), "set": dict(args.set)}, "raw": held_out(model, test)}
    settings = {"gradient_checkpointing": True, **dict(args.set)}  # --set may override the checkpointing
    training_args = LLM2CLIPTrainingArguments(
        output_dir=args.out, stage="caption", caption_columns=["short_caption", "long_caption"],
        max_steps=args.steps, per_device_train_batch_size=args.batch, logging_steps=1, save_strategy="no",
        report_to="none", seed=args.seed, dataloader_drop_last=True, **settings)
    started = time.time()
    trainer = LLM2CLIPTrainer(model=model, args=training_args, train_dataset=data["train"])
    try:
        trainer.train()
        # with stop_on_collapse=False the run goes on past a collapse; one still collapsed at its end has failed
        result["status"] = "collapsed (went on: stop_on_collapse=False)" if trainer.health.collapse.reported else "ok"
    except Exception as error:  # a collapse stops the run; its last good weights are what the trainer holds
        result["status"] = f"{type(error).__name__}: {str(error)[:400]}"
    result["minutes"] = round((time.time() - started) / 60, 2)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result["loss"] = [round(entry["loss"], 3) for entry in history]
    result["grad_norm"] = [round(entry.get("grad_norm", float("nan")), 3) for entry in history]
    result["resolved"] = {"learning_rate": trainer.args.learning_rate, "loss_centering": trainer.args.loss_centering,
                          "warmup_steps": trainer.args.get_warmup_steps(args.steps)}
    result["after"] = held_out(trainer.model, test)
    trainer.save_model(args.out + "/final")
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open(args.out + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({k: result[k] for k in ("status", "minutes", "raw", "after")}))
    if result["status"] != "ok":  # recorded for the grid, but a failed run does not end as a success
        raise SystemExit(f"stage 1 failed: {result['status']}")


if __name__ == "__main__":
    main()
