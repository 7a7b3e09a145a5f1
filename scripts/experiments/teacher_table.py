#!/usr/bin/env python
"""Markdown tables of one or more teacher_comparison.py outputs: per metric, each teacher's mean ± standard deviation
over the seeds (with the adapter input ``auto`` gave it), and each teacher's paired difference from a reference
teacher, seed by seed (same seed = same tower init, batches and crops), with its mean; then per teacher its
teacher-check figures (mean pairwise cosine, CRA raw / centered between the two training captions) and the minutes
its caches took.

    python scripts/experiments/teacher_table.py comparison/emoji comparison/fontawesome --reference raw
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = {  # key in results.json -> row label; rows whose key no run has are left out
    "image_to_text_R@1": "image -> text R@1", "image_to_text_R@5": "image -> text R@5",
    "text_to_image_R@1": "text -> image R@1", "text_to_image_R@5": "text -> image R@5",
    "long_image_to_text_R@5": "long captions alone, image -> text R@5",
    "long_text_to_image_R@5": "long captions alone, text -> image R@5",
    "cross_lingual_image_to_text_R@5": "fr / de / es / zh names (mean), image -> text R@5",
    "cross_lingual_text_to_image_R@5": "fr / de / es / zh names (mean), text -> image R@5",
    "zero_shot_top1": "zero-shot category top-1",
}


def runs_of(result: dict) -> list[dict]:
    """The seeds' metrics of the adapter input ``auto`` chose for a teacher; refused when that one was not run."""
    runs = result.get(result["auto"])
    if not isinstance(runs, list):
        ran = sorted(key for key, value in result.items() if isinstance(value, list))
        raise SystemExit(f"auto gives this teacher the adapter input {result['auto']!r}, which was not run (runs: "
                         f"{ran}); rerun teacher_comparison.py with --normalization auto.")
    return runs


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def table(results: dict, reference: str) -> str:
    teachers = list(results)
    if reference not in results:
        raise SystemExit(f"--reference {reference!r} is not among the teachers {teachers}.")
    others = [name for name in teachers if name != reference]
    header = ["metric", *teachers, *(f"{name} - {reference}: mean (per seed)" for name in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    runs = {name: runs_of(results[name]) for name in teachers}
    for key, label in METRICS.items():
        if not all(key in run for name in teachers for run in runs[name]):
            continue
        values = {name: [run[key] for run in runs[name]] for name in teachers}
        best = max(teachers, key=lambda name: statistics.mean(values[name]))
        cells = [f"**{spread(values[name])}**" if name == best else spread(values[name]) for name in teachers]
        for name in others:
            differences = [a - b for a, b in zip(values[name], values[reference])]
            cells.append(f"{statistics.mean(differences):+.1f} ({', '.join(f'{d:+.1f}' for d in differences)})")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    collapsed = {name: sum(run["collapsed"] for run in runs[name]) for name in teachers}
    lines.append("| collapsed runs | " + " | ".join(str(collapsed[name]) for name in teachers) + " |"
                 + " |" * len(others))
    return "\n".join(lines)


def teacher_rows(results: dict) -> str:
    lines = ["| teacher | adapter input (auto) | mean pairwise cosine | CRA raw / centered | cache minutes |",
             "|---|---|---|---|---|"]
    for name, result in results.items():
        report = result["teacher"]
        lines.append(f"| {name} | {result['auto']} | {report['mean_cosine']:.2f} | {report['cra']:.1f} / "
                     f"{report['centered_cra']:.1f} | {result['cache_minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="Folders written by teacher_comparison.py.")
    parser.add_argument("--reference", default=None, help="Teacher the others are compared with (default: the first).")
    args = parser.parse_args()
    for output in args.outputs:
        results = json.loads((Path(output) / "results.json").read_text())
        reference = args.reference or next(iter(results))
        print(f"\n### {output}\n\n{table(results, reference)}\n\n{teacher_rows(results)}")


if __name__ == "__main__":
    main()
