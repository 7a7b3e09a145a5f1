"""The stage-2 embedding cache as a job: peak memory against the number of captions, and 2 processes against 1.

Every figure comes from ``llm2clip-hf embed`` run as a user runs it (a fresh process per run, started through a
small wrapper that reads the peak resident set of its child with ``getrusage``), on generated captions (5 to 30
words) and a random Llama of width 512 with one layer.

1. Peak RSS of one process embedding ``N`` and ``10 N`` captions: the job holds one shard (4096 rows) at a time, so
   the ratio should stay near 1 (target <= 1.2x).
2. Wall time of ``accelerate launch --multi_gpu --num_processes 2`` (torchrun + gloo on a CPU machine: two
   processes with one thread each) against one process (all cores) on the same cores and the same
   ``10 N`` captions (target <= 1.2x), and the largest difference between their embeddings (must be < 1e-4 of the
   largest value, else the script exits with status 1).
3. Fetching (``__getitems__``, as the DataLoader does) and collating a batch of 256 cached rows of width 4096 (32x32
   PNG images): embeddings read as Python lists (before) against the numpy format the trainer now sets (after),
   median of interleaved repeats.

Full run: N = 20,000 (so 200,000 for the large figures), shards of 4096 rows. ``--quick``: N = 300, shards of 256
rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import _common as bench

WORDS = ("a the cat dog red blue small large photo of on in with near under sofa park window tree car house "
         "river mountain street two people child playing running old bright dark wooden").split()


def write_captions(path: Path, rows: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as handle:
        for index in range(rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            handle.write(json.dumps({"id": index, "caption": words}) + "\n")
    return path


def collator_seconds(repeats: int, dim: int = 4096) -> dict[str, float]:
    """Median seconds per batch of 256 rows of width ``dim`` (Llama-3-8B's 4096) fetched as the DataLoader does
    (``__getitems__``) and collated by ``ImageTextCollator``: embeddings as Python lists vs numpy."""
    import numpy as np
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    from llm2clip_hf.data import CLIPImageTransform, ROW_INDEX
    from llm2clip_hf.testing import tiny_vision_config
    from llm2clip_hf.data.image_text_collator import ImageTextCollator

    image = PILImage.new("RGB", (32, 32), (120, 30, 200))
    rng = np.random.default_rng(0)
    features = Features({"image": Image(decode=False), ROW_INDEX: Value("int64"),
                         "caption_llm_embedding": Sequence(Value("float32"), length=dim)})
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}] * 256,
                              ROW_INDEX: list(range(256)),
                              "caption_llm_embedding": rng.standard_normal((256, dim), dtype=np.float32)},
                             features=features)
    collator = ImageTextCollator("image", ["caption"], CLIPImageTransform(tiny_vision_config(), augment=False), seed=0)
    formatted = data.with_format("numpy", columns=["caption_llm_embedding"], output_all_columns=True)
    rows = list(range(256))
    batches = {"before (lists)": lambda: collator(data.__getitems__(rows)),
               "after (numpy)": lambda: collator(formatted.__getitems__(rows))}
    times = bench.time_interleaved(batches, repeats=repeats)
    return {name: bench.median(values) for name, values in times.items()}


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    base_rows, rows_per_shard = (300, 256) if args.quick else (20_000, 4096)
    work = bench.scratch_dir()
    llm = bench.tiny_llm_dir(hidden_size=512, num_hidden_layers=1, num_attention_heads=8)
    small = write_captions(work / "small.jsonl", base_rows)
    large = write_captions(work / "large.jsonl", 10 * base_rows)

    _, small_peak = bench.run_embed(llm, small, work / "small_cache", rows_per_shard)
    one_seconds, large_peak = bench.run_embed(llm, large, work / "large_cache_1", rows_per_shard)
    two_seconds, _ = bench.run_embed(llm, large, work / "large_cache_2", rows_per_shard, processes=2)

    from datasets import load_from_disk
    import numpy as np

    one = np.asarray(load_from_disk(str(work / "large_cache_1")).with_format("numpy")[:]["caption_llm_embedding"])
    two = np.asarray(load_from_disk(str(work / "large_cache_2")).with_format("numpy")[:]["caption_llm_embedding"])
    difference = float(np.abs(one - two).max() / np.abs(one).max())
    collator = collator_seconds(repeats=3 if args.quick else 7)

    bench.print_table("Embedding cache job (llm2clip-hf embed, Llama width 512, 1 layer)",
                      ["run", "captions", "processes", "seconds", "peak RSS MiB"],
                      [["small", base_rows, 1, "-", f"{small_peak / 1024:.0f}"],
                       ["large", 10 * base_rows, 1, f"{one_seconds:.1f}", f"{large_peak / 1024:.0f}"],
                       ["large", 10 * base_rows, 2, f"{two_seconds:.1f}", "-"]])
    bench.print_table("Collator, one batch of 256 cached rows", ["rows read as", "ms per batch"],
                      [[name, f"{1000 * seconds:.1f}"] for name, seconds in collator.items()])
    memory_ratio = large_peak / small_peak
    time_ratio = two_seconds / one_seconds
    collator_speedup = collator["before (lists)"] / collator["after (numpy)"]
    print(f"embeddings of 2 processes vs 1: max |difference| / max |value| = {difference:.2e}")
    bench.print_ratio("; ".join([
        bench.ratio_text("peak RSS at 10x captions / 1x", memory_ratio, 1.2, higher_is_better=False, quick=args.quick),
        bench.ratio_text("wall time 2 processes / 1 process", time_ratio, 1.2, higher_is_better=False,
                         quick=args.quick),
        bench.ratio_text("collator lists / numpy", collator_speedup, 1.0, quick=args.quick)]))
    bench.write_json(args.output, {"quick": args.quick, "rows": base_rows, "peak_kib": [small_peak, large_peak],
                                   "seconds": [one_seconds, two_seconds], "memory_ratio": memory_ratio,
                                   "time_ratio": time_ratio, "relative_difference": difference,
                                   "collator_seconds": collator})
    if difference >= 1e-4:
        raise SystemExit(f"2-process embeddings differ from 1-process ones ({difference:.2e} relative)")


if __name__ == "__main__":
    main()
