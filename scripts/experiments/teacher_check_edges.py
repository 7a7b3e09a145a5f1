#!/usr/bin/env python
"""The teacher check at its edges (issue 33 item 4), measured on the emoji captions (short and long caption of each
train image) embedded by the tests' tiny random LLM and by SmolLM2-135M-Instruct (raw, bidirectional, mean pooling),
and on teachers made from SmolLM2's embeddings: two with a common component added (mean pairwise cosine ~0.92, near
the "dominated" bar, and ~0.99, past it) and a collapsed one (one vector plus the noise that computing SmolLM2 in
bfloat16 leaves).

1. Captions: how many do the statistics need to mean something? Random subsets of N captions: the statistics'
   median and 90 % interval over the draws, and how often the verdict on the subset (always measured here, whatever
   the size) equals the verdict on all captions.
2. Pairs: on how many caption pairs does the centered CRA tell a real teacher from noise? Random subsets of P pairs:
   how often the centered CRA beats chance (``pair_retrieval_beats_chance``), the arbiter of a residual within the
   rounding noise band.
3. Precision: how much noise does computing in bfloat16 leave? The same captions by the same LLM in float32 and in
   bfloat16, against one bfloat16 rounding of the float32 embeddings and the check's estimate of it.

    python scripts/experiments/teacher_check_edges.py --output teacher_check_edges.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from llm2clip_hf.evaluation.teacher_quality import pair_retrieval_beats_chance, rounding_noise_share, \
    teacher_statistics

CAPTION_COUNTS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)
PAIR_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)
STATISTICS = ("mean_cosine", "centered_effective_rank", "residual_share")
BF16_EPS = torch.finfo(torch.bfloat16).eps


def embed_captions(cache: Path, rows: int, max_length: int) -> dict[tuple[str, str], list[torch.Tensor]]:
    """``{(LLM, dtype): [short, long]}`` float32 embeddings of the first ``rows`` emoji train rows (kept in
    ``cache``: the SmolLM2 runs take minutes on a CPU)."""
    if cache.is_file():
        return torch.load(cache)
    from llm2clip_hf.conversion.model_loading import load_text_model
    from llm2clip_hf.demo.emoji_dataset import load_emoji_dataset
    from llm2clip_hf.testing import make_tiny_llm

    train = load_emoji_dataset("train")
    train = train.select(range(min(rows, len(train))))
    captions = [list(train["short_caption"]), list(train["long_caption"])]
    embedded = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, source in (("tiny", str(make_tiny_llm(Path(scratch) / "tiny"))), ("smollm2", None)):
            for dtype in ("float32", "bfloat16"):
                torch.manual_seed(0)
                text_model = load_text_model(source, max_length=max_length, dtype=getattr(torch, dtype))
                embedded[name, dtype] = [text_model.encode(texts, batch_size=64, show_progress_bar=False).float()
                                         for texts in captions]
                del text_model
    torch.save(embedded, cache)
    return embedded


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p05": pick(0.05), "median": statistics.median(ordered), "p95": pick(0.95)}


def caption_table(short: torch.Tensor, long: torch.Tensor, draws: int, generator: torch.Generator,
                  computed_precision: float | None) -> dict:
    """Statistics and verdicts of random subsets of N captions against those of all of them (and the verdict of all
    of them with their pairs)."""
    pool = torch.cat([short, long])
    full = teacher_statistics(pool, max_rows=len(pool), min_captions=2, computed_precision=computed_precision)
    paired = teacher_statistics(pool, max_rows=len(pool), pairs=(short, long), computed_precision=computed_precision)
    table = {"all": {**{key: getattr(full, key) for key in STATISTICS}, "verdict": full.verdict,
                     "noise_band": full.noise_band, "verdict_with_pairs": paired.verdict,
                     "centered_cra_chance": paired.centered_cra_chance, "captions": len(pool)}}
    for count in CAPTION_COUNTS:
        values, agree = {key: [] for key in STATISTICS}, 0
        for _ in range(draws):
            measured = teacher_statistics(pool[torch.randperm(len(pool), generator=generator)[:count]],
                                          max_rows=count, min_captions=2, computed_precision=computed_precision)
            for key in STATISTICS:
                values[key].append(getattr(measured, key))
            agree += measured.verdict == full.verdict
        table[count] = {**{key: quantiles(values[key]) for key in STATISTICS}, "verdict_agreement": agree / draws}
    return table


def pair_table(short: torch.Tensor, long: torch.Tensor, draws: int, generator: torch.Generator) -> dict:
    """How often the centered CRA of P random pairs beats chance."""
    table = {}
    for count in [c for c in PAIR_COUNTS if c <= len(short)] + [len(short)]:
        beats = 0
        for _ in range(draws if count < len(short) else 1):
            rows = torch.randperm(len(short), generator=generator)[:count]
            first, second = short[rows], long[rows]
            mean = torch.cat([first, second]).mean(0)
            beats += pair_retrieval_beats_chance(first - mean, second - mean)
        table[count] = beats / (draws if count < len(short) else 1)
    return table


def precision_row(float32: torch.Tensor, bfloat16: torch.Tensor) -> dict[str, float]:
    """Noise of computing in bfloat16, of one bfloat16 rounding, and the check's estimate of the latter (relative
    RMS norms)."""
    norm = float(float32.square().sum(-1).mean().sqrt())
    rms = lambda x: float(x.square().sum(-1).mean().sqrt()) / norm  # noqa: E731
    row = {"computed_in_bfloat16": rms(bfloat16 - float32),
           "one_rounding": rms(float32.bfloat16().float() - float32),
           "estimated_rounding": rounding_noise_share(float32, BF16_EPS),
           "residual_share": teacher_statistics(float32, max_rows=len(float32)).residual_share}
    row["computed_over_estimate"] = row["computed_in_bfloat16"] / row["estimated_rounding"]
    return row


def with_common_component(embeddings: list[torch.Tensor], mean_cosine: float) -> list[torch.Tensor]:
    """``embeddings`` plus a multiple of their mean, the multiple chosen (bisection) for this mean pairwise
    cosine."""
    mean = torch.cat(embeddings).mean(0)
    low, high = 0.0, 1000.0
    for _ in range(60):
        scale = (low + high) / 2
        shifted = torch.cat(embeddings) + scale * mean
        reached = teacher_statistics(shifted, max_rows=len(shifted)).mean_cosine
        low, high = (scale, high) if reached < mean_cosine else (low, scale)
    return [x + scale * mean for x in embeddings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("teacher_check_edges.json"))
    parser.add_argument("--embeddings", type=Path, default=Path("teacher_check_edges_embeddings.pt"),
                        help="Where the embeddings are kept between runs.")
    parser.add_argument("--rows", type=int, default=1306, help="Emoji train rows (two captions each).")
    parser.add_argument("--draws", type=int, default=200, help="Random subsets per size.")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    embedded = embed_captions(args.embeddings, args.rows, args.max_length)
    smollm2 = embedded["smollm2", "float32"]
    mean = torch.cat(smollm2).mean(0)
    teachers = {
        "tiny random LLM": (embedded["tiny", "float32"], None),
        "SmolLM2 raw": (smollm2, None),
        "SmolLM2 + common component, mean cosine 0.92": (with_common_component(smollm2, 0.92), None),
        "SmolLM2 + common component, mean cosine 0.99": (with_common_component(smollm2, 0.99), None),
        "collapsed, computed in bfloat16": (
            [mean + (x16 - x32) for x16, x32 in zip(embedded["smollm2", "bfloat16"], smollm2)], BF16_EPS),
    }
    results = {"captions": {}, "pairs": {}, "precision": {}}
    generator = torch.Generator().manual_seed(0)
    print("1. N captions: mean cosine p05/median/p95 | centered effective rank p05/median/p95 | verdict = all's")
    for name, (pair, computed_precision) in teachers.items():
        table = results["captions"][name] = caption_table(*pair, args.draws, generator, computed_precision)
        every = table["all"]
        print(f"\n{name}: all {every['captions']}: mean cosine {every['mean_cosine']:.3f}, centered effective rank "
              f"{every['centered_effective_rank']:.1f}, residual {every['residual_share']:.3f} (noise band "
              f"{every['noise_band']:.2g}): {every['verdict']}; with the pairs' centered CRA (chance "
              f"{every['centered_cra_chance']:.2g}): {every['verdict_with_pairs']}")
        for count in CAPTION_COUNTS:
            cos, rank = table[count]["mean_cosine"], table[count]["centered_effective_rank"]
            print(f"  N={count}: {cos['p05']:.3f}/{cos['median']:.3f}/{cos['p95']:.3f} | {rank['p05']:.1f}/"
                  f"{rank['median']:.1f}/{rank['p95']:.1f} | {100 * table[count]['verdict_agreement']:.0f} %")
    print("\n2. P caption pairs: share of draws whose centered CRA beats chance (p < 1e-3)")
    for name, (pair, _) in teachers.items():
        table = results["pairs"][name] = pair_table(*pair, max(20, args.draws // 4), generator)
        print(f"{name}: " + ", ".join(f"P={count} {100 * share:.0f} %" for count, share in table.items()))
    print("\n3. Noise of computing in bfloat16, relative RMS norm")
    for name in ("tiny", "smollm2"):
        row = results["precision"][name] = precision_row(torch.cat(embedded[name, "float32"]),
                                                         torch.cat(embedded[name, "bfloat16"]))
        print(f"{name}: computed in bfloat16 {row['computed_in_bfloat16']:.2e}; one bfloat16 rounding "
              f"{row['one_rounding']:.2e} (estimated {row['estimated_rounding']:.2e}); ratio "
              f"{row['computed_over_estimate']:.1f}; residual around the mean {row['residual_share']:.3f}")
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
