"""Shared helpers of the benchmark scripts: argument parsing, interleaved median timing, trainer step timing,
peak-memory measurement in fresh subprocesses, table / ratio / JSON output and the benchmark data.

Every figure a benchmark claims is a ratio between measurements taken in the same process run, interleaved
(round-robin, alternating order) and summarised by the median after warmup, so drifts of a noisy machine hit
both sides alike. Absolute times are printed for context only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. With libgomp's default spinning, a second busy process on a 2-core
# machine made each training step up to 100x slower (threads spinning against each other); set the variable
# yourself (before running) to measure with another policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO_ROOT))

WORKER_FLAG = "--_worker"  # internal: run one configuration in this (fresh) process and print its result
RESULT_PREFIX = "BENCHMARK_RESULT "
# glibc: a fixed mmap threshold (setting it disables the dynamic one) makes every allocation >= 64 KiB its own
# mapping, returned to the OS when freed, so resident memory follows the live tensors instead of the allocator's
# free lists. Used only in the memory-measuring subprocesses.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------- CLI and output
def build_parser(description: str) -> argparse.ArgumentParser:
    """The common command line: ``--quick`` (smoke run, tiny sizes) and ``--output FILE`` (JSON results)."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (a few seconds)")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(WORKER_FLAG, dest="worker", metavar="JSON", help=argparse.SUPPRESS)
    return parser


def quiet() -> None:
    """Silence progress bars and info logs of transformers and datasets."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns right-aligned (floats with 3 significant digits unless already strings)."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``title`` and the table under it."""
    print(f"\n{title}\n{format_table(headers, rows)}", flush=True)


def ratio_text(name: str, value: float, target: float, higher_is_better: bool = True, unit: str = "x",
               quick: bool = False) -> str:
    """``"cached/lora = 5.3x (target >= 4x, met)"``; a ``--quick`` run says that its sizes prove nothing."""
    met = value >= target if higher_is_better else value <= target
    op = ">=" if higher_is_better else "<="
    verdict = "smoke sizes, not judged" if quick else ("met" if met else "MISSED")
    return f"{name} = {value:.3g}{unit} (target {op} {target:g}{unit}, {verdict})"


def print_ratio(text: str) -> None:
    """The one ``ratio:`` line of a benchmark."""
    print(f"ratio: {text}", flush=True)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (if given) as indented JSON."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- timing
def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("no measurements")
    return statistics.median(values)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds whose order alternates (forward, reversed) so that neither side always runs first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(repeats):
        for name in names if index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


@functools.lru_cache(maxsize=None)
def step_timer_class() -> type:
    """The ``StepTimer`` callback class (defined on first use: importing transformers takes seconds, which a script
    can spend in parallel with its worker processes)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between consecutive ``on_step_end`` events: a whole training step as the Trainer runs it
        (fetching and collating the batch, forward, backward, clipping, optimizer and scheduler, callbacks,
        logging)."""

        def __init__(self) -> None:
            self.last: float | None = None
            self.intervals: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = None  # the first step of a train() call also pays for the dataloader's start: not counted

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.last is not None:
                self.intervals.append(now - self.last)
            self.last = now

    return StepTimer


def attach_step_timer(trainer) -> Any:
    """Add a ``StepTimer`` (see :func:`step_timer_class`) to ``trainer`` and return it."""
    timer = step_timer_class()()
    trainer.add_callback(timer)
    return timer


def time_loops_interleaved(loops: dict[str, Callable[[], list[float]]], rounds: int,
                           warmup_rounds: int = 1) -> dict[str, list[float]]:
    """Interleave blocks of training steps: each ``loops[name]()`` runs one block and returns its per-step
    intervals; blocks run round-robin (order alternating) and the first ``warmup_rounds`` are discarded."""
    names = list(loops)
    steps: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup_rounds + rounds):
        for name in names if index % 2 == 0 else reversed(names):
            intervals = loops[name]()
            if index >= warmup_rounds:
                steps[name].extend(intervals)
    return steps


def trainer_block(trainer) -> Callable[[], list[float]]:
    """A block for :func:`time_loops_interleaved`: ``trainer.train()`` (``args.max_steps`` steps), returning
    the step intervals it took."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print the metrics of every train() call
    timer = attach_step_timer(trainer)

    def run() -> list[float]:
        before = len(timer.intervals)
        trainer.train()
        return timer.intervals[before:]

    return run


# --------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _can_reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kib("VmHWM") <= _status_kib("VmRSS") + 64
    except OSError:
        return False


class PeakRSS:
    """Peak resident-memory increase (bytes) of the code between :meth:`start` and :meth:`stop`, over the RSS at
    :meth:`start`.

    On Linux the kernel's high-water mark ``VmHWM`` is reset to the current RSS by writing ``5`` to
    ``/proc/self/clear_refs`` and read back at the end: exact, no sampling. Where that is not possible a thread
    samples the RSS every millisecond instead (may miss short peaks). Run it in a fresh process started with
    :data:`MEMORY_ENV` so that freed tensors leave the resident set (see :func:`run_workers`).
    """

    def __init__(self) -> None:
        self.exact = sys.platform.startswith("linux") and _can_reset_high_water_mark()
        self.baseline = 0
        self._peak = 0
        self._sampling = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        """Current resident set size in bytes."""
        if sys.platform.startswith("linux"):
            return _status_kib("VmRSS") * 1024
        import psutil

        return psutil.Process().memory_info().rss

    def start(self) -> None:
        if self.exact:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            self.baseline = _status_kib("VmRSS") * 1024
            return
        self.baseline = self._peak = self.rss()
        self._sampling = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._sampling:
            self._peak = max(self._peak, self.rss())
            time.sleep(0.001)

    def stop(self) -> int:
        if self.exact:
            return _status_kib("VmHWM") * 1024 - self.baseline
        self._sampling = False
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, self.rss()) - self.baseline


def second_step_memory():
    """A callback measuring the peak RSS increase of the second training step (``peak``, bytes): the high-water mark
    reset right before it (after its batch is collated) and read after it, as :class:`PeakRSS` measures; and the
    process's peak RSS over both steps (``process_peak``, bytes; Linux)."""
    from transformers import TrainerCallback

    class SecondStepMemory(TrainerCallback):
        def __init__(self) -> None:
            self.meter = PeakRSS()
            self.peak: int | None = None
            self.process_peak: int | None = None
            self.baseline = 0
            self._peak_before = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self._peak_before = _status_kib("VmHWM") * 1024 if sys.platform.startswith("linux") else 0
                self.meter.start()
                self.baseline = self.meter.baseline

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.peak = self.meter.stop()
                self.process_peak = max(self._peak_before, self.baseline + self.peak)

    return SecondStepMemory()


def parse_or_run_worker(description: str, worker: Callable[[Any], None]) -> argparse.Namespace | None:
    """The command line of a benchmark with memory workers: in a worker process (``--_worker CONFIG``) run
    ``worker`` on the config and return ``None``; otherwise return the parsed arguments."""
    args = build_parser(description).parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return None
    return args


def report_step_memory(configs: Sequence[dict[str, Any]], build_trainer: Callable[[dict[str, Any]], Any]) -> None:
    """A memory worker's body: for each config, the two-step trainer ``build_trainer(config)`` trains with
    :func:`second_step_memory` attached, single-threaded; prints the configs with ``peak_increase_bytes`` (the
    second step), ``rss_before_bytes``, ``process_peak_bytes`` and ``exact`` for :func:`run_workers`."""
    import torch
    from transformers import PrinterCallback

    quiet()
    torch.set_num_threads(1)
    results = []
    for config in configs:
        trainer = build_trainer(config)
        trainer.remove_callback(PrinterCallback)
        callback = second_step_memory()
        trainer.add_callback(callback)
        trainer.train()
        results.append({**config, "peak_increase_bytes": callback.peak, "rss_before_bytes": callback.baseline,
                        "process_peak_bytes": callback.process_peak, "exact": callback.meter.exact})
        del trainer
    report_worker_result({"results": results})


def run_workers(script: str | Path, configs: Sequence[Any], parallel: int = 2,
                timeout: float = 3600) -> list[dict[str, Any]]:
    """Run ``script --_worker CONFIG_JSON`` once per config, each in a fresh Python process started with
    :data:`MEMORY_ENV` (at most ``parallel`` at a time: memory figures do not depend on concurrency, timings
    would, so workers report memory only), and return the JSON each printed after :data:`RESULT_PREFIX`."""
    env = {**os.environ, **MEMORY_ENV}

    def run(config: Any) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, str(script), WORKER_FLAG, json.dumps(config)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"worker {config} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                               f"\n{proc.stderr[-4000:]}")
        return json.loads(lines[-1][len(RESULT_PREFIX):])

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(run, configs))


def start_workers(script: str | Path, configs: Sequence[Any], parallel: int = 2) -> Future:
    """:func:`run_workers` in a background thread; ``.result()`` of the returned future waits for it."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run_workers, script, configs, parallel)
    pool.shutdown(wait=False)
    return future


def report_worker_result(result: dict[str, Any]) -> None:
    """Print a worker's result for :func:`run_workers`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- data and models
def scratch_dir() -> Path:
    """A temporary directory removed at interpreter exit."""
    handle = tempfile.TemporaryDirectory(prefix="llm2clip-bench-")
    _SCRATCH.append(handle)
    return Path(handle.name)


_SCRATCH: list[tempfile.TemporaryDirectory] = []


@contextlib.contextmanager
def fd_stdout_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to /dev/null for the duration of the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w", encoding="ascii") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_PEAK_WRAPPER = ("import resource, subprocess, sys\n"
                 "code = subprocess.call(sys.argv[1:])\n"
                 "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
                 "sys.exit(code)\n")


def run_embed(text_model: str | Path, captions: Path, output: Path, rows_per_shard: int = 4096, processes: int = 1,
              caption_columns: Sequence[str] = ("caption",), extra: Sequence[str] = ()) -> tuple[float, int]:
    """Seconds and peak KiB (the largest process) of one ``llm2clip-hf embed`` run as a user starts it: a fresh
    process (``accelerate launch --multi_gpu`` with gloo for ``processes`` > 1) behind a small wrapper that reads
    its children's peak resident set with ``getrusage``. Exits with the job's stderr if it fails."""
    embed = [sys.executable, "-m", "llm2clip_hf.cli", "embed", "--text-model", str(text_model), "--dataset",
             str(captions), "--caption-columns", *caption_columns, "--output-dir", str(output), "--rows-per-shard",
             str(rows_per_shard), *extra]
    if processes > 1:
        # --multi_gpu on a machine without GPUs is torchrun with gloo (--cpu would start a single process)
        embed = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *embed[1:]]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *embed], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"embed failed:\n{done.stderr[-3000:]}")
    return seconds, int(done.stdout.rsplit("PEAK_KIB", 1)[1].split()[0])


@functools.lru_cache(maxsize=None)
def tiny_llm_dir(hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4) -> Path:
    """A random tiny Llama checkpoint (``make_tiny_llm``, seed 0), written once per process and size."""
    from llm2clip_hf.testing import make_tiny_llm

    with fd_stdout_silenced():  # the tokenizer trainer writes blank lines straight to file descriptor 1
        return make_tiny_llm(scratch_dir(), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                             num_attention_heads=num_attention_heads)


def load_benchmark_text_model(quick: bool, max_length: int = 64, **tiny_sizes: int):
    """SmolLM2-135M-Instruct (offline GGUF, fp32) for full runs; a random tiny Llama (``tiny_sizes``) for
    ``--quick``."""
    from llm2clip_hf import LLM2CLIPTextModel
    from llm2clip_hf.conversion.model_loading import load_text_model

    if quick:
        return LLM2CLIPTextModel.from_llm(tiny_llm_dir(**tiny_sizes), max_length=max_length)
    return load_text_model(None, max_length=max_length)


def image_caption_rows(quick: bool, rows: int):
    """A ``datasets.Dataset`` with image, short_caption and long_caption: the first ``rows`` emoji training rows
    (64x64 PNGs, decoded on access as in training) for full runs; for ``--quick`` the 32 synthetic rows of
    ``llm2clip_hf.testing``, repeated up to ``rows``."""
    from datasets import Dataset

    if quick:
        from llm2clip_hf.testing import tiny_image_caption_rows

        base = tiny_image_caption_rows()
        return Dataset.from_list([dict(base[i % len(base)]) for i in range(rows)])
    from llm2clip_hf.demo.emoji_dataset import load_emoji_dataset

    emoji = load_emoji_dataset("train")
    emoji = emoji.select(range(min(rows, len(emoji)))).select_columns(["image", "short_caption", "long_caption"])
    return emoji


def stage2_vision_config(quick: bool):
    """The benchmark's stage-2 tower: EVA02 image 64, patch 8, width 192, depth 4, heads 3 (tiny for --quick)."""
    from llm2clip_hf import EVA02VisionConfig
    from llm2clip_hf.testing import tiny_vision_config

    if quick:
        return tiny_vision_config()
    return EVA02VisionConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4,
                             num_attention_heads=3, intermediate_size=512)


def stage2_args(output_dir: Path, batch_size: int, steps: int, text_source: str = "cached", **extra: Any):
    """Stage-2 ``LLM2CLIPTrainingArguments`` for timing: CPU, no saving, no logging output, no augmentation."""
    from llm2clip_hf.trainers import LLM2CLIPTrainingArguments

    return LLM2CLIPTrainingArguments(
        output_dir=str(output_dir), stage="clip", text_source=text_source, per_device_train_batch_size=batch_size,
        max_steps=steps, use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none",
        image_augmentation=False, **extra,
    )
