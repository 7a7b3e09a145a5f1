"""Model card (README.md) for models trained by :class:`LLM2CLIPTrainer`."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import CLIPVisionConfig, PretrainedConfig, PreTrainedModel, SiglipVisionConfig
from transformers.trainer_utils import has_length

from ..modeling import EVA02VisionConfig, LLM2CLIPTextModel
from .training_args import MNTP_STAGE, TEXT_STAGES

_HYPERPARAMETERS = (
    "stage", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
    "loss_scale", "hard_negatives", "lora_r", "lora_alpha", "lora_dropout", "caption_columns",
    "caption_sampling_weights", "mlm_probability", "text_source", "loss_type", "layer_decay", "logit_scale_max",
    "image_augmentation",
)

_TOWER_NAMES = {
    EVA02VisionConfig.model_type: "EVA02",
    CLIPVisionConfig.model_type: "OpenAI-CLIP ViT (transformers CLIPVisionModel)",
    SiglipVisionConfig.model_type: "SigLIP",
}
_TOWER_SIZES = (("width", "hidden_size"), ("depth", "num_hidden_layers"), ("image", "image_size"),
                ("patch", "patch_size"))
_POOLING = {
    "mean": "mean-pooled over the caption tokens",
    "weighted_mean": "weighted-mean-pooled over the caption tokens with llm2vec's position weights",
    "eos_token": "the hidden state of the EOS token", "last_token": "the hidden state of the last caption token",
}
_LOSSES = {
    "clip": "the CLIP loss (symmetric image-text InfoNCE with a learnable temperature)",
    "siglip": "SigLIP's pairwise sigmoid loss (learnable temperature and learnable bias)",
}
_TEXT_SOURCES = {
    "cached": "precomputed (cached) embeddings of a frozen, caption-tuned LLM",
    "frozen": "embeddings of the embedded, frozen caption-tuned LLM, computed at every step",
    "lora": "embeddings of the embedded caption-tuned LLM, computed at every step and LoRA-tuned with the tower",
}

_CAPTION_USAGE = """```python
from transformers import AutoModel

text_model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
embeddings = text_model.encode(["a photo of a cat"])  # float32 sentence embeddings
```"""

_CLIP_USAGE = """```python
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)  # when a text encoder is embedded
image_features = F.normalize(model.get_image_features(pixel_values=pixel_values), dim=-1)
text_features = F.normalize(model.get_text_features(llm_embeddings), dim=-1)  # embeddings of the text model
```"""


def build_model_card(
    repo: str,
    args: Any,
    base_models: list[str],
    datasets: list[str],
    num_train_examples: int | None,
    metrics: dict[str, float],
    world_size: int,
    cra_before: float | None = None,
    cra_after: float | None = None,
    model: PreTrainedModel | None = None,
) -> str:
    """Markdown with YAML front matter: stage, base models, data, hyperparameters, metrics and usage.

    ``model``: the model being saved (an ``LLM2CLIPTextModel`` for the text stages, an ``LLM2CLIPModel`` for
    stage 2); its config names the vision tower and the text pooling. Without it the card claims neither.
    ``cra_before`` / ``cra_after``: held-out caption retrieval accuracy (percent) before and after training, written
    as the card's ``model-index`` (the Hub's evaluation results) and as a line of the metrics section.
    """
    caption = args.stage in TEXT_STAGES
    front = {
        "library_name": "transformers",
        "tags": ["llm2clip", "llm2vec" if caption else "clip", "sentence-embeddings" if caption else "vision"],
        "pipeline_tag": "feature-extraction" if caption else "zero-shot-image-classification",
        "base_model": [m for m in base_models if m] or None,
        "datasets": [d for d in datasets if d] or None,
        "model-index": _cra_model_index(repo, datasets, cra_before, cra_after),
    }
    front_lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items() if v is not None] + ["---"]
    config = getattr(model, "config", None)
    if args.stage == MNTP_STAGE:
        purpose = ("MNTP before stage 1 of LLM2CLIP: the LLM made bidirectional and adapted to it with LoRA (merged) "
                   "by llm2vec's masked next-token prediction; the starting point of caption contrastive training.")
    elif caption:
        purpose = _caption_stage_purpose(args, config)
    else:
        purpose = _clip_stage_purpose(args, config)
    hyper = {name: getattr(args, name) for name in _HYPERPARAMETERS if hasattr(args, name)}
    batches = _batch_sizes(args, world_size)
    hyper.update(batches)
    hyper["processes"] = world_size
    metric_lines = (["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
                    if metrics else ["No metrics were recorded."])
    if cra_after is not None:
        before = f"{cra_before:.2f} % before training -> " if cra_before is not None else ""
        metric_lines = [f"Held-out caption retrieval accuracy (mean of both directions): {before}"
                        f"{cra_after:.2f} % after.", ""] + metric_lines
    lines = front_lines + [
        f"# {repo}", "", purpose, "", "Trained with `LLM2CLIPTrainer` of the `llm2clip-hf` package.", "",
        "## Base models", "", *[f"- `{m}`" for m in base_models if m], "",
        "## Training data", "", *[f"- `{d}`" for d in datasets if d],
        f"- {num_train_examples} training examples" if num_train_examples is not None else "", "",
        "## Hyperparameters", "", "| name | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in hyper.items()], "", _batch_note(args, world_size, batches), "",
        "## Metrics", "", *metric_lines, "",
        "## Usage", "", (_CAPTION_USAGE if caption else _CLIP_USAGE).format(repo=repo), "",
        "## Citation", "", "```bibtex", "@article{huang2024llm2clip,",
        "  title={LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation},",
        "  author={Huang, Weiquan and Wu, Aoqi and Yang, Yifan and others},",
        "  journal={arXiv preprint arXiv:2411.04997}, year={2024}", "}", "```", "",
    ]
    return "\n".join(lines)


def write_model_card(trainer: Any, output_dir: str, model_name: str | None = None,
                     dataset_name: str | list[str] | None = None) -> None:
    """Write ``README.md`` to ``output_dir`` for what ``trainer`` (an ``LLM2CLIPTrainer``) trained: its stage, base
    models, data, hyperparameters, last metrics, and the CRA before and after stage 1 when evaluated."""
    base = trainer._base_model()
    if isinstance(base, LLM2CLIPTextModel):
        base_models = [base.name_or_path]
    else:
        base_models = [base.name_or_path, base.config.text_model_name_or_path]
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    history = trainer.state.log_history
    metrics = {}
    for entry in history:
        metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
    cra = [(entry["step"], entry["eval_cra"]) for entry in history if "eval_cra" in entry]
    card = build_model_card(
        repo=model_name or getattr(trainer, "hub_model_id", None) or os.path.basename(os.path.abspath(output_dir)),
        args=trainer.args, base_models=base_models, datasets=datasets,
        num_train_examples=len(trainer.train_dataset) if has_length(trainer.train_dataset) else None,
        metrics=metrics, world_size=trainer.args.world_size,
        cra_before=cra[0][1] if cra and cra[0][0] == 0 else None,
        cra_after=cra[-1][1] if cra and cra[-1][0] > 0 else None, model=base,
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


def _caption_stage_purpose(args: Any, config: PretrainedConfig | None) -> str:
    """Stage 1: the loss, and the pooling of the text model's config when known."""
    negatives = " and hard negatives" if getattr(args, "hard_negatives", False) else ""
    pooling = getattr(config, "pooling_mode", None)
    return ("Stage 1 of LLM2CLIP: the LLM made bidirectional and fine-tuned with LoRA (merged) on a caption-to-caption "
            f"contrastive loss (one-directional InfoNCE of each query against all positives{negatives} of the "
            f"contrastive batch, cosine similarities scaled by {args.loss_scale}), so that its sentence embeddings "
            "separate captions." + (f" {_pooling_sentence('They', pooling)}" if pooling else ""))


def _clip_stage_purpose(args: Any, config: PretrainedConfig | None) -> str:
    """Stage 2: the vision tower, the loss and the source of the text embeddings."""
    loss = _LOSSES.get(args.loss_type, f"the {args.loss_type!r} loss")
    text = _TEXT_SOURCES.get(args.text_source, args.text_source)
    if config is None:
        return f"Stage 2 of LLM2CLIP: a vision tower and a text adapter trained with {loss} against {text}."
    return (f"Stage 2 of LLM2CLIP: {_describe_tower(config.vision_config)} and a text adapter trained with {loss} "
            f"against {text}. {_stage2_pooling(config)}")


def _describe_tower(vision_config: PretrainedConfig) -> str:
    """The tower family (its ``model_type`` when not one of LLM2CLIP's) with width, depth, image and patch sizes."""
    model_type = getattr(vision_config, "model_type", None)
    family = _TOWER_NAMES.get(model_type, model_type or type(vision_config).__name__)
    sizes = ", ".join(f"{label} {getattr(vision_config, name)}" for label, name in _TOWER_SIZES
                      if getattr(vision_config, name, None) is not None)
    article = "an" if family[0].lower() in "aeiou" else "a"
    return f"{article} {family} vision tower ({sizes})"


def _stage2_pooling(config: PretrainedConfig) -> str:
    """How the text embeddings were pooled: the embedded text encoder's ``pooling_mode``, else no claim."""
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        return _pooling_sentence("The LLM's sentence embeddings", text_config.pooling_mode)
    name = getattr(config, "text_model_name_or_path", None)
    llm = f"the cached LLM `{name}`" if name else "the cached LLM"
    return f"The text embeddings come from {llm}, whose pooling the model does not record."


def _pooling_sentence(subject: str, pooling: str) -> str:
    """``subject`` are pooled by ``pooling``, in words."""
    return f"{subject} are {_POOLING.get(pooling, pooling)} (pooling_mode={pooling})."


def _batch_sizes(args: Any, world_size: int) -> dict[str, int]:
    """Rows per contrastive loss (the per-step batch across processes; not for MNTP), samples per optimizer step
    (gradient accumulation included) and the GradCache chunk size when set."""
    per_step = args.per_device_train_batch_size * world_size
    sizes = {} if args.stage == MNTP_STAGE else {"contrastive_batch_size": per_step}
    sizes["samples_per_optimizer_step"] = per_step * args.gradient_accumulation_steps
    if getattr(args, "gradcache_chunk_size", None):
        sizes["gradcache_chunk_size"] = args.gradcache_chunk_size
    return sizes


def _batch_note(args: Any, world_size: int, sizes: dict[str, int]) -> str:
    """What the batch sizes of the table mean."""
    accumulation = args.gradient_accumulation_steps
    steps = (f"{sizes['samples_per_optimizer_step']} samples per optimizer step (per_device_train_batch_size "
             f"{args.per_device_train_batch_size} x gradient_accumulation_steps {accumulation} x {world_size} "
             "processes).")
    if "contrastive_batch_size" not in sizes:
        return f"Batch: {steps}"
    note = (f"Contrastive batch: {sizes['contrastive_batch_size']} rows per loss (per_device_train_batch_size x "
            f"{world_size} processes), each scored against all of them. ")
    note += (f"Gradient accumulation adds no negatives: it sums the gradients of {accumulation} such losses, "
             f"for {steps}" if accumulation > 1 else f"No gradient accumulation: {steps}")
    if "gradcache_chunk_size" in sizes:
        note += (f" GradCache embeds each contrastive batch in chunks of {sizes['gradcache_chunk_size']} rows: a "
                 "chunk size that saves memory; the contrastive batch is unchanged.")
    return note


def _cra_model_index(repo: str, datasets: list[str], before: float | None,
                     after: float | None) -> list[dict[str, Any]] | None:
    """The Hub's ``model-index`` entry for held-out caption retrieval accuracy, or None without a measurement."""
    if after is None:
        return None
    values = [{"type": "cra", "name": "Caption retrieval accuracy (held-out, mean of both directions)",
               "value": round(after, 2)}]
    if before is not None:
        values.append({"type": "cra_before_training", "name": "Caption retrieval accuracy before training",
                       "value": round(before, 2)})
    dataset = next((d for d in datasets if d), "held-out caption pairs")
    return [{"name": repo, "results": [{
        "task": {"type": "sentence-similarity", "name": "Caption retrieval"},
        "dataset": {"name": dataset, "type": dataset},
        "metrics": values,
    }]}]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
