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

from llm2clip_hf.data import cached_embedding_sample
from llm2clip_hf.evaluation import caption_retrieval_metrics, teacher_statistics
from llm2clip_hf.evaluation.teacher_quality import teacher_report

SHORT, LONG = "short_caption", "long_caption"
PREDICTORS = ("mean_cosine", "effective_rank", "centered_effective_rank", "residual_share", "cra", "centered_cra")


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    for rank, index in enumerate(order):
        result[index] = float(rank)
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


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
            sample, precision = cached_embedding_sample(load_from_disk(str(output / "cache" / name / "train")),
                                                        [SHORT, LONG])
            short, long = sample.chunk(2)
            mean = sample.mean(dim=0)
            report = teacher_report(teacher_statistics(sample, precision), caption_retrieval_metrics(short, long),
                                    caption_retrieval_metrics(short - mean, long - mean))
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
        f"{key} {spearman([rows[n][key] for n in names], retrieval):+.2f}" for key in PREDICTORS))


if __name__ == "__main__":
    main()
