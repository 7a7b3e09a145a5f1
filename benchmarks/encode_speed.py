"""``LLM2CLIPTextModel.encode`` (length-sorted batches) vs batching in input order, on mixed-length captions.

The captions are half 3-word and half 60-word texts, shuffled. In-order batching tokenizes each run of
``batch_size`` captions as given (``text_model.tokenize``) and runs the forward, so almost every batch is padded to
a long caption; ``encode`` sorts by token length first. Both run under ``no_grad`` in eval mode and are timed
alternately; the embeddings must agree up to rounding (max abs difference over the largest |value| < 1e-4, else
the script exits with status 1).

Full run: SmolLM2-135M-Instruct (fp32), 256 captions, batch 32. ``--quick``: a tiny random LLM, 64 captions.
"""

from __future__ import annotations

import random
import sys

import _common as bench
import torch

WORDS = ("a the small large red blue green yellow cat dog bird horse car tree house river mountain city street "
         "sunset morning night photo painting drawing close-up view of with near under over next to on in and "
         "two three people child woman man playing running sitting standing old new bright dark wooden stone "
         "glass water snow grass flower field beach window table chair book cup").split()
# Same embeddings up to rounding, not bit for bit: with left padding a caption's tokens get positions shifted by its
# batch's pad count, and the RoPE cos/sin tables (computed in float32) round differently at other positions. That
# moves SmolLM2's mean-pooled values (|value| up to ~45) by ~2e-3, ~5e-5 of the largest value (still ~3e-5 with the
# model in float64, and exactly 0 in that check once position ids count from the first real token).
RELATIVE_TOLERANCE = 1e-4


def mixed_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions, half of 3 words and half of 60 words, in shuffled order."""
    rng = random.Random(seed)
    captions = [" ".join(rng.choice(WORDS) for _ in range(3 if i % 2 == 0 else 60)) for i in range(count)]
    rng.shuffle(captions)
    return captions


def encode_in_order(text_model, captions: list[str], batch_size: int) -> torch.Tensor:
    """Embeddings with batches taken in input order (no sorting): the baseline."""
    was_training = text_model.training
    text_model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            batch = text_model.tokenize(captions[start:start + batch_size])
            outputs.append(text_model(**batch).text_embeds.float().cpu())
    text_model.train(was_training)
    return torch.cat(outputs)


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    bench.quiet()
    count, batch_size, repeats = (64, 32, 3) if args.quick else (256, 32, 3)
    text_model = bench.load_benchmark_text_model(args.quick, max_length=512)
    captions = mixed_captions(count)
    lengths = [len(item.input_ids) for item in text_model.tokenize_items(captions)]

    results = {}
    def sorted_run() -> None:
        results["sorted"] = text_model.encode(captions, batch_size=batch_size, show_progress_bar=False)

    def in_order_run() -> None:
        results["in_order"] = encode_in_order(text_model, captions, batch_size)

    times = bench.time_interleaved({"sorted (encode)": sorted_run, "in order": in_order_run},
                                   repeats=repeats, warmup=1)
    diff = (results["sorted"] - results["in_order"]).abs().max().item()
    scale = results["in_order"].abs().max().item()

    speed = {name: count / bench.median(values) for name, values in times.items()}
    padded = {
        "sorted (encode)": sum(max(block) * len(block) for block in _blocks(sorted(lengths, reverse=True), batch_size)),
        "in order": sum(max(block) * len(block) for block in _blocks(lengths, batch_size)),
    }
    print(f"{count} captions (half 3 words, half 60 words; {min(lengths)}-{max(lengths)} tokens with template), "
          f"batch {batch_size}, torch threads {torch.get_num_threads()}, text model {text_model.name_or_path}")
    rows = [[name, f"{speed[name]:.1f}", f"{speed[name] / speed['in order']:.2f}x", padded[name], len(times[name])]
            for name in times]
    bench.print_table(f"sentences/s, median of {repeats} alternating repeats after 1 warmup",
                      ["batching", "sentences/s", "vs in order", "padded tokens", "repeats"], rows)
    relative = diff / scale
    print(f"\nmax abs difference of the embeddings: {diff:.2e} (largest |value| {scale:.3g}; relative {relative:.1e}, "
          f"must be < {RELATIVE_TOLERANCE:g})")
    ratio = speed["sorted (encode)"] / speed["in order"]
    bench.print_ratio(bench.ratio_text("sorted/in-order sentences/s", ratio, 1.5, quick=args.quick))
    bench.write_json(args.output, {
        "benchmark": "encode_speed", "quick": args.quick, "captions": count, "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(), "seconds": times, "sentences_per_second": speed,
        "padded_tokens": padded, "max_abs_diff": diff, "ratio_sorted_over_in_order": ratio, "target": 1.5,
    })
    if not relative < RELATIVE_TOLERANCE:
        print(f"FAILED: embeddings differ by {relative:.1e} (relative) >= {RELATIVE_TOLERANCE:g}", file=sys.stderr)
        sys.exit(1)


def _blocks(values: list[int], size: int) -> list[list[int]]:
    return [values[start:start + size] for start in range(0, len(values), size)]


if __name__ == "__main__":
    main()
