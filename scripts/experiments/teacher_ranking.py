#!/usr/bin/env python
"""Does the teacher check rank teachers as stage 2 does? For each teacher of one or more teacher_comparison.py outputs
on the same data: the check's statistics and CRA (raw and centered) on the teacher's cached stage-2 training captions,
and its stage-2 CLIPs' mean R@5 (both directions, English, with the adapter input ``auto`` gives the teacher: "none",
or "center" for a dominated one; mean over seeds); then the Spearman
rank correlation between each statistic and that retrieval.

    python scripts/experiments/teacher_ranking.py comparison/emoji comparison/emoji_more
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from datasets import load_from_disk
from scipy.stats import spearmanr  # scipy comes with the test extra (sentence-transformers)

from llm2clip_hf.data import cached_embedding_sample
from llm2clip_hf.evaluation.teacher_quality import caption_pair_teacher_check

SHORT, LONG = "short_caption", "long_caption"
PREDICTORS = ("mean_cosine", "effective_rank", "centered_effective_rank", "residual_share", "cra", "centered_cra")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="Folders written by teacher_comparison.py on the same data.")
    args = parser.parse_args()
    rows = {}
    for output in map(Path, args.outputs):
        results = json.loads((output / "results.json").read_text())
        for name, result in results.items():
            runs = result.get(result.get("auto", "none"))  # the adapter input the CLI's default gives this teacher
            if not runs:
                continue
            sample = cached_embedding_sample(load_from_disk(str(output / "cache" / name / "train")), [SHORT, LONG])
            report = caption_pair_teacher_check(*sample.pairs, sample.precision, sample.computed_precision)[1]
            retrieval = [(run["image_to_text_R@5"] + run["text_to_image_R@5"]) / 2 for run in runs]
            rows[name] = {**{key: report[key] for key in PREDICTORS}, "verdict": report["verdict"],
                          "adapter": result.get("auto", "none"),
                          "r5": statistics.fmean(retrieval), "r5_std": statistics.stdev(retrieval)}
    names = sorted(rows, key=lambda n: rows[n]["r5"])
    print("teacher | " + " | ".join(PREDICTORS) + " | verdict | adapter | stage-2 mean R@5")
    for name in names:
        row = rows[name]
        print(f"{name} | " + " | ".join(f"{row[key]:.3f}" for key in PREDICTORS)
              + f" | {row['verdict']} | {row['adapter']} | {row['r5']:.1f} ± {row['r5_std']:.1f}")
    retrieval = [rows[n]["r5"] for n in names]
    print("Spearman vs stage-2 R@5: " + ", ".join(
        f"{key} {spearmanr([rows[n][key] for n in names], retrieval).statistic:+.2f}" for key in PREDICTORS))


if __name__ == "__main__":
    main()
