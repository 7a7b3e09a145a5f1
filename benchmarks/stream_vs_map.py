"""Stage-2 training throughput from a stream of parquet shards vs the same rows as a map-style dataset.

Both trainers train the same EVA02 tower and adapter on the same rows, images and cached LLM caption embeddings,
with the trainer's default random order. The map-style run reads ``join_embeddings(rows, cache)`` (Arrow, joined
by row position); the stream run reads the rows written as parquet shards, ``load_dataset(..., streaming=True)``,
with the embeddings attached by key (``join_stream_embeddings``) and the trainer's shuffle buffer, process split
and epoch tag (``training_stream``). Steps are timed by the Trainer's own loop (``on_step_end`` to ``on_step_end``:
batch fetch and collation included), in blocks that alternate between the two trainers; samples/s is the batch
size over the median step time. Each block reads less than one epoch of the stream: the end of an epoch (where
datasets waits 5 s while it closes the shuffled parquet readers, once per epoch) is not timed.

Full run: SmolLM2-135M-Instruct (fp32) embeddings of emoji captions, EVA02 image 64 / patch 8 / width 192 /
depth 4 / heads 3, batch 32, 8 shards. ``--quick``: a tiny random LLM and tower, synthetic rows, batch 8, 4 shards.
"""

from __future__ import annotations

import time

import _common as bench
import torch
from datasets import load_dataset

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.data import build_embedding_cache, join_embeddings, join_stream_embeddings
from llm2clip_hf.trainers import LLM2CLIPTrainer

CAPTIONS = ["short_caption", "long_caption"]
SOURCES = ("map", "stream")


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    bench.quiet()
    quick = args.quick
    batch, steps, rounds, num_shards = (8, 3, 2, 4) if quick else (32, 5, 4, 8)
    projection_dim = 32 if quick else 256
    text_model = bench.load_benchmark_text_model(quick)
    rows = bench.image_caption_rows(quick, 2 * batch * steps)  # a block reads half an epoch
    rows = rows.add_column("key", [f"row{i:06d}" for i in range(len(rows))])
    vision = bench.stage2_vision_config(quick)
    scratch = bench.scratch_dir()

    cache = build_embedding_cache(rows, text_model, CAPTIONS, scratch / "cache", show_progress_bar=False)
    mapped = join_embeddings(rows, cache)
    for shard in range(num_shards):
        rows.shard(num_shards, shard, contiguous=True).to_parquet(str(scratch / f"train-{shard:05d}.parquet"))
    start = time.perf_counter()
    stream = load_dataset("parquet", data_files=str(scratch / "*.parquet"), split="train", streaming=True)
    stream = join_stream_embeddings(stream, cache.add_column("key", rows["key"]), key_column="key")
    join_seconds = time.perf_counter() - start

    blocks = {}
    for source, data in (("map", mapped), ("stream", stream)):
        torch.manual_seed(0)
        model = LLM2CLIPModel.from_text_model(text_model, vision, embed_text_model=False,
                                              projection_dim=projection_dim)
        trainer = LLM2CLIPTrainer(model=model, args=bench.stage2_args(bench.scratch_dir(), batch, steps),
                                  train_dataset=data, text_model=text_model)
        blocks[source] = bench.trainer_block(trainer)
    intervals = bench.time_loops_interleaved(blocks, rounds=rounds, warmup_rounds=1)

    step = {source: bench.median(intervals[source]) for source in SOURCES}
    throughput = {source: batch / step[source] for source in SOURCES}
    ratio = throughput["stream"] / throughput["map"]
    print(f"stage-2 training, cached embeddings, batch {batch}, {len(rows)} rows ({num_shards} parquet shards for "
          f"the stream), torch threads {torch.get_num_threads()}, tower width {vision.hidden_size} depth "
          f"{vision.num_hidden_layers} image {vision.image_size}/{vision.patch_size}")
    bench.print_table("median step (Trainer loop, after one warmup round)",
                      ["data", "ms/step", "samples/s", "steps timed"],
                      [[source, f"{1000 * step[source]:.1f}", f"{throughput[source]:.1f}", len(intervals[source])]
                       for source in SOURCES])
    print(f"\nopening the stream and indexing the cache's {len(cache)} keys: {1000 * join_seconds:.0f} ms, once")
    bench.print_ratio(bench.ratio_text("stream/map samples/s", ratio, 0.9, quick=quick))
    bench.write_json(args.output, {
        "benchmark": "stream_vs_map", "quick": quick, "batch_size": batch, "rows": len(rows),
        "num_shards": num_shards, "torch_threads": torch.get_num_threads(), "step_seconds": intervals,
        "median_step_seconds": step, "samples_per_second": throughput, "ratio_stream_over_map": ratio,
        "join_setup_seconds": join_seconds, "target_stream_over_map": 0.9,
    })


if __name__ == "__main__":
    main()
