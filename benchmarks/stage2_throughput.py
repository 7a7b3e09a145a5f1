"""Stage-2 training throughput: cached LLM embeddings vs the frozen LLM vs a LoRA-tuned LLM in the loop.

The three runs train the same EVA02 tower, adapter and batches (same seed and rows); only the text side differs:
``text_source="cached"`` reads embeddings precomputed once by ``precompute_text_embeddings``, ``"frozen"`` runs the
LLM forward every step, ``"lora"`` also backpropagates through it into LoRA adapters. Steps are timed by the
Trainer's own loop (``on_step_end`` to ``on_step_end``: batch fetch and collation included), in blocks that
alternate between the three trainers; samples/s is the batch size over the median step time.

Full run: SmolLM2-135M-Instruct (fp32), EVA02 image 64 / patch 8 / width 192 / depth 4 / heads 3, batch 32,
emoji captions. ``--quick``: a tiny random LLM and tower, synthetic rows, batch 8.
"""

from __future__ import annotations

import time

import _common as bench
import torch

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.trainers import LLM2CLIPTrainer
from llm2clip_hf.data import precompute_text_embeddings

CAPTIONS = ["short_caption", "long_caption"]
SOURCES = ("cached", "frozen", "lora")


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    bench.quiet()
    quick = args.quick
    batch, steps, rounds = (8, 3, 2) if quick else (32, 5, 4)
    projection_dim = 32 if quick else 256
    text_model = bench.load_benchmark_text_model(quick)
    rows = bench.image_caption_rows(quick, batch * steps)  # one block = one epoch: no epoch boundary inside
    vision = bench.stage2_vision_config(quick)

    start = time.perf_counter()
    cached = precompute_text_embeddings(rows, text_model, CAPTIONS)
    cache_seconds = time.perf_counter() - start

    blocks = {}
    for source in SOURCES:
        torch.manual_seed(0)
        model = LLM2CLIPModel.from_text_model(text_model, vision, embed_text_model=source != "cached",
                                              projection_dim=projection_dim)
        trainer = LLM2CLIPTrainer(
            model=model, args=bench.stage2_args(bench.scratch_dir(), batch, steps, text_source=source),
            train_dataset=cached if source == "cached" else rows,
            text_model=text_model if source == "cached" else None,
        )
        blocks[source] = bench.trainer_block(trainer)
    intervals = bench.time_loops_interleaved(blocks, rounds=rounds, warmup_rounds=1)

    step = {source: bench.median(intervals[source]) for source in SOURCES}
    throughput = {source: batch / step[source] for source in SOURCES}
    rows_out = [[source, f"{1000 * step[source]:.1f}", f"{throughput[source]:.1f}",
                 f"{throughput['cached'] / throughput[source]:.2f}x", len(intervals[source])] for source in SOURCES]
    print(f"stage-2 training, batch {batch}, {len(rows)} rows, torch threads {torch.get_num_threads()}, "
          f"text model {text_model.name_or_path}, tower width {vision.hidden_size} depth {vision.num_hidden_layers} "
          f"image {vision.image_size}/{vision.patch_size}")
    bench.print_table("median step (Trainer loop, after one warmup round)",
                      ["text side", "ms/step", "samples/s", "cached speedup", "steps timed"], rows_out)
    cache_in_steps = cache_seconds / step["lora"]
    print(f"\none-time cache of {len(rows)} rows x {len(CAPTIONS)} captions took as long as "
          f"{cache_in_steps:.1f} LoRA steps ({cache_seconds / step['cached']:.0f} cached steps); measured once")

    speedup_lora = throughput["cached"] / throughput["lora"]
    speedup_frozen = throughput["cached"] / throughput["frozen"]
    print(f"also: cached/frozen = {speedup_frozen:.3g}x")
    bench.print_ratio(bench.ratio_text("cached/lora samples/s", speedup_lora, 4.0, quick=quick))
    bench.write_json(args.output, {
        "benchmark": "stage2_throughput", "quick": quick, "batch_size": batch, "rows": len(rows),
        "torch_threads": torch.get_num_threads(), "step_seconds": intervals,
        "median_step_seconds": step, "samples_per_second": throughput,
        "ratio_cached_over_lora": speedup_lora, "ratio_cached_over_frozen": speedup_frozen,
        "cache_build_in_lora_steps": cache_in_steps, "target_cached_over_lora": 4.0,
    })


if __name__ == "__main__":
    main()
