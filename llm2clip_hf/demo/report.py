"""What `llm2clip-hf demo` shows: its metrics summarised over seeds, the terminal table and ``report.png``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEACHERS = ("raw", "tuned")
TEACHER_NAMES = {"raw": "raw LLM", "tuned": "stage-1 LLM"}
DIRECTIONS = ("image_to_text", "text_to_image")
KS = (1, 5, 10)


def retrieval_keys(prefix: str = "") -> list[str]:
    """``<prefix>image_to_text_R@1`` ... ``<prefix>text_to_image_R@10``."""
    return [f"{prefix}{direction}_R@{k}" for direction in DIRECTIONS for k in KS]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def summarize(per_seed: dict[str, list[dict[str, float]]],
              differences: Sequence[tuple[str, str]] = (("tuned", "raw"),)) -> dict[str, dict[str, dict[str, Any]]]:
    """``{teacher: {metric: spread over seeds}}`` and, under ``"A_minus_B"`` for each pair of ``differences``, the
    per-seed differences (the seeds are paired: same tower init, batches and crops for both teachers)."""
    summary = {teacher: {key: spread([run[key] for run in runs]) for key in runs[0]}
               for teacher, runs in per_seed.items()}
    for first, second in differences:
        summary[f"{first}_minus_{second}"] = {key: spread([a[key] - b[key] for a, b in
                                                           zip(per_seed[first], per_seed[second])])
                                              for key in per_seed[first][0]}
    return summary


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "      -       "
    if entry["std"] == 0.0 and len(entry["values"]) == 1:
        return f"{entry['mean']:6.1f}        "
    return f"{entry['mean']:6.1f} ± {entry['std']:4.1f}"


def rows(metrics: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(label, metric key, chance) of every line of the comparison, in order."""
    chance = metrics["chance"]
    lines = [("CRA, held-out pairs (text only)", "cra", chance["cra"])]
    for prefix, what in (("", "short + long"), ("long_", "dense, >77 words"), ("cross_lingual_", "fr/de/es/zh mean")):
        for key in retrieval_keys(prefix):
            direction, k = key.removeprefix(prefix).split("_R@")
            arrow = "I->T" if direction == "image_to_text" else "T->I"
            lines.append((f"{arrow} R@{k} ({what})", key, chance[key]))
    lines.append(("zero-shot category top-1", "zero_shot_top1", chance["zero_shot_top1"]))
    return lines


def results_table(metrics: dict[str, Any]) -> str:
    """The terminal summary: both teachers' stage-2 CLIP side by side (mean ± std over seeds), next to chance."""
    summary = metrics["summary"]
    seeds = metrics["stage2_seeds"]
    lines = [f"stage 2 on each teacher's cached embeddings, {len(seeds)} seed(s) {seeds} (mean ± std, %)",
             f"{'metric':34s}  {'raw LLM':>14s}  {'stage-1 LLM':>14s}  {'tuned - raw':>14s}  chance",
             "-" * 94]
    for label, key, chance in rows(metrics):
        cells = [_cell(summary[t].get(key)) for t in (*TEACHERS, "tuned_minus_raw")]
        lines.append(f"{label:34s}  {cells[0]}  {cells[1]}  {cells[2]}  {chance:6.1f}")
    query = metrics["zero_shot_query"]
    lines += ["", f"long captions: {metrics['long_caption_words']}",
              f"zero-shot query {query['emoji']} (truth: {query['truth']}) -> {query['answer']}",
              f"reloaded vs in-memory image features, max |diff|: {metrics['reload_max_abs_difference']:.2e}",
              f"time (s): {metrics['seconds']}, total {metrics['total_seconds']}; peak RSS "
              f"{metrics['peak_rss_gib']} GiB"]
    if "llava_alignment" in metrics:
        llava = metrics["llava_alignment"]
        lines += ["", f"LLaVA feature alignment ({llava['steps']} projector steps per tower and seed): held-out name "
                      f"perplexity and choice accuracy among {llava['choices']} names (chance "
                      f"{100 / llava['choices']:.1f} %)"]
        for tower in ("untrained", "raw", "tuned", "tuned_minus_raw", "raw_minus_untrained"):
            entry = llava["summary"][tower]
            lines.append(f"  {tower:20s} perplexity {_cell(entry['name_perplexity'])}  choice "
                         f"{_cell(entry['choice_accuracy'])}")
    return "\n".join(lines)


def write_report_png(metrics: dict[str, Any], path: Path) -> None:
    """Loss curves of both stages and both teachers' metrics (mean over seeds, min-max bars) next to chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    steps = [s for s, _ in metrics["stage1_loss"]]
    axes[0].plot(steps, [v for _, v in metrics["stage1_loss"]], marker="o", markersize=3)
    axes[0].set(title="stage 1 (caption contrastive) loss", xlabel="step", ylabel="loss")
    for teacher in TEACHERS:
        curve = metrics["stage2_loss"][teacher]
        axes[1].plot([s for s, _ in curve], [v for _, v in curve], label=f"on the {TEACHER_NAMES[teacher]}")
    axes[1].set(title=f"stage 2 (CLIP) loss, seed {metrics['stage2_seeds'][0]}", xlabel="step", ylabel="loss")
    axes[1].legend()
    shown = [(label, key, chance) for label, key, chance in rows(metrics)
             if key in ("cra", "zero_shot_top1") or key.endswith(("R@5",))]
    positions = range(len(shown))
    for offset, teacher in ((-0.2, "raw"), (0.2, "tuned")):
        entries = [metrics["summary"][teacher][key] for _, key, _ in shown]
        means = [e["mean"] for e in entries]
        errors = [[e["mean"] - e["min"] for e in entries], [e["max"] - e["mean"] for e in entries]]
        axes[2].bar([p + offset for p in positions], means, width=0.4, yerr=errors, capsize=3,
                    label=TEACHER_NAMES[teacher])
    axes[2].scatter(list(positions), [chance for _, _, chance in shown], marker="_", s=400, color="black",
                    label="chance", zorder=3)
    axes[2].set_xticks(list(positions), [label for label, _, _ in shown], rotation=25, ha="right", fontsize=8)
    top = max(e["max"] for t in TEACHERS for _, key, _ in shown for e in [metrics["summary"][t][key]])
    axes[2].set(title=f"held-out metrics (%), mean and min-max over {len(metrics['stage2_seeds'])} seed(s)",
                ylim=(0, min(100.0, math.ceil(top * 1.15 + 1))))
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
