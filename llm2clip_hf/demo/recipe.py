"""`llm2clip-hf demo`: the whole LLM2CLIP recipe, offline, on a real LLM and real images, in minutes on a CPU.

SmolLM2-135M-Instruct is made bidirectional and caption-tuned (stage 1); a small EVA02 then learns against the cached
caption embeddings of the raw LLM and, with the same seeds, of the stage-1 LLM (stage 2), and both CLIPs are
measured side by side on held-out emoji: retrieval with short captions, with long captions beyond CLIP's 77 tokens
and across languages, zero-shot classification and CRA. The stage-1 CLIP is saved and reloaded with remote code to
classify an image.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset

from .emoji_dataset import load_emoji_dataset
from .report import results_table, retrieval_keys, summarize, write_report_png
from ..evaluation import embed_images, evaluate_caption_retrieval, evaluate_retrieval, evaluate_zero_shot
from ..conversion.model_loading import load_text_model
from ..modeling import EVA02VisionConfig, LLM2CLIPModel, LLM2CLIPTextModel
from ..trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from ..data import precompute_text_embeddings

SHORT, LONG, DENSE = "short_caption", "long_caption", "dense_caption"
LANGUAGES = ("caption_fr", "caption_de", "caption_es", "caption_zh")  # CLDR's translations of the English names
ZERO_SHOT_TEMPLATES = ("{}", "an emoji of {}", "a small icon showing {}")


@dataclass
class DemoArguments:
    output_dir: str = field(default="llm2clip-demo", metadata={"help": "Where models, metrics and the report go."})
    text_model: str | None = field(default=None, metadata={
        "help": "LLM to use (default: SmolLM2-135M-Instruct, offline asset or Hub id)."})
    smoke: bool = field(default=False, metadata={
        "help": "A seconds-long check of the whole pipeline: tiny random LLM, few images, few steps."})
    stage1_steps: int = field(default=40, metadata={"help": "Stage-1 optimizer steps."})
    stage1_batch_size: int = field(default=16, metadata={"help": "Caption pairs per stage-1 step."})
    stage1_learning_rate: float | None = field(default=None, metadata={
        "help": "Stage-1 learning rate (LoRA). Default: the trainer's (2e-3 for LLMs under 1B parameters). 4e-3 "
                "for 20 steps, the previous demo's choice, made a teacher worse than the raw LLM (docs/results.md)."})
    stage1_loss_centering: bool = field(default=False, metadata={
        "help": "Center the stage-1 loss (the trainer's small-LLM default since it prevented the collapse of raw "
                "SmolLM2 on WordNet pairs). Off here: the demo's published figures were measured with the plain "
                "loss, and the centered loss has not been re-measured on the demo yet (docs/results.md)."})
    stage2_steps: int = field(default=300, metadata={"help": "Stage-2 optimizer steps (each teacher, each seed)."})
    stage2_batch_size: int = field(default=64, metadata={"help": "Images per stage-2 step."})
    stage2_learning_rate: float = field(default=5e-4, metadata={"help": "Stage-2 learning rate (tiny EVA02)."})
    adapter_input_normalization: str | None = field(default="center", metadata={
        "help": "The new adapter's input normalisation: center (subtract the training embeddings' mean; measured "
                "better for both teachers, docs/results.md), standardize, or none (the official adapter)."})
    stage2_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "Seeds of the stage-2 runs: each trains one CLIP on the raw LLM's and one on the stage-1 LLM's "
                "embeddings (same tower init, batches and crops), so the teachers are compared seed by seed."})
    max_length: int = field(default=192, metadata={"help": "Token budget per caption (the dense captions need ~150)."})
    llava_alignment: bool = field(default=False, metadata={
        "help": "Also run LLaVA's feature alignment (projector only, frozen tower and LLM) on every stage-2 tower and "
                "an untrained one, seed by seed: held-out name perplexity and choice accuracy (docs/llava.md)."})
    llava_steps: int = field(default=150, metadata={"help": "Feature-alignment steps per tower and seed."})
    llava_batch_size: int = field(default=16, metadata={"help": "Images per feature-alignment step."})
    llava_learning_rate: float = field(default=1e-3, metadata={"help": "Projector learning rate (LLaVA-1.5's)."})
    llava_choices: int = field(default=8, metadata={"help": "Names ranked per held-out image (1 true)."})
    seed: int = field(default=0, metadata={"help": "Seed of stage 1 and of the data."})


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
        from ..testing import make_tiny_llm

        return load_text_model(str(make_tiny_llm(out / "tiny_llm")), max_length=args.max_length)
    return load_text_model(args.text_model, max_length=args.max_length)


def _losses(trainer: LLM2CLIPTrainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def _common_args(args: DemoArguments, directory: Path, logging_steps: int, seed: int,
                 **settings: Any) -> LLM2CLIPTrainingArguments:
    return LLM2CLIPTrainingArguments(
        output_dir=str(directory), save_strategy="no", logging_steps=logging_steps, seed=seed,
        dataloader_drop_last=True, report_to="none", **settings,
    )


def run(args: DemoArguments) -> dict[str, Any]:
    """Run the demo; return the metrics (also written to OUTPUT_DIR/metrics.json, with report.png).

    Stage 1 tunes the LLM; then stage 2 trains the same small EVA02 twice per seed, on the raw LLM's cached
    embeddings and on the stage-1 LLM's, and evaluates both the same way: retrieval on the held-out emoji with
    their short + long captions, with the dense captions (beyond CLIP's 77 tokens), and with the French, German,
    Spanish and Chinese names (English-only training), zero-shot category classification, and CRA."""
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - since, 1)
        return time.perf_counter()

    device = PartialState().device  # the GPU when there is one
    t = time.perf_counter()
    train, test = emoji_splits(args.smoke)
    llm = _text_model(args, out).to(device)
    text_model_name = str(llm.name_or_path)
    t = lap("load", t)
    categories = sorted(set(test["category"]))
    per_seed: dict[str, list[dict[str, float]]] = {}
    towers: dict[str, list[dict[str, torch.Tensor]]] = {}  # each teacher's stage-2 towers, seed by seed
    losses: dict[str, list[tuple[int, float]]] = {}
    cra: dict[str, float] = {}

    def stage2_on(name: str, teacher: LLM2CLIPTextModel) -> LLM2CLIPModel | None:
        """Stage 2 on ``teacher``'s cached embeddings, seed by seed; the first seed's model (saved for "tuned")."""
        nonlocal t
        cra[name] = evaluate_caption_retrieval(teacher, test, [SHORT, LONG])["cra"]
        cache = out / "_embedding_cache" / name
        cached_train = precompute_text_embeddings(train, teacher, [SHORT, LONG], cache / "train")
        cached_test = precompute_text_embeddings(test, teacher, [SHORT, LONG, DENSE, *LANGUAGES], cache / "test")
        t = lap("cache", t)
        per_seed[name], towers[name], first = [], [], None
        for seed in args.stage2_seeds:
            trainer = _train_clip(args, teacher, cached_train, seed, out / f"stage2_{name}_seed{seed}")
            towers[name].append({k: v.detach().cpu().clone() for k, v in trainer.model.vision_model.state_dict().items()})
            per_seed[name].append({"cra": cra[name], **clip_metrics(trainer.model, cached_test, teacher, test,
                                                                     categories)})
            if seed == args.stage2_seeds[0]:
                losses[name], first = _losses(trainer), trainer.model
                if name == "tuned":  # the model to share: saved with its LLM, reloaded below
                    trainer.save_model(str(out / "stage2"))
            t = lap("stage2", t)
        return first

    # One LLM in memory at a time (demo peak = stage-1 training's): the raw LLM teaches its stage 2 first, then
    # stage 1 trains that same model, whose merged save is loaded as the other teacher once it is gone.
    stage2_on("raw", llm)

    # ---- stage 1: caption contrastive fine-tuning of the LLM
    stage1_args = _common_args(
        args, out / "stage1", 1, args.seed, stage="caption", caption_columns=[SHORT, LONG],
        max_steps=2 if args.smoke else args.stage1_steps,
        per_device_train_batch_size=8 if args.smoke else args.stage1_batch_size,
        loss_centering=args.stage1_loss_centering,
        **({} if args.stage1_learning_rate is None else {"learning_rate": args.stage1_learning_rate}),
    )
    stage1 = LLM2CLIPTrainer(model=llm, args=stage1_args, train_dataset=train)
    stage1.train()
    peak_through_stage1 = peak_rss_gib()  # stage 1's training is meant to be the demo's peak
    stage1.save_model()
    losses["stage1"] = _losses(stage1)
    del stage1, llm  # the trained LLM, its LoRA and optimizer: only the saved encoder is used from here
    gc.collect()
    t = lap("stage1", t)
    tuned = LLM2CLIPTextModel.from_pretrained(out / "stage1").to(device)  # the merged, saved encoder
    saved = stage2_on("tuned", tuned)
    del tuned
    gc.collect()

    # ---- reload with remote code only, check it is the same model, answer a zero-shot query
    from transformers import AutoModel, pipeline

    reloaded = AutoModel.from_pretrained(out / "stage2", trust_remote_code=True).to(device)
    probe = test.select(range(min(8, len(test))))
    reload_difference = (embed_images(reloaded, probe["image"]) - embed_images(saved, probe["image"])).abs().max()
    del reloaded
    gc.collect()
    classify = pipeline("zero-shot-image-classification", model=str(out / "stage2"), trust_remote_code=True,
                        device=device)
    query_row = test[0]
    candidates = sorted({query_row["name"], *test.select(range(1, min(len(test), 6)))["name"]})
    answer = classify(query_row["image"], candidate_labels=candidates)
    t = lap("reload", t)
    stage1_loss = losses.pop("stage1")
    llava = llava_alignment(args, out, towers, train, test) if args.llava_alignment else None
    if llava is not None:
        lap("llava", t)

    metrics = {
        "text_model": text_model_name, "train_rows": len(train), "test_rows": len(test),
        "stage2_seeds": list(args.stage2_seeds), "summary": summarize(per_seed), "per_seed": per_seed,
        "chance": chance_levels(len(test), len(categories)),
        "long_caption_words": caption_words(test[DENSE]),
        "zero_shot_query": {"emoji": query_row["emoji"], "truth": query_row["name"], "answer": answer[0]["label"],
                            "scores": {a["label"]: round(a["score"], 4) for a in answer}},
        "reload_max_abs_difference": float(reload_difference),
        **({"llava_alignment": llava} if llava is not None else {}),
        "stage1_loss": stage1_loss, "stage2_loss": losses, "seconds": timings,
        "total_seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
        "peak_rss_gib_through_stage1": round(peak_through_stage1, 2),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report_png(metrics, out / "report.png")
    print(results_table(metrics))
    return {"output_dir": str(out), "metrics": str(out / "metrics.json"), "report": str(out / "report.png")}


def llava_alignment(args: DemoArguments, out: Path, towers: dict[str, list[dict[str, torch.Tensor]]], train: Dataset,
                    test: Dataset) -> dict[str, Any]:
    """LLaVA's feature alignment on an untrained tower and on each teacher's stage-2 tower, seed by seed (same
    projector initialisation and batches per seed): per-seed metrics and their summary with paired differences."""
    from .llava_alignment import LlavaAlignment, load_causal_lm, untrained_tower_state

    vision_config = tiny_eva02(args.smoke)
    alignment = LlavaAlignment(vision_config, *load_causal_lm(args.text_model, args.smoke, out))
    steps = 2 if args.smoke else args.llava_steps
    per_seed: dict[str, list[dict[str, float]]] = {"untrained": [], "raw": [], "tuned": []}
    for index, seed in enumerate(args.stage2_seeds):
        states = {"untrained": untrained_tower_state(vision_config, seed), "raw": towers["raw"][index],
                  "tuned": towers["tuned"][index]}
        for name, state in states.items():
            loss = alignment.align(state, seed, train, steps, 8 if args.smoke else args.llava_batch_size,
                                   args.llava_learning_rate, out / f"llava_{name}_seed{seed}")
            per_seed[name].append({**alignment.evaluate(test, args.llava_choices, seed), "final_loss": loss[-1]})
    return {"per_seed": per_seed, "summary": summarize(per_seed, (("tuned", "raw"), ("raw", "untrained"), ("tuned", "untrained"))), "choices": args.llava_choices,
            "steps": steps}


def _train_clip(args: DemoArguments, teacher: LLM2CLIPTextModel, cached_train: Dataset, seed: int,
                directory: Path) -> LLM2CLIPTrainer:
    """Stage 2 of one seed: a new small EVA02 + adapter trained against ``teacher``'s cached embeddings (trained
    without the LLM; a final save embeds it)."""
    torch.manual_seed(seed)
    normalization = None if args.adapter_input_normalization in (None, "none") else args.adapter_input_normalization
    model = LLM2CLIPModel.from_text_model(teacher, tiny_eva02(args.smoke), embed_text_model=False,
                                          projection_dim=64 if args.smoke else 256,
                                          adapter_input_normalization=normalization)
    stage2_args = _common_args(
        args, directory, 1 if args.smoke else 5, seed, stage="clip", caption_columns=[SHORT, LONG],
        max_steps=3 if args.smoke else args.stage2_steps,
        per_device_train_batch_size=16 if args.smoke else args.stage2_batch_size,
        learning_rate=args.stage2_learning_rate, warmup_steps=0 if args.smoke else 20, weight_decay=0.05,
        layer_decay=0.9,
    )
    trainer = LLM2CLIPTrainer(model=model, args=stage2_args, train_dataset=cached_train, text_model=teacher,
                              text_model_on_save=teacher)
    trainer.train()
    return trainer


def clip_metrics(model: LLM2CLIPModel, cached_test: Dataset, teacher: LLM2CLIPTextModel, test: Dataset,
                 categories: list[str]) -> dict[str, float]:
    """One stage-2 model on the held-out emoji: retrieval with the short + long captions (one gallery), with the
    dense captions alone (``long_...``), with each translation alone (``cross_lingual_...``: their mean, and each
    language's), and zero-shot category top-1 with ``teacher`` embedding the prompts."""
    english = evaluate_retrieval(model, cached_test, "image", [SHORT, LONG])
    per_column = evaluate_retrieval(model, cached_test, "image", [DENSE, *LANGUAGES], text_model=teacher,
                                    per_column=True)
    metrics = {key: english[key] for key in retrieval_keys()}
    metrics.update({f"long_{key}": per_column[f"{DENSE}/{key}"] for key in retrieval_keys()})
    for key in retrieval_keys():
        values = [per_column[f"{language}/{key}"] for language in LANGUAGES]
        metrics[f"cross_lingual_{key}"] = sum(values) / len(values)
        metrics.update({f"{language}_{key}": value for language, value in zip(LANGUAGES, values)})
    zero_shot = evaluate_zero_shot(model, test, "image", "category", class_names=categories,
                                   templates=ZERO_SHOT_TEMPLATES, text_model=teacher)
    metrics["zero_shot_top1"] = zero_shot["zeroshot_top1"]
    return metrics


def chance_levels(num_images: int, num_classes: int) -> dict[str, float]:
    """The expected metrics of a model whose embeddings carry no information (what a collapsed one scores)."""
    def hit(k: int, correct: int, candidates: int) -> float:  # P(a correct one among k drawn without replacement)
        return 100.0 * (1.0 - math.comb(candidates - correct, k) / math.comb(candidates, k)) if k < candidates else 100.0

    chance = {"cra": 100.0 / num_images, "zero_shot_top1": 100.0 / num_classes}
    for k in (1, 5, 10):
        chance[f"image_to_text_R@{k}"] = hit(k, 2, 2 * num_images)  # two captions per image in one gallery
        for prefix in ("", "long_", "cross_lingual_"):
            chance[f"{prefix}text_to_image_R@{k}"] = hit(k, 1, num_images)
        for prefix in ("long_", "cross_lingual_"):
            chance[f"{prefix}image_to_text_R@{k}"] = hit(k, 1, num_images)
    return chance


def caption_words(texts: list[str]) -> dict[str, float]:
    """Word counts of the dense captions (each word is at least one CLIP token)."""
    words = sorted(len(text.split()) for text in texts)
    return {"min": words[0], "median": words[len(words) // 2], "max": words[-1]}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
