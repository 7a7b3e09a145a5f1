"""Activation checkpointing in stage 1 (the default for the text stages since issue 25): peak memory and step time
with it on, against off.

Stage 1 (caption contrastive, LoRA, hard negatives: three sequences per row) through the trainer. Peak memory: each
setting trains two steps in a fresh single-threaded subprocess (``--_worker``, glibc's mmap threshold fixed, see
``_common.MEMORY_ENV``); the figures are the second step's peak increase over the RSS right before it (its
activations, gradients and optimizer update) and the process's whole peak RSS (``VmHWM``: model, data and step).
Step time: both trainers in this process, blocks of steps interleaved, medians compared.

Full run: SmolLM2-135M-Instruct (offline GGUF, fp32), the demo's emoji caption pairs, batch 32, max length 128.
``--quick``: a tiny random Llama, batch 8, both memory figures from one worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _common as bench

SETTINGS = {False: "off", True: "on"}


def caption_rows(quick: bool, rows: int):
    """Caption pairs: the demo's emoji training captions (full run) or the test rows of ``llm2clip_hf.testing``."""
    from datasets import Dataset

    from llm2clip_hf.testing import tiny_caption_pair_rows

    if quick:
        return Dataset.from_list(tiny_caption_pair_rows())
    from llm2clip_hf.demo.emoji_dataset import load_emoji_dataset

    return load_emoji_dataset()["train"].select(range(rows))


def caption_trainer(quick: bool, checkpointing: bool, steps: int):
    """A stage-1 trainer with activation checkpointing on or off, on ``batch * steps`` rows."""
    from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

    batch = 8 if quick else 32
    args = LLM2CLIPTrainingArguments(
        output_dir=str(bench.scratch_dir()), stage="caption", per_device_train_batch_size=batch, max_steps=steps,
        activation_checkpointing=checkpointing, use_cpu=True, save_strategy="no", disable_tqdm=True,
        report_to="none", caption_columns=["short_caption", "long_caption"], lora_dropout=0.0)
    text_model = bench.load_benchmark_text_model(quick, max_length=128)
    return LLM2CLIPTrainer(model=text_model, args=args, train_dataset=caption_rows(quick, batch * steps))


def worker(configs: list[dict[str, Any]]) -> None:
    """Train two steps per configuration, measuring the second step's peak increase and the process peak."""
    bench.report_step_memory(configs, lambda config: caption_trainer(config["quick"], config["checkpointing"], 2))


def main() -> None:
    args = bench.parse_or_run_worker(__doc__, worker)
    if args is None:
        return
    quick = args.quick
    configs = [dict(checkpointing=on, quick=quick) for on in SETTINGS]
    memory = [result for output in bench.run_workers(Path(__file__), [configs] if quick else [[c] for c in configs],
                                                     parallel=1) for result in output["results"]]
    by_setting = {m["checkpointing"]: m for m in memory}

    import torch

    bench.quiet()
    steps = 2 if quick else 3
    loops = {on: bench.trainer_block(caption_trainer(quick, on, steps)) for on in SETTINGS}
    intervals = bench.time_loops_interleaved(loops, rounds=2, warmup_rounds=1)
    step = {on: bench.median(values) for on, values in intervals.items()}

    mib = 2 ** 20
    rows = [[SETTINGS[on], f"{step[on]:.2f}", f"{step[on] / step[False]:.2f}x",
             f"{by_setting[on]['peak_increase_bytes'] / mib:.0f}",
             f"{by_setting[on]['peak_increase_bytes'] / by_setting[False]['peak_increase_bytes']:.2f}x",
             f"{by_setting[on]['process_peak_bytes'] / mib:.0f}"] for on in SETTINGS]
    model = "tiny random Llama, batch 8" if quick else "SmolLM2-135M-Instruct, batch 32, max length 128"
    print(f"stage 1, {model}; time: torch threads {torch.get_num_threads()}, median of {len(intervals[False])} steps "
          f"each, blocks interleaved; memory: fresh single-threaded worker per setting")
    bench.print_table("activation checkpointing (ratios against off)",
                      ["checkpointing", "s/step", "step time", "step peak MiB", "step peak", "process peak MiB"], rows)
    ratio = by_setting[True]["peak_increase_bytes"] / by_setting[False]["peak_increase_bytes"]
    bench.print_ratio(bench.ratio_text("checkpointing on/off step peak memory", ratio, 1.0, higher_is_better=False,
                                       quick=quick))
    bench.write_json(args.output, {
        "benchmark": "text_checkpointing", "quick": quick, "step_seconds": {SETTINGS[k]: v for k, v in intervals.items()},
        "median_step_seconds": {SETTINGS[k]: v for k, v in step.items()}, "memory_workers": memory,
        "ratio_on_over_off_step_peak": ratio, "ratio_on_over_off_step_time": step[True] / step[False],
    })


if __name__ == "__main__":
    main()
