"""`llm2clip-hf demo`: the whole LLM2CLIP recipe, offline, on a real LLM and real images, in minutes on a CPU.

SmolLM2-135M-Instruct is made bidirectional and caption-tuned (stage 1; caption retrieval accuracy before and after
on held-out emoji), its embeddings of the emoji captions are cached, a small EVA02 learns against them (stage 2;
retrieval on held-out emoji next to chance), and the saved model is reloaded with remote code to classify an image.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset

from .demo_data import load_emoji_dataset
from .evaluation import embed_images, evaluate_caption_retrieval, evaluate_retrieval, evaluate_zero_shot
from .model_loading import load_text_model
from .modeling import EVA02VisionConfig, LLM2CLIPModel, LLM2CLIPTextModel
from .trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from .data import precompute_text_embeddings

SHORT, LONG = "short_caption", "long_caption"
ZERO_SHOT_TEMPLATES = ("{}", "an emoji of {}", "a small icon showing {}")


@dataclass
class DemoArguments:
    output_dir: str = field(default="llm2clip-demo", metadata={"help": "Where models, metrics and the report go."})
    text_model: str | None = field(default=None, metadata={
        "help": "LLM to use (default: SmolLM2-135M-Instruct, offline asset or Hub id)."})
    smoke: bool = field(default=False, metadata={
        "help": "A seconds-long check of the whole pipeline: tiny random LLM, few images, few steps."})
    stage1_steps: int = field(default=20, metadata={"help": "Stage-1 optimizer steps."})
    stage1_batch_size: int = field(default=16, metadata={"help": "Caption pairs per stage-1 step."})
    stage1_learning_rate: float = field(default=4e-3, metadata={
        "help": "Stage-1 learning rate (LoRA): twice the small-LLM default, to show the jump in 20 steps (README)."})
    stage2_steps: int = field(default=300, metadata={"help": "Stage-2 optimizer steps."})
    stage2_batch_size: int = field(default=64, metadata={"help": "Images per stage-2 step."})
    stage2_learning_rate: float = field(default=5e-4, metadata={"help": "Stage-2 learning rate (tiny EVA02)."})
    max_length: int = field(default=64, metadata={"help": "Token budget per caption."})
    seed: int = field(default=0, metadata={"help": "Seed of everything random."})


def emoji_splits(smoke: bool) -> tuple[Dataset, Dataset]:
    """Train and held-out emoji: the CLDR name as short caption, a sentence with its keywords as long caption."""
    splits = load_emoji_dataset()
    train, test = splits["train"], splits["test"]
    if smoke:
        train, test = train.select(range(48)), test.select(range(16))
    return train, test


def tiny_eva02(smoke: bool) -> EVA02VisionConfig:
    """A small EVA02 trained from scratch on emoji downscaled to 32 pixels (official layout; width 128, 3 blocks,
    2 heads of 64): small enough to learn in a few hundred CPU steps.

    Its projection head starts at the full truncated-normal scale (``head_init_scale=1``): eva_clip's 0.001 suits
    pretraining for many thousands of steps; from scratch in 300 steps it left held-out image->text R@5 at 1.3 %
    (chance 1.1 %) instead of 8.9 %."""
    if smoke:
        return EVA02VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=1, intermediate_size=170, head_init_scale=1.0)
    return EVA02VisionConfig(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=341, head_init_scale=1.0)


def _text_model(args: DemoArguments, out: Path) -> LLM2CLIPTextModel:
    if args.smoke and args.text_model is None:
        from .testing import make_tiny_llm

        return load_text_model(str(make_tiny_llm(out / "tiny_llm")), max_length=args.max_length)
    return load_text_model(args.text_model, max_length=args.max_length)


def _losses(trainer: LLM2CLIPTrainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def _common_args(args: DemoArguments, directory: Path, logging_steps: int,
                 **settings: Any) -> LLM2CLIPTrainingArguments:
    return LLM2CLIPTrainingArguments(
        output_dir=str(directory), save_strategy="no", logging_steps=logging_steps,
        seed=args.seed, dataloader_drop_last=True, **settings,
    )


def run(args: DemoArguments) -> dict[str, Any]:
    """Run the demo; return the metrics (also written to OUTPUT_DIR/metrics.json, with report.png)."""
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    device = PartialState().device  # the GPU when there is one
    t = time.perf_counter()
    train, test = emoji_splits(args.smoke)
    text_model = _text_model(args, out).to(device)
    t = lap("load", t)

    # ---- stage 1: caption contrastive fine-tuning, CRA on held-out pairs before and after
    cra_before = evaluate_caption_retrieval(text_model, test, [SHORT, LONG])
    stage1_args = _common_args(
        args, out / "stage1", 1, stage="caption", caption_columns=[SHORT, LONG],
        max_steps=2 if args.smoke else args.stage1_steps,
        per_device_train_batch_size=8 if args.smoke else args.stage1_batch_size,
        learning_rate=args.stage1_learning_rate,
    )
    stage1 = LLM2CLIPTrainer(model=text_model, args=stage1_args, train_dataset=train)
    stage1.train()
    stage1.save_model()
    tuned = LLM2CLIPTextModel.from_pretrained(out / "stage1").to(device)  # the merged, saved encoder
    cra_after = evaluate_caption_retrieval(tuned, test, [SHORT, LONG])
    t = lap("stage1", t)

    # ---- cache: LLM embeddings of both caption columns, on disk, keyed by the tuned encoder
    cached_train = precompute_text_embeddings(train, tuned, [SHORT, LONG], out / "_embedding_cache" / "train")
    cached_test = precompute_text_embeddings(test, tuned, [SHORT, LONG], out / "_embedding_cache" / "test")
    t = lap("cache", t)

    # ---- stage 2: a small EVA02 + adapter against the cached embeddings
    torch.manual_seed(args.seed)
    model = LLM2CLIPModel.from_text_model(tuned, tiny_eva02(args.smoke), embed_text_model=False,
                                          projection_dim=64 if args.smoke else 256)
    retrieval_before = evaluate_retrieval(model, cached_test, "image", [SHORT, LONG])
    stage2_args = _common_args(
        args, out / "stage2", 1 if args.smoke else 5, stage="clip", caption_columns=[SHORT, LONG],
        max_steps=3 if args.smoke else args.stage2_steps,
        per_device_train_batch_size=16 if args.smoke else args.stage2_batch_size,
        learning_rate=args.stage2_learning_rate, warmup_steps=0 if args.smoke else 20, weight_decay=0.05,
        layer_decay=0.9,
    )
    stage2 = LLM2CLIPTrainer(model=model, args=stage2_args, train_dataset=cached_train, text_model=tuned,
                             text_model_on_save=tuned)  # trained without the LLM, saved with it
    stage2.train()
    retrieval_after = evaluate_retrieval(model, cached_test, "image", [SHORT, LONG])
    stage2.save_model()
    t = lap("stage2", t)

    # ---- reload with remote code only, check it is the same model, answer a zero-shot query
    from transformers import AutoModel, pipeline

    reloaded = AutoModel.from_pretrained(out / "stage2", trust_remote_code=True).to(device)
    probe = test.select(range(min(8, len(test))))
    reload_difference = (embed_images(reloaded, probe["image"]) - embed_images(model, probe["image"])).abs().max()
    categories = sorted(set(test["category"]))
    zero_shot = evaluate_zero_shot(reloaded, test, "image", "category", class_names=categories,
                                   templates=ZERO_SHOT_TEMPLATES)
    classify = pipeline("zero-shot-image-classification", model=str(out / "stage2"), trust_remote_code=True,
                        device=device)
    query_row = test[0]
    candidates = sorted({query_row["name"], *test.select(range(1, min(len(test), 6)))["name"]})
    answer = classify(query_row["image"], candidate_labels=candidates)
    lap("reload", t)

    chance = {k: min(100.0, 100.0 * k / (2 * len(test))) for k in (1, 5, 10)}
    metrics = {
        "text_model": str(text_model.name_or_path), "train_rows": len(train), "test_rows": len(test),
        "cra_before": cra_before["cra"], "cra_after": cra_after["cra"], "chance_cra": 100.0 / len(test),
        "retrieval_before": retrieval_before, "retrieval_after": retrieval_after,
        "chance_image_to_text_R@k": chance,
        "chance_text_to_image_R@k": {k: min(100.0, 100.0 * k / len(test)) for k in (1, 5, 10)},
        "zero_shot_category": zero_shot, "chance_zero_shot_top1": 100.0 / len(categories),
        "zero_shot_query": {"emoji": query_row["emoji"], "truth": query_row["name"], "answer": answer[0]["label"],
                            "scores": {a["label"]: round(a["score"], 4) for a in answer}},
        "reload_max_abs_difference": float(reload_difference),
        "stage1_loss": _losses(stage1), "stage2_loss": _losses(stage2), "seconds": timings,
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report_png(metrics, out / "report.png")
    print(results_table(metrics))
    return {"output_dir": str(out), "metrics": str(out / "metrics.json"), "report": str(out / "report.png")}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def results_table(metrics: dict[str, Any]) -> str:
    """The terminal summary: each measured number next to its reference (before training, or chance)."""
    before, after = metrics["retrieval_before"], metrics["retrieval_after"]
    rows = [("caption retrieval accuracy (held-out pairs)", metrics["cra_before"], metrics["cra_after"],
             metrics["chance_cra"])]
    for direction in ("image_to_text", "text_to_image"):
        chance = metrics[f"chance_{direction}_R@k"]
        for k in (1, 5, 10):
            key = f"{direction}_R@{k}"
            rows.append((f"{direction.replace('_', ' ')} R@{k} (held-out)", before[key], after[key], chance[k]))
    rows.append(("zero-shot category top-1 (reloaded)", None, metrics["zero_shot_category"]["zeroshot_top1"],
                 metrics["chance_zero_shot_top1"]))
    width = max(len(r[0]) for r in rows)
    fmt = lambda v: "   -  " if v is None else f"{v:6.1f}"  # noqa: E731
    lines = [f"{'metric (%)':{width}s}  before   after  chance", "-" * (width + 24)]
    lines += [f"{name:{width}s}  {fmt(b)}  {fmt(a)}  {fmt(c)}" for name, b, a, c in rows]
    query = metrics["zero_shot_query"]
    lines += ["", f"zero-shot query {query['emoji']} (truth: {query['truth']}) -> {query['answer']}",
              f"reloaded vs in-memory image features, max |diff|: {metrics['reload_max_abs_difference']:.2e}",
              f"time (s): {metrics['seconds']}, total {metrics['total_seconds']}; peak RSS "
              f"{metrics['peak_rss_gib']} GiB"]
    return "\n".join(lines)


def write_report_png(metrics: dict[str, Any], path: Path) -> None:
    """Loss curves of both stages and the metrics against their references, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, key, title in ((axes[0], "stage1_loss", "stage 1 (caption contrastive) loss"),
                             (axes[1], "stage2_loss", "stage 2 (CLIP) loss")):
        steps = [s for s, _ in metrics[key]]
        axis.plot(steps, [v for _, v in metrics[key]], marker="o", markersize=3)
        axis.set(title=title, xlabel="step", ylabel="loss")
    names = ["CRA", "I->T R@1", "I->T R@5", "T->I R@1", "T->I R@5", "zero-shot"]
    after, before, chance = metrics["retrieval_after"], metrics["retrieval_before"], metrics
    values_after = [metrics["cra_after"], after["image_to_text_R@1"], after["image_to_text_R@5"],
                    after["text_to_image_R@1"], after["text_to_image_R@5"],
                    metrics["zero_shot_category"]["zeroshot_top1"]]
    values_before = [metrics["cra_before"], before["image_to_text_R@1"], before["image_to_text_R@5"],
                     before["text_to_image_R@1"], before["text_to_image_R@5"], math.nan]
    values_chance = [metrics["chance_cra"], chance["chance_image_to_text_R@k"][1], chance["chance_image_to_text_R@k"][5],
                     chance["chance_text_to_image_R@k"][1], chance["chance_text_to_image_R@k"][5],
                     chance["chance_zero_shot_top1"]]
    positions = range(len(names))
    for offset, values, label in ((-0.27, values_chance, "chance"), (0.0, values_before, "before training"),
                                  (0.27, values_after, "after training")):
        axes[2].bar([p + offset for p in positions], values, width=0.27, label=label)
    axes[2].set_xticks(list(positions), names, rotation=30)
    axes[2].set(title="held-out metrics (%)", ylim=(0, 100))
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
