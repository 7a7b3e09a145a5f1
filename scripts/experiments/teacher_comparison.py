#!/usr/bin/env python
"""Raw vs stage-1 teacher, side by side: each teacher's cached caption embeddings train the demo's stage 2 (a new
small EVA02, same seeds: same tower init, batches and crops) on an image-caption set, with and without adapter input
centering, and every run is evaluated on the held-out images. Writes OUT/results.json (per teacher: its teacher
report (statistics, CRA raw and centered between the two train captions), the adapter input ``auto`` gives it, and
per adapter input and seed the retrieval metrics, with whether the run collapsed).

Data: ``emoji`` (the demo's set: English, dense and CLDR-translated captions, zero-shot by category) or an
imagefolder with short_caption / long_caption / split columns (scripts/build_icon_dataset.py).

    python scripts/experiments/teacher_comparison.py --data emoji --teachers raw=raw stage1=runs/wordnet/final \\
        --normalization none center --out comparison/emoji
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import load_dataset

from llm2clip_hf import LLM2CLIPModel, load_text_model
from llm2clip_hf.data import cached_embedding_sample, precompute_text_embeddings
from llm2clip_hf.demo.recipe import (DENSE, LANGUAGES, LONG, SHORT, DemoArguments, _train_clip, clip_metrics,
                                    emoji_splits)
from llm2clip_hf.evaluation import evaluate_retrieval
from llm2clip_hf.evaluation.teacher_quality import auto_adapter_input_normalization, caption_pair_teacher_check
from llm2clip_hf.trainers.training_health import EmbeddingCollapseError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--teachers", nargs="+", required=True, help="NAME=PATH; PATH 'raw' is SmolLM2-135M.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--normalization", nargs="+", default=["none", "center"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "emoji":
        train, test = emoji_splits(False)
        test_columns = [SHORT, LONG, DENSE, *LANGUAGES]
    else:
        rows = load_dataset("imagefolder", data_dir=args.data, split="train")
        train, test = rows.filter(lambda r: r["split"] == "train"), rows.filter(lambda r: r["split"] == "test")
        test_columns = [SHORT, LONG]
    results = {}
    for spec in args.teachers:
        name, path = spec.split("=", 1)
        teacher = load_text_model(None if path == "raw" else path, **({"max_length": 192} if path == "raw" else {}))
        teacher.config.max_seq_length = 192  # one token budget for both teachers (dense emoji captions: ~150)
        started = time.time()
        cached_train = precompute_text_embeddings(train, teacher, [SHORT, LONG], out / "cache" / name / "train")
        cached_test = precompute_text_embeddings(test, teacher, test_columns, out / "cache" / name / "test")
        sample = cached_embedding_sample(cached_train, [SHORT, LONG])  # short and long caption of each image
        statistics, report = caption_pair_teacher_check(*sample.pairs, sample.precision, sample.computed_precision)
        auto = auto_adapter_input_normalization(statistics) or "none"  # what the CLI's default gives this teacher
        results[name] = {"auto": auto, "teacher": report,
                         "cache_minutes": round((time.time() - started) / 60, 2)}
        for normalization in args.normalization:
            normalization = auto if normalization == "auto" else normalization
            runs = []
            for seed in args.seeds:
                settings = DemoArguments(output_dir=str(out), stage2_steps=args.steps, stage2_learning_rate=args.lr,
                                         adapter_input_normalization=normalization)
                try:
                    model, collapsed = _train_clip(settings, teacher, cached_train, seed,
                                                   out / f"s2_{name}_{normalization}_{seed}").model, False
                except EmbeddingCollapseError as error:  # what the user keeps: the last weights before the collapse
                    model, collapsed = LLM2CLIPModel.from_pretrained(error.last_good_model), True
                if args.data == "emoji":
                    metrics = clip_metrics(model, cached_test, teacher, test, sorted(set(test["category"])))
                else:
                    english = evaluate_retrieval(model, cached_test, "image", [SHORT, LONG])
                    long = evaluate_retrieval(model, cached_test, "image", [LONG])
                    metrics = {**english, **{f"long_{key}": value for key, value in long.items()}}
                metrics["collapsed"] = collapsed
                runs.append(metrics)
                print(name, normalization, seed, {k: round(v, 2) for k, v in metrics.items() if "R@5" in k}, flush=True)
            results[name][normalization] = runs
        del teacher
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    collapsed = [f"{name}/{normalization}/seed {seed}" for name, result in results.items()
                 for normalization, runs in result.items() if isinstance(runs, list)
                 for seed, run in zip(args.seeds, runs) if run["collapsed"]]
    if collapsed:  # measured and recorded (last good weights), but the comparison does not end as a success
        raise SystemExit(f"stage 2 collapsed in {collapsed}; their rows hold the last good weights' metrics.")


if __name__ == "__main__":
    main()
