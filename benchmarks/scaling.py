"""How the cost of a stage-1 step grows with batch size and caption length, and what GradCache saves in memory.

Stage 1 (caption contrastive, LoRA, hard negatives: three sequences per row) on a small random Llama. Each
configuration gets rows whose short and long captions both have about the given number of tokens.

Step time: every configuration has its own trainer in this process; blocks of steps alternate between them
(Trainer loop, ``on_step_end`` to ``on_step_end``) and the median is compared with the smallest configuration.

Peak memory: each configuration runs in a fresh subprocess of this script (``--_worker``), started with glibc's
mmap threshold fixed at 64 KiB so that every tensor buffer is its own mapping and leaves the resident set when
freed (no allocator free lists hiding or recycling memory). The worker trains two steps; right before the second
(after its batch is collated) it resets the kernel's resident high-water mark (``5`` into
``/proc/self/clear_refs``, checked to work before use; otherwise an RSS-sampling thread) and reads ``VmHWM`` after
the step. The figure is that peak minus the RSS at the reset: what the step itself adds (activations, gradients,
optimizer state updates), independent of the model and data already loaded. Workers run single-threaded.

GradCache check: the peak of a global batch of 512 with ``gradcache_chunk_size=32`` over the peak of batch 32
without GradCache (target <= 1.5x), both at 64 caption tokens.

Full run: Llama hidden 256, 4 layers, 4 heads; batch 8/16/32/64 at 64 tokens, 16/64/256 tokens at batch 32.
``--quick``: hidden 64, 2 layers; batch 4 and 8 at 16 tokens, GradCache 64 (chunks of 8) vs 8, all memory figures
from one worker process.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common as bench

if TYPE_CHECKING:
    from llm2clip_hf import LLM2CLIPTextModel
    from llm2clip_hf.trainers import LLM2CLIPTrainer

# torch, transformers and llm2clip_hf are imported inside the functions: the main process starts its memory workers
# first and imports them while the workers run.

WORDS = ("a photo of the cat sitting on red sofa near window dog runs across green grass in park detailed close-up "
         "yellow flower with dew drops its petals two people walk along sandy beach at sunset while waves roll "
         "bowl fresh fruit apples bananas and grapes wooden table an emoji smiling face heart eyes quick brown fox "
         "jumps over lazy").split()
LLM_SIZES = {True: dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
             False: dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4)}


def plan(quick: bool) -> dict[str, Any]:
    """Grid configurations (batch, tokens) and the GradCache pair."""
    if quick:
        grid = [(4, 16), (8, 16)]
        return dict(grid=grid, base=(4, 16), gradcache=(64, 16, 8), plain=(8, 16), steps=3, rounds=2)
    grid = [(8, 64), (16, 64), (32, 64), (64, 64), (32, 16), (32, 256)]
    return dict(grid=grid, base=(8, 64), gradcache=(512, 64, 32), plain=(32, 64), steps=3, rounds=3)


def text_model_for(quick: bool) -> LLM2CLIPTextModel:
    """The benchmark's random Llama (same weights in every process: fixed seed)."""
    return bench.load_benchmark_text_model(True, max_length=512, **LLM_SIZES[quick])


def caption_rows(text_model: LLM2CLIPTextModel, count: int, tokens: int, seed: int = 0):
    """``count`` rows whose short and long captions have about ``tokens`` tokens each (random corpus words)."""
    from datasets import Dataset

    rng = random.Random(seed)
    tokenizer = text_model.require_tokenizer()
    sample = " ".join(rng.choice(WORDS) for _ in range(400))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 400
    words = max(1, round(tokens / per_word))
    texts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(2 * count)]
    return Dataset.from_dict({"short_caption": texts[:count], "long_caption": texts[count:]})


def stage1_trainer(text_model: LLM2CLIPTextModel, batch: int, tokens: int, steps: int,
                   chunk: int | None = None) -> LLM2CLIPTrainer:
    """A stage-1 trainer on ``batch * steps`` rows (one block of steps = one epoch)."""
    from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

    args = LLM2CLIPTrainingArguments(
        output_dir=str(bench.scratch_dir()), stage="caption", per_device_train_batch_size=batch, max_steps=steps,
        gradcache_chunk_size=chunk, use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none",
        activation_checkpointing=False)  # docs/results.md's figures; text_checkpointing.py measures it on
    return LLM2CLIPTrainer(model=text_model, args=args, train_dataset=caption_rows(text_model, batch * steps, tokens))


def sequence_length(trainer: LLM2CLIPTrainer) -> int:
    """Padded length of the first batch (queries and positives go through the LLM as one padded batch)."""
    from llm2clip_hf.data.text_pairs import TEXTS

    batch = next(iter(trainer.get_train_dataloader()))
    return int(batch[TEXTS]["input_ids"].shape[1])


def worker(configs: list[dict[str, Any]]) -> None:
    """Measure the step memory of each configuration in turn in this process (one configuration per fresh process,
    except in ``--quick`` runs)."""
    bench.report_step_memory(configs, lambda config: stage1_trainer(
        text_model_for(config["quick"]), config["batch"], config["tokens"], steps=2, chunk=config["chunk"]))


def main() -> None:
    args = bench.parse_or_run_worker(__doc__, worker)
    if args is None:
        return
    quick = args.quick
    settings = plan(quick)

    # Memory: each configuration in a fresh process. They run while this process imports and builds its trainers;
    # the timing below starts only once they are done.
    memory_configs = [dict(batch=b, tokens=t, chunk=None, quick=quick) for b, t in settings["grid"]]
    gc_batch, gc_tokens, gc_chunk = settings["gradcache"]
    memory_configs.append(dict(batch=gc_batch, tokens=gc_tokens, chunk=gc_chunk, quick=quick))
    # A --quick run measures all of them in one process: its figures only show that the machinery works.
    batches = [memory_configs] if quick else [[config] for config in memory_configs]
    pending = bench.start_workers(Path(__file__), batches, parallel=4)

    import torch

    bench.quiet()
    trainers, lengths = {}, {}
    for batch, tokens in settings["grid"]:
        trainer = stage1_trainer(text_model_for(quick), batch, tokens, settings["steps"])
        lengths[(batch, tokens)] = sequence_length(trainer)
        trainers[(batch, tokens)] = bench.trainer_block(trainer)
    memory = [result for worker_output in pending.result() for result in worker_output["results"]]
    peak = {(m["batch"], m["tokens"], m["chunk"]): m["peak_increase_bytes"] for m in memory}

    # Step time: all grid configurations in this process, interleaved (no worker running any more).
    intervals = bench.time_loops_interleaved(trainers, rounds=settings["rounds"], warmup_rounds=1)
    step = {key: bench.median(values) for key, values in intervals.items()}

    base = settings["base"]
    mib = 2 ** 20
    rows = []
    for batch, tokens in settings["grid"]:
        key = (batch, tokens)
        rows.append([batch, tokens, lengths[key], f"{1000 * step[key]:.1f}", f"{step[key] / step[base]:.2f}x",
                     f"{(step[key] / batch) / (step[base] / base[0]):.2f}x", f"{peak[key + (None,)] / mib:.1f}",
                     f"{peak[key + (None,)] / peak[base + (None,)]:.2f}x"])
    sizes = LLM_SIZES[quick]
    isolation = "all in one process (--quick)" if quick else "one fresh single-threaded process per configuration"
    method = "exact VmHWM reset" if memory[0]["exact"] else "sampled RSS"
    print(f"stage 1 (LoRA, query + positive + hard negative per row), Llama hidden {sizes['hidden_size']}, "
          f"{sizes['num_hidden_layers']} layers\ntime: torch threads {torch.get_num_threads()}, median of "
          f"{len(intervals[base])} steps per configuration, blocks interleaved\nmemory: {isolation}, {method}")
    bench.print_table(f"cost vs batch size and caption length (ratios against batch {base[0]}, {base[1]} tokens)",
                      ["batch", "caption tokens", "padded len", "ms/step", "step time", "time/row",
                       "peak MiB", "peak"], rows)

    plain = settings["plain"] + (None,)
    cached = (gc_batch, gc_tokens, gc_chunk)
    ratio = peak[cached] / peak[plain]
    bench.print_table("GradCache: step peak memory", ["global batch", "chunk", "peak MiB", "vs plain"],
                      [[plain[0], "none", f"{peak[plain] / mib:.1f}", "1.00x"],
                       [gc_batch, gc_chunk, f"{peak[cached] / mib:.1f}", f"{ratio:.2f}x"]])
    bench.print_ratio(bench.ratio_text(f"gradcache{gc_batch}/plain{plain[0]} peak memory", ratio, 1.5,
                                       higher_is_better=False, quick=quick))
    bench.write_json(args.output, {
        "benchmark": "scaling", "quick": quick, "llm": sizes, "torch_threads": torch.get_num_threads(),
        "grid": [{"batch": b, "tokens": t, "padded_length": lengths[(b, t)], "step_seconds": intervals[(b, t)],
                  "median_step_seconds": step[(b, t)], "peak_increase_bytes": peak[(b, t, None)]}
                 for b, t in settings["grid"]],
        "memory_workers": memory, "ratio_gradcache_over_plain_peak": ratio, "target": 1.5,
    })


if __name__ == "__main__":
    main()
