"""One command for a lent GPU: correctness on the device, then the real workload at real sizes, random weights.

    python benchmarks/gpu_suite.py --out gpu_suite.jsonl --budget-s 480

Every part writes one JSON line (``"record": "part"``) to stdout and to ``--out`` (flushed) as soon as it finishes,
and every measured configuration a ``"record": "config"`` line as soon as it is measured, so a run cut short keeps
what it measured. The first line (``"env"``) records the device, driver, CUDA, torch and the precision policy; the
last (``"summary"``) the parts that ran, failed or were skipped and the goals. A part that fails (out of memory, any
error) writes its error and the suite goes on; ``--budget-s`` skips a part whose estimated cost no longer fits
(naming it), and timing loops stop early (after one timed step) once the budget is spent. ``--parts`` runs a subset;
``--quick`` runs every part with tiny sizes (on CPU in the test suite: a smoke check, its figures mean nothing).

Parts, in order (the most important first, so a short budget keeps them):

- ``check_tower``: the EVA02 tower + adapter (L/14-336 widths, 4 blocks) on the device against the same weights on
  CPU, float32 (TF32 off): max |difference|; bf16 autocast: the image->text retrieval ranking of a fixed set of 16
  against the float32 CPU one; SDPA's fused kernels against its math (eager) kernel.
- ``check_text``: the text encoder (Llama-3.2-1B widths, 4 layers) the same way through ``encode``: float32, bf16
  weights (as the cache runs it: caption->caption ranking), SDPA against ``attn_implementation="eager"``.
- ``check_steps``: one trainer step of stage 1 (LoRA) and of stage 2 (cached embeddings) on the device
  (``LLM2CLIPTrainer.training_step``) against the trainer's loss and a backward on CPU (float32: loss and
  gradients); on the device, stage 1 with activation checkpointing and stage 2 with GradCache against plain steps.
- ``stage2``: EVA02-L/14-336 + the adapter (4096-wide cached embeddings, Llama-3-8B's) at batch 256 and 1024, bf16
  autocast over float32 weights: plain, activation checkpointing, GradCache (chunks of 32 / 64); and transformers'
  ``CLIPVisionModel`` ViT-L/14-336 (OpenAI's shape, SDPA) in the same place. Images/s, step time, peak memory,
  MFU / HFU. Plain batch 256 needs ~250 GB of activations: its out-of-memory line is expected on one H100.
- ``stage1_1b``: Llama-3.2-1B (bf16 weights) with the official LoRA at the official batch (64 rows: query, positive,
  hard negative, max length 512) through the trainer's own data path (caption pairs -> ``build_caption_pairs`` ->
  ``TextPairCollator``), activation checkpointing off and on. Tokens/s (real and padded), step time, memory, MFU.
- ``cache_1b``: captions/s of the embedding-cache builder's embedding loop (``tokenize_items`` + ``embed_items``,
  what each shard runs) against a plain ``model(**batch)`` loop over the same length-sorted batches already on the
  device, per batch size; and one end-to-end ``precompute_text_embeddings`` (its one-time weight fingerprint timed
  apart).
- ``stage2_lora_1b``: stage 2 with the 1B LLM in the loop with LoRA (``text_source="lora"``) against cached, same
  tower, batch and GradCache chunks: the paper's "nearly 4x".
- ``stage1_8b``, ``cache_8b``: the same with Llama-3-8B (each part says what did not fit).
- ``stage2_data``: the stage-2 collator (JPEG decode, RandomResizedCrop to 336, cached 4096-wide vectors) in one
  process: images/s per DataLoader worker, to size ``dataloader_num_workers``.
- ``check_compile``: ``torch.compile`` of the tower (what ``--torch_compile`` turns on; inductor on CUDA, ``aot_eager``
  on CPU) against eager: outputs and gradients, compile time, train-step speed ratio.
- ``plan``: the ratios for a plan: cached vs LoRA-in-loop; hours of a CC12M cache (12.4M rows x 2 captions), one
  stage-2 epoch of CC12M and one stage-1 epoch of CC3M (2.9M pairs) at the measured speeds, on 1 and 8 GPUs.

Steps are the trainer's own: ``LLM2CLIPTrainer.training_step`` (the stage's loss or ``GradCacheLoss``,
``accelerator.backward``), the health check the trainer runs before each optimizer step, gradient clipping, the
optimizer's step; as ``Trainer.train`` does first, activation checkpointing is switched on and model and optimizer go
through ``accelerator.prepare`` (which puts the bf16 autocast around the model's forward). Batches are built once and
reused (the trainer's collator for stage 1; for stage 2 random pixels and cached vectors in the collator's layout,
so the timing is of the device step; ``stage2_data`` measures the collator).

FLOPs are counted, not estimated: torch's FLOP formulas (``torch.utils.flop_counter``, the ones
``FlopCounterMode`` uses: matmuls, convolutions, SDPA, with SDPA on CPU registered to torch's own SDPA formula;
attention over padding counts, as it is computed) applied to every op dispatched while counting. Executed FLOPs (the
HFU numerator) are those of the first warm-up step of a configuration, whole: GradCache's extra forward and
checkpointing's recomputation included. Model FLOPs (the MFU numerator) are those of one plain forward + backward
(eval mode: no GradCache, no checkpointing, nothing recomputed) of a slice of the batch, scaled to the batch: what
autograd runs once, i.e. about 6 x parameters x tokens plus attention for the trained tower, about 4 x for the LLM
under LoRA (no weight gradients for frozen weights). MFU = model FLOPs / step time / the device's dense bf16 peak,
read from its name (H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 / GH200 989, A100 312, L40S 362, L4 121, A10G
70, B200 2250 TFLOPS; ``--peak-tflops`` overrides; none on CPU). The cache's MFU uses the FLOPs of its counted
warm-up pass.

Goals (judged on a GPU run only): stage-2 MFU >= 40 % (best EVA02 configuration), stage-1 MFU >= 35 % with the 1B
LLM (best configuration), cache builder within 1.5x of the plain forward loop (at the builder's best batch size).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import _common as bench
import torch

GIB = 1024**3
CC12M_ROWS = 12_400_000  # image-text pairs; the cache holds a short and a dense caption per row
CC3M_PAIRS = 2_900_000   # stage 1: one caption pair per row
PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peak by device name, first match wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
)
NAMES_1B, NAMES_8B = "LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned", "LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"


# --------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses; :func:`sizes` gives the real ones or ``--quick``'s tiny ones."""

    quick: bool
    eva: dict[str, Any]
    clip: dict[str, Any]
    llm_1b: dict[str, Any]
    llm_8b: dict[str, Any]
    adapter_dim: int
    check_depth: int
    check_vocab: int
    check_rows: int
    stage2_batches: tuple[int, int]
    gc_chunks: tuple[int, int]
    stage1_rows: int
    max_length: int
    short_words: tuple[int, int]
    long_words: tuple[float, float, int, int]  # mean, sd, min, max
    vocab_words: int
    cache_captions: tuple[int, int]  # 1B, 8B
    cache_batches: tuple[tuple[int, ...], tuple[int, ...]]
    data_images: int
    data_source_size: tuple[int, int]
    warmup: int = 2  # the first one FLOP-counted
    repeats: int = 3


def sizes(quick: bool) -> Sizes:
    """Real sizes (EVA02-L/14-336, ViT-L/14-336, Llama-3.2-1B, Llama-3-8B) or tiny stand-ins for ``--quick``."""
    if quick:
        tiny_llm = dict(vocab_size=1024, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)
        return Sizes(
            quick=True,
            eva=dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=170),
            clip=dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256),
            llm_1b={**tiny_llm, "hidden_size": 64}, llm_8b={**tiny_llm, "hidden_size": 96, "intermediate_size": 192},
            adapter_dim=96, check_depth=2, check_vocab=1024, check_rows=8, stage2_batches=(8, 16), gc_chunks=(4, 8),
            stage1_rows=4, max_length=64, short_words=(3, 6), long_words=(20.0, 6.0, 8, 40), vocab_words=500,
            cache_captions=(32, 16), cache_batches=((4, 16), (8,)), data_images=4, data_source_size=(48, 40),
            warmup=1, repeats=2,
        )
    llama = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, head_dim=None, rms_norm_eps=1e-5,
                 rope_theta=500000.0)
    return Sizes(
        quick=False,
        eva=dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=2730),
        clip=dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, hidden_act="quick_gelu"),
        llm_1b={**llama, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                "tie_word_embeddings": True, "head_dim": 64},
        llm_8b={**llama, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "tie_word_embeddings": False, "head_dim": 128},
        adapter_dim=4096, check_depth=4, check_vocab=32768, check_rows=16, stage2_batches=(256, 1024),
        gc_chunks=(32, 64), stage1_rows=64, max_length=512, short_words=(8, 24), long_words=(200.0, 50.0, 80, 400),
        vocab_words=8000, cache_captions=(4096, 1024), cache_batches=((32, 128, 512), (32, 256)), data_images=64,
        data_source_size=(640, 480),
    )


# --------------------------------------------------------------------------------------------- run context
@dataclass
class Context:
    """What a part gets: the device, sizes, the output, the budget, and the results of the parts before it."""

    device: torch.device
    sizes: Sizes
    out: Any
    started: float
    budget_s: float | None
    peak_tflops: float | None
    scratch: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    part: str = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s

    def emit(self, record: dict[str, Any]) -> None:
        """One JSON line to stdout and ``--out``, flushed at once."""
        line = json.dumps(record, default=_json_default)
        print(line, flush=True)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    def config(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """Emit one measured configuration of the current part and return it."""
        self.emit({"record": "config", "part": self.part, "config": name, **record})
        note(f"  {self.part}/{name}: " + ", ".join(f"{k}={_short(v)}" for k, v in record.items()))
        return {"config": name, **record}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def note(text: str) -> None:
    """Human-readable progress on stderr (stdout holds the JSON lines)."""
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- device helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` after a reset on CUDA (all tensors, the model
    included); on CPU the resident-set high-water mark's increase (``bench.PeakRSS``: only a smoke figure)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss = None if device.type == "cuda" else bench.PeakRSS()

    def start(self) -> None:
        if self.rss is None:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss.start()

    def stop(self) -> dict[str, Any]:
        if self.rss is None:
            synchronize(self.device)
            return {"peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB}
        return {"peak_memory_gib": max(0, self.rss.stop()) / GIB, "peak_memory_kind": "cpu rss increase"}


def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak TFLOPS of ``device`` and where the figure comes from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"dense bf16 peak of {key} (spec sheet), matched in the device name {name!r}"
    return None, f"unknown device {name!r}: pass --peak-tflops for MFU"


def driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


@contextmanager
def strict_fp32() -> Iterator[None]:
    """Float32 comparisons without TF32 (cuDNN convolutions use TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------------------------- FLOPs
def _register_cpu_sdpa_flops() -> None:
    """Count CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``) with torch's own SDPA formulas."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop))
    for name, formula in pairs:
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


class _FlopCount:
    """``torch.utils.flop_counter``'s formulas applied to every op dispatched while active (forward, backward and
    backward hooks; ``FlopCounterMode`` itself tracks modules too, which fails inside GradCache's
    ``autograd.grad``)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.total = 0
        self.mode = Mode()


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``fn()`` with its executed FLOPs counted (``None`` when counting failed: then it runs uncounted)."""
    _register_cpu_sdpa_flops()
    counter = _FlopCount()
    try:
        with counter.mode:
            result = fn()
    except torch.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 - counting is optional; run it plainly and say so
        note("  (FLOP counting failed; this step runs uncounted)\n" + traceback.format_exc(limit=3))
        return fn(), None
    return result, int(counter.total)


def utilisation(flops: int | None, seconds: float, peak_tflops: float | None) -> float | None:
    if flops is None or peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------- models and data
def eva_config(sizes: Sizes, depth: int | None = None):
    from llm2clip_hf import EVA02VisionConfig

    return EVA02VisionConfig(**{**sizes.eva, **({"num_hidden_layers": depth} if depth else {})})


def clip_vision_config(sizes: Sizes):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**sizes.clip, attn_implementation="sdpa")


def llama_config(spec: dict[str, Any], depth: int | None = None, vocab: int | None = None):
    from transformers import LlamaConfig

    spec = {k: v for k, v in spec.items() if v is not None}
    return LlamaConfig(**{**spec, **({"num_hidden_layers": depth} if depth else {}),
                          **({"vocab_size": vocab} if vocab else {})})


def word_tokenizer(words: int):
    """A word-level tokenizer (one token per word ``w0`` .. ``w{words-1}``) with Llama-3's special tokens: caption
    lengths in tokens are then exactly what the suite draws. BOS is added, pad = eos (``prepare_tokenizer``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<unk>"]
    vocab = {token: index for index, token in enumerate([*specials, "user", *(f"w{i}" for i in range(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", unk_token="<unk>",
                                   additional_special_tokens=specials[2:5])


def build_text_model(ctx: Context, llm_spec: dict[str, Any], name: str, dtype: torch.dtype, device=None,
                     depth: int | None = None, vocab: int | None = None, attention: str = "sdpa"):
    """An ``LLM2CLIPTextModel`` around a random Llama built directly on the device (no download), as the published
    encoder ``name`` is used (llama-3-instruct wrapper, mean pooling, max length ``sizes.max_length``)."""
    from transformers import AutoModel

    from llm2clip_hf import LLM2CLIPTextModel

    config = llama_config(llm_spec, depth, vocab)
    config._attn_implementation = attention
    with torch.device(device or ctx.device):
        llm = AutoModel.from_config(config, dtype=dtype)
    folder = ctx.scratch / name  # the published encoder's name chooses its official wrapper
    folder.mkdir(exist_ok=True)
    return LLM2CLIPTextModel.wrap_llm(llm, word_tokenizer(ctx.sizes.vocab_words), folder,
                                      max_length=ctx.sizes.max_length)


def build_clip_model(vision_config, adapter_dim: int, device, text_model=None):
    """A random ``LLM2CLIPModel`` (tower, projection to 1280, adapter for ``adapter_dim``) built on ``device``;
    with ``text_model`` embedded (``from_text_model``, for the LLM in the loop)."""
    from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel

    with torch.device(device):
        if text_model is not None:
            return LLM2CLIPModel.from_text_model(text_model, vision_config, embed_text_model=True,
                                                 projection_dim=1280)
        return LLM2CLIPModel(LLM2CLIPConfig(vision_config=vision_config, text_embedding_dim=adapter_dim,
                                            projection_dim=1280))


def caption_texts(sizes: Sizes, count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` short and ``count`` long captions of random words. Assumed length mix (not measured from the data):
    short CC3M-like captions of ``short_words`` (uniform), dense ShareCaptioner-like ones of a normal length
    (``long_words``: mean, sd, clipped to min, max); one word is one token of the suite's tokenizer."""
    rng = random.Random(seed)
    mean, sd, low, high = sizes.long_words

    def caption(length: int) -> str:
        return " ".join(f"w{rng.randrange(sizes.vocab_words)}" for _ in range(length))

    short = [caption(rng.randint(*sizes.short_words)) for _ in range(count)]
    long = [caption(int(min(high, max(low, rng.gauss(mean, sd))))) for _ in range(count)]
    return short, long


def images(count: int, size: int, seed: int) -> torch.Tensor:
    """Fixed, varied normalised pixel batches (each image its own mean, contrast and noise)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, 3, size, size, generator=generator)
    scale = 0.5 + torch.rand(count, 1, 1, 1, generator=generator)
    shift = torch.randn(count, 3, 1, 1, generator=generator)
    return base * scale + shift


def training_args(ctx: Context, stage: str, batch: int, **extra: Any):
    """``LLM2CLIPTrainingArguments`` for driving steps: bf16 autocast unless ``bf16=False``, nothing saved."""
    from llm2clip_hf.trainers import LLM2CLIPTrainingArguments

    extra.setdefault("bf16", True)
    if stage == "clip":
        extra.setdefault("image_augmentation", False)
    return LLM2CLIPTrainingArguments(
        output_dir=str(ctx.scratch / f"trainer_{stage}"), stage=stage, per_device_train_batch_size=batch,
        use_cpu=not ctx.cuda, report_to="none", save_strategy="no", disable_tqdm=True, **extra)


def stage2_batch(batch: int, image_size: int, dim: int, seed: int, device="cpu") -> dict[str, torch.Tensor]:
    """A cached stage-2 batch in the collator's layout, made on ``device``: pixels, one cached LLM vector per image,
    row indices."""
    from llm2clip_hf.data import ROW_INDEX

    generator = torch.Generator(device).manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=generator, device=device),
            "llm_embeddings": torch.randn(batch, dim, generator=generator, device=device),
            ROW_INDEX: torch.arange(batch, device=device)}


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (nested dicts included, as stage 1's ``texts``) on ``device``."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


# --------------------------------------------------------------------------------------------- trainer steps
def prepare_steps(trainer) -> None:
    """What ``Trainer.train`` does before its first step that a driven step needs: activation checkpointing as the
    arguments say, the optimizer (the trainer's: layer-wise decay in stage 2), ``accelerator.prepare`` of model and
    optimizer (on one device: the mixed-precision autocast around the model's forward), one micro-batch per step."""
    args = trainer.args
    if args.activation_checkpointing:
        trainer.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=dict(args.activation_checkpointing_kwargs or {}) or None)
    trainer.create_optimizer()
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1


def train_step(trainer, batch: dict[str, Any]) -> torch.Tensor:
    """One optimizer step as the Trainer's loop runs it: ``training_step`` (forward, loss, backward), the health
    check of ``on_pre_optimizer_step``, gradient clipping, ``optimizer.step()``, gradients cleared."""
    loss = trainer.training_step(trainer.model_wrapped, batch)
    trainer.health.check()
    trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    return loss


def release(trainer) -> None:
    """Drop a trainer's gradients, optimizer state and accelerate's references, and give the model back its own
    forward, so the next configuration starts from free memory (and may reuse the model)."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)
    trainer.accelerator.free_memory()
    trainer.optimizer, trainer.model_wrapped = None, trainer.model


def timed_steps(ctx: Context, step: Callable[[int], Any], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``step(i)`` (synchronised around each); stops early, after one, once the
    budget is spent."""
    seconds = []
    for index in range(repeats):
        synchronize(ctx.device)
        start = time.perf_counter()
        step(index)
        synchronize(ctx.device)
        seconds.append(time.perf_counter() - start)
        if ctx.out_of_time():
            break
    return seconds


def plain_step_flops(trainer, sliced: dict[str, Any]) -> int | None:
    """FLOPs of forward + backward of ``sliced`` as one plain step (the model in eval mode: no GradCache, no
    checkpointing, so nothing is recomputed; dropout does not count), gradients dropped afterwards."""
    model = trainer.model
    model.eval()

    def step() -> None:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, sliced)
        loss.backward()

    try:
        return count_flops(step)[1]
    finally:
        model.zero_grad(set_to_none=True)
        model.train()


def measure_training(ctx: Context, trainer, batches: Sequence[dict[str, Any]], sliced: dict[str, Any],
                     slice_fraction: float) -> dict[str, Any]:
    """Warm-up (the first step FLOP-counted: executed FLOPs), timed steps, peak memory and utilisation of one
    configuration. Model FLOPs: a plain step on ``sliced`` (``slice_fraction`` of the batch), scaled to the batch."""
    memory = PeakMemory(ctx.device)
    memory.start()
    prepare_steps(trainer)
    _, executed = count_flops(lambda: train_step(trainer, batches[0]))
    for index in range(1, ctx.sizes.warmup):
        train_step(trainer, batches[index % len(batches)])
    seconds = timed_steps(ctx, lambda i: train_step(trainer, batches[i % len(batches)]), ctx.sizes.repeats)
    step = bench.median(seconds)
    measured = memory.stop()
    model_flops = plain_step_flops(trainer, sliced)
    model_flops = None if model_flops is None else int(model_flops / slice_fraction)
    return {"step_s": step, "steps_timed": len(seconds), **measured, "executed_flops": executed,
            "model_flops": model_flops, "mfu": utilisation(model_flops, step, ctx.peak_tflops),
            "hfu": utilisation(executed, step, ctx.peak_tflops)}


def guarded(ctx: Context, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one configuration; an out-of-memory error (or any error) becomes its line, and the part goes on."""
    if ctx.out_of_time():
        return ctx.config(name, {"status": "skipped", "reason": "budget spent"})
    try:
        record = {"status": "ok", **run()}
    except torch.OutOfMemoryError as error:
        record = {"status": "oom", "error": str(error).splitlines()[0][:300]}
    except Exception as error:  # noqa: BLE001 - reported, the part goes on
        record = {"status": "error", "error": f"{type(error).__name__}: {error}"[:500],
                  "traceback": traceback.format_exc(limit=4)[-1500:]}
    free_memory(ctx.device)
    return ctx.config(name, record)


# --------------------------------------------------------------------------------------------- comparisons
def difference(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    reference, other = reference.detach().float().cpu(), other.detach().float().cpu()
    largest = float(reference.abs().max()) or 1.0
    return {"max_abs_diff": float((reference - other).abs().max()),
            "rel_diff": float((reference - other).abs().max()) / largest}


def ranking(reference_queries, reference_gallery, queries, gallery) -> dict[str, Any]:
    """Retrieval rankings (cosine) of ``queries`` over ``gallery`` against the reference's: top-1 agreement, share
    of queries whose whole ranking is unchanged, and the reference's smallest score gap (how close a flip was)."""
    def scores(q, g):
        q = torch.nn.functional.normalize(q.detach().float().cpu(), dim=-1)
        return q @ torch.nn.functional.normalize(g.detach().float().cpu(), dim=-1).t()

    reference, other = scores(reference_queries, reference_gallery), scores(queries, gallery)
    ref_order, order = reference.argsort(dim=1, descending=True), other.argsort(dim=1, descending=True)
    identical = (ref_order == order).all(dim=1).float().mean().item()
    gaps = reference.sort(dim=1, descending=True).values.diff(dim=1).abs()
    return {"top1_agreement": (ref_order[:, 0] == order[:, 0]).float().mean().item(),
            "identical_rankings": identical, "ranking_unchanged": identical == 1.0,
            "smallest_score_gap": float(gaps.min()), "max_score_diff": float((reference - other).abs().max())}


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot (on CPU) of the parameters' gradients, by name."""
    return {name: p.grad.detach().float().cpu() for name, p in module.named_parameters() if p.grad is not None}


def gradient_difference(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Largest gradient difference relative to the reference tensor's largest gradient, over every parameter with a
    reference gradient (a missing one counts as infinitely different)."""
    worst, name = 0.0, None
    for key, gradient in reference.items():
        relative = difference(gradient, other[key])["rel_diff"] if key in other else float("inf")
        if relative >= worst:
            worst, name = relative, key
    return {"grad_rel_diff": worst, "worst_parameter": name, "compared": len(reference)}


def losses_compared(loss: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    loss, reference = float(loss.detach()), float(reference.detach())
    return {"loss": loss, "loss_reference": reference, "loss_rel_diff": abs(loss - reference) / abs(reference)}


def sdpa_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# --------------------------------------------------------------------------------------------- parts: checks
FP32_TOLERANCE = 1e-4  # relative; float32 on two devices differs by summation order only


def part_check_tower(ctx: Context) -> dict[str, Any]:
    """EVA02 + adapter: device vs CPU (float32, bf16 ranking), SDPA fused kernels vs its math kernel."""
    sizes = ctx.sizes
    torch.manual_seed(0)
    reference = build_clip_model(eva_config(sizes, sizes.check_depth), sizes.adapter_dim, "cpu").eval()
    model = copy.deepcopy(reference).to(ctx.device)
    pixels = images(sizes.check_rows, sizes.eva["image_size"], seed=1)
    vectors = torch.randn(sizes.check_rows, sizes.adapter_dim, generator=torch.Generator().manual_seed(2))

    def features(module, device, bf16=False, math_kernel=False):
        with torch.no_grad(), autocast(torch.device(device), bf16), sdpa_math() if math_kernel else nullcontext():
            return (module.get_image_features(pixels.to(device)).float(),
                    module.get_text_features(vectors.to(device)).float())

    with strict_fp32():
        image_ref, text_ref = features(reference, "cpu")
        image_fp32, text_fp32 = features(model, ctx.device)
        image_math, _ = features(model, ctx.device, math_kernel=True)
    image_bf16, text_bf16 = features(model, ctx.device, bf16=True)
    image_bf16_math, _ = features(model, ctx.device, bf16=True, math_kernel=True)
    fp32 = difference(image_ref, image_fp32)
    attention = difference(image_math, image_fp32)
    result = {
        "shape": {"depth": sizes.check_depth, "width": sizes.eva["hidden_size"], "image": sizes.eva["image_size"],
                  "rows": sizes.check_rows},
        "fp32_vs_cpu": {**fp32, "text": difference(text_ref, text_fp32)["rel_diff"],
                        **ranking(image_ref, text_ref, image_fp32, text_fp32)},
        "bf16_vs_cpu_fp32": {**difference(image_ref, image_bf16), **ranking(image_ref, text_ref, image_bf16,
                                                                              text_bf16)},
        "sdpa_vs_math_fp32": attention,
        "sdpa_vs_math_bf16": difference(image_bf16_math, image_bf16),
    }
    result["passed"] = fp32["rel_diff"] < FP32_TOLERANCE and attention["rel_diff"] < FP32_TOLERANCE
    return result


def part_check_text(ctx: Context) -> dict[str, Any]:
    """The text encoder through ``encode``: device vs CPU (float32; bf16 weights: ranking), SDPA vs eager."""
    sizes = ctx.sizes
    torch.manual_seed(0)
    reference = build_text_model(ctx, sizes.llm_1b, NAMES_1B, torch.float32, "cpu", sizes.check_depth,
                                 sizes.check_vocab).eval()
    model = copy.deepcopy(reference).to(ctx.device)
    short, long = caption_texts(sizes, sizes.check_rows, seed=3)

    def encode(module):
        return module.encode(short, batch_size=sizes.check_rows), module.encode(long, batch_size=sizes.check_rows)

    with strict_fp32():
        short_ref, long_ref = encode(reference)
        short_dev, long_dev = encode(model)
        model.llm.set_attn_implementation("eager")
        short_eager, long_eager = encode(model)
        model.llm.set_attn_implementation("sdpa")
    model.to(torch.bfloat16)
    short_bf16, long_bf16 = encode(model)
    fp32 = difference(torch.cat([short_ref, long_ref]), torch.cat([short_dev, long_dev]))
    eager = difference(torch.cat([short_eager, long_eager]), torch.cat([short_dev, long_dev]))
    return {
        "shape": {"depth": sizes.check_depth, "width": sizes.llm_1b["hidden_size"], "rows": sizes.check_rows,
                  "tokens": [min(map(len, (s.split() for s in short))), max(map(len, (s.split() for s in long)))]},
        "fp32_vs_cpu": {**fp32, **ranking(short_ref, long_ref, short_dev, long_dev)},
        "bf16_weights_vs_cpu_fp32": {**difference(long_ref, long_bf16),
                                     **ranking(short_ref, long_ref, short_bf16, long_bf16)},
        "sdpa_vs_eager_fp32": eager,
        "passed": fp32["rel_diff"] < FP32_TOLERANCE and eager["rel_diff"] < FP32_TOLERANCE,
    }


def part_check_steps(ctx: Context) -> dict[str, Any]:
    """One stage-1 and one stage-2 trainer step on the device vs the stage's loss and backward on CPU (float32);
    stage 2 with GradCache vs without on the device."""
    from datasets import Dataset

    from llm2clip_hf.trainers import LLM2CLIPTrainer

    sizes, rows = ctx.sizes, ctx.sizes.check_rows // 4  # stage 1: 3 x rows sequences; stage 2: 2 x rows images
    result: dict[str, Any] = {}
    with strict_fp32():
        # stage 1: LoRA without dropout (CPU and CUDA draw different masks), LoRA B nonzero so every LoRA weight has
        # a gradient
        torch.manual_seed(0)
        text_model = build_text_model(ctx, sizes.llm_1b, NAMES_1B, torch.float32, "cpu", 2, sizes.check_vocab)
        short, long = caption_texts(sizes, rows * 2, seed=4)
        trainer = LLM2CLIPTrainer(model=text_model, args=training_args(ctx, "caption", rows, bf16=False,
                                                                        lora_dropout=0.0),
                                  train_dataset=Dataset.from_dict({"short_caption": short, "long_caption": long}))
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, parameter in trainer.model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        reference = copy.deepcopy(trainer.model).to("cpu")
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(trainer.model, batch)
        reference.train()
        cpu_batch = to_device(batch, torch.device("cpu"))
        reference_loss = trainer.compute_loss(reference, cpu_batch)
        reference_loss.backward()
        plain = gradients(trainer.model)
        result["stage1"] = {**losses_compared(loss, reference_loss), **gradient_difference(gradients(reference), plain)}
        # the official setting: activation checkpointing (switched on as Trainer.train does) gives the same step
        trainer.model.zero_grad(set_to_none=True)
        trainer.args.activation_checkpointing = True
        prepare_steps(trainer)
        checkpointed = trainer.training_step(trainer.model, batch)
        result["stage1_checkpointing_vs_plain"] = {**losses_compared(checkpointed, loss),
                                                   **gradient_difference(plain, gradients(trainer.model))}
        del trainer, reference, text_model
        free_memory(ctx.device)

        # stage 2, cached embeddings: device trainer vs CPU; then GradCache (chunks of 2) vs plain on the device
        torch.manual_seed(0)
        base = build_clip_model(eva_config(sizes, 2), sizes.adapter_dim, "cpu")
        batch = stage2_batch(rows * 2, sizes.eva["image_size"], sizes.adapter_dim, seed=6)
        trainers = {}
        for name, chunk in (("plain", None), ("gradcache", 2)):
            trainers[name] = LLM2CLIPTrainer(model=copy.deepcopy(base), args=training_args(
                ctx, "clip", rows * 2, bf16=False, gradcache_chunk_size=chunk))
            trainers[name].current_gradient_accumulation_steps = 1
        losses = {name: t.training_step(t.model, dict(batch)) for name, t in trainers.items()}
        base.train()
        reference_loss = trainers["plain"].compute_loss(base, batch)
        reference_loss.backward()
        result["stage2"] = {**losses_compared(losses["plain"], reference_loss),
                            **gradient_difference(gradients(base), gradients(trainers["plain"].model))}
        result["stage2_gradcache_vs_plain"] = {
            **losses_compared(losses["gradcache"], losses["plain"]),
            **gradient_difference(gradients(trainers["plain"].model), gradients(trainers["gradcache"].model))}
    result["passed"] = all(part["loss_rel_diff"] < FP32_TOLERANCE and part["grad_rel_diff"] < 1e-3
                           and part["compared"] > 0 for part in result.values())
    return result


def part_check_compile(ctx: Context) -> dict[str, Any]:
    """``torch.compile`` of the EVA02 tower vs eager: float32 outputs and gradients, bf16 outputs, compile time and
    the compiled/eager train-step speed (forward + backward of the pooled output) at the check's batch."""
    sizes = ctx.sizes
    backend = "inductor" if ctx.cuda else "aot_eager"
    torch.manual_seed(0)
    eager = build_clip_model(eva_config(sizes, sizes.check_depth), sizes.adapter_dim, ctx.device).vision_model
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    pixels = images(sizes.check_rows, sizes.eva["image_size"], seed=7).to(ctx.device)

    def train(module, bf16: bool = False) -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        with autocast(ctx.device, bf16):
            pooled = module(pixel_values=pixels).pooler_output
        pooled.float().square().mean().backward()
        return pooled.detach().float()

    with strict_fp32():
        start = time.perf_counter()
        out_compiled = train(compiled)
        synchronize(ctx.device)
        compile_s = time.perf_counter() - start
        out_eager = train(eager)
        fp32 = {**difference(out_eager, out_compiled),
                **gradient_difference(gradients(eager), gradients(compiled_model))}
    bf16_eager, bf16_compiled = train(eager, True), train(compiled, True)
    times = bench.time_interleaved({"eager": lambda: (train(eager, True), synchronize(ctx.device)),
                                    "compiled": lambda: (train(compiled, True), synchronize(ctx.device))},
                                   repeats=sizes.repeats, warmup=1)
    speed = bench.median(times["eager"]) / bench.median(times["compiled"])
    return {"backend": backend, "compile_s": compile_s, "fp32": fp32, "bf16": difference(bf16_eager, bf16_compiled),
            "compiled_over_eager_speed": speed, "shape": {"depth": sizes.check_depth, "rows": sizes.check_rows},
            "passed": fp32["rel_diff"] < 1e-3 and fp32["grad_rel_diff"] < 1e-3}


# --------------------------------------------------------------------------------------------- parts: stage 2
def stage2_configuration(ctx: Context, tower: str, batch: int, checkpointing: bool, chunk: int | None,
                         text_model=None) -> dict[str, Any]:
    """One stage-2 configuration measured on a fresh model and trainer (cached embeddings, or ``text_model`` in the
    loop with LoRA)."""
    from llm2clip_hf.trainers import LLM2CLIPTrainer

    sizes = ctx.sizes
    vision = eva_config(sizes) if tower == "eva02" else clip_vision_config(sizes)
    torch.manual_seed(0)
    model = build_clip_model(vision, sizes.adapter_dim, ctx.device, text_model)
    source = "cached" if text_model is None else "lora"
    trainer = LLM2CLIPTrainer(model=model, args=training_args(
        ctx, "clip", batch, text_source=source, gradcache_chunk_size=chunk, activation_checkpointing=checkpointing))
    try:
        if text_model is None:
            batches = [stage2_batch(batch, vision.image_size, sizes.adapter_dim, seed, ctx.device) for seed in range(2)]
        else:
            batches = [lora_stage2_batch(ctx, text_model, batch, seed) for seed in range(2)]
        rows = min(batch, chunk or 8, 8)
        measured = measure_training(ctx, trainer, batches, {k: v[:rows] for k, v in batches[0].items()},
                                    rows / batch)
    finally:
        release(trainer)
    parameters = sum(p.numel() for p in model.vision_model.parameters())
    return {"tower": tower, "text_source": source, "batch": batch, "activation_checkpointing": checkpointing,
            "gradcache_chunk": chunk, "tower_parameters": parameters,
            "images_per_s": batch / measured["step_s"], **measured}


def lora_stage2_batch(ctx: Context, text_model, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """A stage-2 batch for the LLM in the loop: pixels and one caption per image (short or dense, 50/50), tokenized
    as the collator does (``tokenize_items`` + ``collate_left_padded``, via ``text_model.tokenize``)."""
    short, long = caption_texts(ctx.sizes, batch, seed)
    rng = random.Random(seed)
    texts = [s if rng.random() < 0.5 else l for s, l in zip(short, long)]
    inputs = stage2_batch(batch, ctx.sizes.eva["image_size"], 1, seed, ctx.device)
    del inputs["llm_embeddings"]
    return {**inputs, **{k: v.to(ctx.device) for k, v in text_model.tokenize(texts).items()}}


def part_stage2(ctx: Context) -> dict[str, Any]:
    """EVA02-L/14-336 + adapter on cached embeddings at two batch sizes, with and without GradCache and activation
    checkpointing; transformers' CLIPVisionModel ViT-L/14-336 at the first batch with the first GradCache chunk."""
    small, large = ctx.sizes.stage2_batches
    chunk, big_chunk = ctx.sizes.gc_chunks
    plan = [("eva02", small, False, None), ("eva02", small, True, None), ("eva02", small, False, chunk),
            ("eva02", large, True, None), ("eva02", large, False, chunk), ("eva02", large, False, big_chunk),
            ("clip", small, False, chunk)]
    configs = {}
    for tower, batch, checkpointing, gc_chunk in plan:
        name = f"{tower}_b{batch}_" + ("ckpt" if checkpointing else "") + (f"gc{gc_chunk}" if gc_chunk else "") \
            + ("" if checkpointing or gc_chunk else "plain")
        configs[name] = guarded(ctx, name, lambda: stage2_configuration(ctx, tower, batch, checkpointing, gc_chunk))
    eva = {k: v for k, v in configs.items() if k.startswith("eva02") and v["status"] == "ok"}
    best = max(eva, key=lambda k: eva[k]["mfu"] or eva[k]["images_per_s"], default=None)
    pair = f"eva02_b{small}_gc{chunk}", f"clip_b{small}_gc{chunk}"
    ratio = None
    if all(configs[k]["status"] == "ok" for k in pair):
        ratio = configs[pair[0]]["images_per_s"] / configs[pair[1]]["images_per_s"]
    return {"configs": configs, "best": best, "best_mfu": eva[best]["mfu"] if best else None,
            "best_images_per_s": eva[best]["images_per_s"] if best else None,
            "did_not_fit": [k for k, v in configs.items() if v["status"] == "oom"],
            "eva02_over_clip_images_per_s": ratio, "ratio_pair": pair}


def part_stage2_lora_1b(ctx: Context) -> dict[str, Any]:
    """Stage 2 with the 1B LLM in the loop (LoRA, bf16 base weights) against cached embeddings: same tower, batch
    and GradCache chunk (a setting both fit in); the cached one is taken from ``stage2`` when it ran."""
    batch, chunk = ctx.sizes.stage2_batches[0], ctx.sizes.gc_chunks[0]
    torch.manual_seed(0)
    text_model = build_text_model(ctx, ctx.sizes.llm_1b, NAMES_1B, torch.bfloat16)
    lora = guarded(ctx, f"lora_b{batch}_gc{chunk}",
                   lambda: stage2_configuration(ctx, "eva02", batch, False, chunk, text_model=text_model))
    del text_model
    free_memory(ctx.device)
    earlier = ctx.results.get("stage2", {}).get("configs", {}).get(f"eva02_b{batch}_gc{chunk}")
    cached = earlier if earlier and earlier.get("status") == "ok" else guarded(
        ctx, f"cached_b{batch}_gc{chunk}", lambda: stage2_configuration(ctx, "eva02", batch, False, chunk))
    ratio = None
    if lora["status"] == "ok" and cached["status"] == "ok":
        ratio = cached["images_per_s"] / lora["images_per_s"]
    return {"lora": lora, "cached": cached, "cached_over_lora": ratio, "paper": "nearly 4x (LLM2CLIP, Llama-3-8B)"}


# --------------------------------------------------------------------------------------------- parts: stage 1
def stage1(ctx: Context, llm_spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The official stage-1 batch through the trainer's data path, activation checkpointing off then on."""
    from datasets import Dataset

    from llm2clip_hf.trainers import LLM2CLIPTrainer

    sizes = ctx.sizes
    rows = sizes.stage1_rows
    short, long = caption_texts(sizes, rows * 4, seed=8)
    data = Dataset.from_dict({"short_caption": short, "long_caption": long})
    torch.manual_seed(0)
    text_model = build_text_model(ctx, llm_spec, name, torch.bfloat16)
    parameters = text_model.llm.num_parameters()
    model, configs = text_model, {}
    for checkpointing in (False, True):
        def run() -> dict[str, Any]:
            nonlocal model
            trainer = LLM2CLIPTrainer(model=model, args=training_args(
                ctx, "caption", rows, activation_checkpointing=checkpointing), train_dataset=data)
            model = trainer.model  # the LoRA'd model, reused by the next configuration
            try:
                loader = iter(trainer.get_train_dataloader())
                batches = [next(loader) for _ in range(2)]
                measured = measure_training(ctx, trainer, batches, *stage1_slice(batches[0], 2))
            finally:
                release(trainer)
            real = sum(int(b["texts"]["attention_mask"].sum()) for b in batches) / len(batches)
            padded = sum(b["texts"]["input_ids"].numel() for b in batches) / len(batches)
            width = max(b["texts"]["input_ids"].shape[1] for b in batches)
            return {"rows": rows, "sequences": 3 * rows, "padded_width": width, "tokens_per_step": real,
                    "pad_fraction": 1 - real / padded, "tokens_per_s": real / measured["step_s"],
                    "padded_tokens_per_s": padded / measured["step_s"], "rows_per_s": rows / measured["step_s"],
                    **measured}

        label = "ckpt" if checkpointing else "no_ckpt"
        configs[label] = guarded(ctx, label, run)
    del model, text_model
    free_memory(ctx.device)
    ok = {k: v for k, v in configs.items() if v["status"] == "ok"}
    best = max(ok, key=lambda k: ok[k]["mfu"] or ok[k]["tokens_per_s"], default=None)
    return {"llm_parameters": parameters, "lora": "r16 alpha32 dropout0.05 q,k,v,o,gate,up,down",
            "base_dtype": "bfloat16", "configs": configs, "best": best,
            "best_mfu": ok[best]["mfu"] if best else None,
            "best_rows_per_s": ok[best]["rows_per_s"] if best else None,
            "did_not_fit": [k for k, v in configs.items() if v["status"] == "oom"]}


def stage1_slice(batch: dict[str, Any], rows: int) -> tuple[dict[str, Any], float]:
    """The first ``rows`` rows of every role (query, positive, negative blocks) of a stage-1 batch, and the share of
    the batch they are."""
    texts, roles = batch["texts"], batch["roles"]
    per_role = texts["input_ids"].shape[0] // len(roles)
    rows = min(rows, per_role)
    index = torch.cat([torch.arange(r * per_role, r * per_role + rows) for r in range(len(roles))])
    index = index.to(texts["input_ids"].device)
    return {"texts": {k: v[index] for k, v in texts.items()}, "roles": roles}, rows / per_role


def part_stage1_1b(ctx: Context) -> dict[str, Any]:
    return stage1(ctx, ctx.sizes.llm_1b, NAMES_1B)


def part_stage1_8b(ctx: Context) -> dict[str, Any]:
    return stage1(ctx, ctx.sizes.llm_8b, NAMES_8B)


# --------------------------------------------------------------------------------------------- parts: cache
def cache(ctx: Context, llm_spec: dict[str, Any], name: str, count: int, batch_sizes: Sequence[int],
          end_to_end: bool) -> dict[str, Any]:
    """Captions/s of the builder's embedding loop vs a plain forward loop, per batch size (bf16 weights); with
    ``end_to_end`` one ``precompute_text_embeddings`` run too."""
    from llm2clip_hf.conversion.fingerprint import text_model_fingerprint
    from llm2clip_hf.modeling.caption_tokenization import collate_left_padded

    short, long = caption_texts(ctx.sizes, count // 2, seed=9)
    texts = short + long
    torch.manual_seed(0)
    model = build_text_model(ctx, llm_spec, name, torch.bfloat16).eval()
    configs = {}
    for batch_size in batch_sizes:
        def run() -> dict[str, Any]:
            memory = PeakMemory(ctx.device)
            memory.start()
            start = time.perf_counter()
            items = model.tokenize_items(texts)  # what each shard of the builder runs
            tokenize_s = time.perf_counter() - start
            order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))  # embed_items' order
            batches = [collate_left_padded([items[i] for i in order[s:s + batch_size]],
                                           model.tokenizer.pad_token_id, ctx.device)
                       for s in range(0, len(order), batch_size)]

            def plain() -> None:
                with torch.no_grad():
                    for inputs in batches:
                        model(**inputs).text_embeds

            _, flops = count_flops(plain)  # the warm-up pass, counted
            model.embed_items(items[:batch_size], batch_size)
            plain_s = timed_steps(ctx, lambda _: plain(), 1)[0]
            synchronize(ctx.device)
            start = time.perf_counter()
            model.embed_items(model.tokenize_items(texts), batch_size)
            synchronize(ctx.device)
            builder_s = time.perf_counter() - start
            tokens = sum(len(item.input_ids) for item in items)
            return {"batch_size": batch_size, "captions": len(texts), "tokens": tokens, "tokenize_s": tokenize_s,
                    "builder_captions_per_s": len(texts) / builder_s, "plain_captions_per_s": len(texts) / plain_s,
                    "plain_over_builder": builder_s / plain_s, "builder_tokens_per_s": tokens / builder_s,
                    "forward_flops": flops, "builder_mfu": utilisation(flops, builder_s, ctx.peak_tflops),
                    "plain_mfu": utilisation(flops, plain_s, ctx.peak_tflops), **memory.stop()}

        configs[f"batch{batch_size}"] = guarded(ctx, f"batch{batch_size}", run)
    result: dict[str, Any] = {"llm_parameters": model.llm.num_parameters(), "dtype": "bfloat16", "configs": configs}
    ok = {k: v for k, v in configs.items() if v["status"] == "ok"}
    best = max(ok, key=lambda k: ok[k]["builder_captions_per_s"], default=None)
    result.update(best=best, best_captions_per_s=ok[best]["builder_captions_per_s"] if best else None,
                  plain_over_builder_at_best=ok[best]["plain_over_builder"] if best else None)
    if end_to_end and best:
        def whole() -> dict[str, Any]:
            from datasets import Dataset

            from llm2clip_hf.data import precompute_text_embeddings

            start = time.perf_counter()
            text_model_fingerprint(model)
            fingerprint_s = time.perf_counter() - start
            data = Dataset.from_dict({"short_caption": short, "long_caption": long})
            start = time.perf_counter()
            precompute_text_embeddings(data, model, ["short_caption", "long_caption"], ctx.scratch / f"cache_{name}",
                                       batch_size=ok[best]["batch_size"], show_progress_bar=False)
            seconds = time.perf_counter() - start
            return {"batch_size": ok[best]["batch_size"], "captions": len(texts), "seconds": seconds,
                    "fingerprint_s": fingerprint_s, "captions_per_s": len(texts) / seconds,
                    "captions_per_s_without_fingerprint": len(texts) / max(1e-9, seconds - fingerprint_s)}

        result["end_to_end"] = guarded(ctx, "precompute_text_embeddings", whole)
    del model
    free_memory(ctx.device)
    return result


def part_cache_1b(ctx: Context) -> dict[str, Any]:
    return cache(ctx, ctx.sizes.llm_1b, NAMES_1B, ctx.sizes.cache_captions[0], ctx.sizes.cache_batches[0], True)


def part_cache_8b(ctx: Context) -> dict[str, Any]:
    return cache(ctx, ctx.sizes.llm_8b, NAMES_8B, ctx.sizes.cache_captions[1], ctx.sizes.cache_batches[1], False)


# --------------------------------------------------------------------------------------------- parts: data, plan
def part_stage2_data(ctx: Context) -> dict[str, Any]:
    """The stage-2 collator in this process: JPEG rows -> RandomResizedCrop to the tower's size + cached vectors."""
    import io

    import numpy as np
    from PIL import Image

    from llm2clip_hf.data import EPOCH, ROW_INDEX, CLIPImageTransform, ImageTextCollator, embedding_column

    sizes, columns = ctx.sizes, ["short_caption", "long_caption"]
    width, height = sizes.data_source_size
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    rows = []
    for index in range(sizes.data_images):
        pixels = np.clip(gradient + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, ROW_INDEX: index, EPOCH: 0,
                     **{embedding_column(c): rng.standard_normal(sizes.adapter_dim, dtype=np.float32)
                        for c in columns}})
    collator = ImageTextCollator("image", columns, CLIPImageTransform(eva_config(sizes), augment=True), seed=0)
    collator(rows[:2])
    seconds = bench.median(bench.time_interleaved({"collate": lambda: collator(rows)}, repeats=3, warmup=0)["collate"])
    return {"images": len(rows), "source_size": [width, height], "image_size": sizes.eva["image_size"],
            "images_per_s_per_worker": len(rows) / seconds, "torch_threads": torch.get_num_threads()}


def _hours(items: float, per_second: float | None, gpus: int) -> float | None:
    return None if not per_second else items / (per_second * gpus) / 3600


def part_plan(ctx: Context) -> dict[str, Any]:
    """Hours at the measured speeds (scaling to 8 GPUs assumed linear) and the ratios that matter for a plan."""
    results = ctx.results

    def get(part: str, key: str) -> Any:
        return results.get(part, {}).get(key)

    stage2_speed = get("stage2", "best_images_per_s")
    lora = get("stage2_lora_1b", "lora") or {}
    lora_speed = lora.get("images_per_s") if lora.get("status") == "ok" else None
    rows = []
    for label, items, speed in (
            ("cache CC12M (24.8M captions), 1B teacher", 2 * CC12M_ROWS, get("cache_1b", "best_captions_per_s")),
            ("cache CC12M (24.8M captions), 8B teacher", 2 * CC12M_ROWS, get("cache_8b", "best_captions_per_s")),
            ("stage-2 epoch CC12M, EVA02-L/14-336, cached", CC12M_ROWS, stage2_speed),
            ("stage-2 epoch CC12M, EVA02-L/14-336, 1B LoRA in the loop", CC12M_ROWS, lora_speed),
            ("stage-1 epoch CC3M pairs, 1B LoRA", CC3M_PAIRS, get("stage1_1b", "best_rows_per_s")),
            ("stage-1 epoch CC3M pairs, 8B LoRA", CC3M_PAIRS, get("stage1_8b", "best_rows_per_s"))):
        rows.append({"job": label, "items": items, "per_s_one_gpu": speed, "hours_1_gpu": _hours(items, speed, 1),
                     "hours_8_gpus": _hours(items, speed, 8)})
    data_rate = get("stage2_data", "images_per_s_per_worker")
    note("plan (hours at the measured speeds; 8 GPUs assumed linear)\n" + bench.format_table(
        ["job", "per s (1 GPU)", "hours, 1 GPU", "hours, 8 GPUs"],
        [[r["job"], _fmt(r["per_s_one_gpu"]), _fmt(r["hours_1_gpu"]), _fmt(r["hours_8_gpus"])] for r in rows]))
    return {"table": rows, "cached_over_lora_1b": get("stage2_lora_1b", "cached_over_lora"),
            "dataloader_workers_needed": math.ceil(stage2_speed / data_rate) if stage2_speed and data_rate else None,
            "missing": [p for p in ("stage2", "stage1_1b", "stage1_8b", "cache_1b", "cache_8b", "stage2_lora_1b",
                                    "stage2_data") if results.get(p, {}).get("status") != "ok"]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# --------------------------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], dict[str, Any]]
    estimate_s: float  # on one H100, for --budget-s
    estimate_quick_s: float = 2.0


PARTS = (
    Part("check_tower", part_check_tower, 15), Part("check_text", part_check_text, 15),
    Part("check_steps", part_check_steps, 25), Part("stage2", part_stage2, 110, 6),
    Part("stage1_1b", part_stage1_1b, 40, 3), Part("cache_1b", part_cache_1b, 45),
    Part("stage2_lora_1b", part_stage2_lora_1b, 35), Part("stage1_8b", part_stage1_8b, 75, 3),
    Part("cache_8b", part_cache_8b, 35), Part("stage2_data", part_stage2_data, 10, 1),
    Part("check_compile", part_check_compile, 90, 5), Part("plan", part_plan, 0, 0),
)


def goals(ctx: Context) -> dict[str, Any]:
    """The three goals, judged on a GPU run (a CPU run's sizes prove nothing)."""
    judged = ctx.cuda and not ctx.sizes.quick
    specs = (("stage2_mfu", ctx.results.get("stage2", {}).get("best_mfu"), 0.40, True),
             ("stage1_mfu_1b", ctx.results.get("stage1_1b", {}).get("best_mfu"), 0.35, True),
             ("cache_plain_over_builder_1b", ctx.results.get("cache_1b", {}).get("plain_over_builder_at_best"), 1.5,
              False))
    found = {}
    for name, value, target, higher in specs:
        met = None if value is None or not judged else (value >= target if higher else value <= target)
        found[name] = {"value": value, "target": target, "higher_is_better": higher, "met": met}
        if value is not None:
            note("goal: " + bench.ratio_text(name, value, target, higher, unit="", quick=not judged))
    return found


def environment(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    record: dict[str, Any] = {
        "record": "env", "device": str(ctx.device), "quick": ctx.sizes.quick, "budget_s": ctx.budget_s,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:],
        "precision": "bf16 autocast; trained weights float32 (stage-2 tower, projection, adapter; LoRA); "
                     "LLM base weights bfloat16 (stage 1, cache, LLM in the loop); checks in float32 without TF32",
        "peak_bf16_tflops": ctx.peak_tflops, "peak_source": device_peak_tflops(ctx.device, args.peak_tflops)[1],
    }
    if ctx.cuda:
        properties = torch.cuda.get_device_properties(ctx.device)
        record.update(device_name=properties.name, capability=f"{properties.major}.{properties.minor}",
                      memory_gib=properties.total_memory / GIB, driver=driver_version(),
                      cudnn=torch.backends.cudnn.version())
    else:
        record.update(device_name=platform.processor() or platform.machine(), driver=None)
    return record


def run_part(ctx: Context, part: Part, inject_failure: str | None) -> dict[str, Any]:
    """Run one part; its line says ok (with its results), error (with the error) or skipped (why)."""
    estimate = part.estimate_quick_s if ctx.sizes.quick else part.estimate_s
    if estimate > 0 and ctx.budget_s is not None and ctx.elapsed() + estimate > ctx.budget_s:  # plan: free
        return {"status": "skipped", "seconds": 0.0, "reason": f"budget: {ctx.elapsed():.0f} s used of "
                                                               f"{ctx.budget_s:.0f} s, the part needs about "
                                                               f"{estimate:.0f} s"}
    ctx.part = part.name
    start = time.perf_counter()
    try:
        if inject_failure == part.name:
            raise RuntimeError(f"failure injected into {part.name} (--inject-failure)")
        record = {"status": "ok", **part.run(ctx)}
    except Exception as error:  # noqa: BLE001 - a failing part is reported and the suite goes on
        kind = "oom" if isinstance(error, torch.OutOfMemoryError) else "error"
        record = {"status": kind, "error": f"{type(error).__name__}: {error}"[:1000],
                  "traceback": traceback.format_exc(limit=6)[-3000:]}
    free_memory(ctx.device)
    record["seconds"] = time.perf_counter() - start
    return record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE (appended, flushed per line)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the parts that no longer fit in this many seconds (each says so)")
    parser.add_argument("--parts", default=None,
                        help=f"comma-separated subset, in suite order: {','.join(p.name for p in PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, e.g. on CPU)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    parser.add_argument("--inject-failure", metavar="PART", default=None,
                        help="make PART raise at its start (checks that the suite goes on)")
    args = parser.parse_args(argv)
    names = [p.name for p in PARTS]
    chosen = names if args.parts is None else [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {names}")
    args.parts = [n for n in names if n in chosen]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench.quiet()
    logging.getLogger("llm2clip_hf").setLevel(logging.ERROR)  # the wrapper / small-LLM notices of every build
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = open(args.out, "a", encoding="utf-8") if args.out else None  # noqa: SIM115 - closed below
    ctx = Context(device=device, sizes=sizes(args.quick), out=out, started=STARTED, budget_s=args.budget_s,
                  peak_tflops=device_peak_tflops(device, args.peak_tflops)[0], scratch=bench.scratch_dir())
    try:
        ctx.emit(environment(ctx, args))
        for part in (p for p in PARTS if p.name in args.parts):
            note(f"part {part.name} (at {ctx.elapsed():.0f} s)")
            record = run_part(ctx, part, args.inject_failure)
            ctx.results[part.name] = record
            ctx.emit({"record": "part", "part": part.name, **record})
            note(f"part {part.name}: {record['status']} in {record['seconds']:.1f} s"
                 + (f" ({record.get('error') or record.get('reason')})" if record["status"] != "ok" else ""))
        by_status: dict[str, list[str]] = {}
        for name, record in ctx.results.items():
            by_status.setdefault(record["status"], []).append(name)
        ctx.emit({"record": "summary", "wall_s": ctx.elapsed(), "ok": by_status.get("ok", []),
                  "failed": by_status.get("error", []) + by_status.get("oom", []),
                  "skipped": by_status.get("skipped", []), "goals": goals(ctx)})
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
