"""Model card (README.md) for models trained by :class:`LLM2CLIPTrainer`."""

from __future__ import annotations

import json
from typing import Any

from .training_args import MNTP_STAGE, TEXT_STAGES

_HYPERPARAMETERS = (
    "stage", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
    "loss_scale", "hard_negatives", "lora_r", "lora_alpha", "lora_dropout", "caption_columns",
    "caption_sampling_weights", "mlm_probability", "text_source", "loss_type", "layer_decay", "logit_scale_max", "image_augmentation",
)

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
) -> str:
    """Markdown with YAML front matter: stage, base models, data, hyperparameters, metrics and usage.

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
    purpose = (
        "MNTP before stage 1 of LLM2CLIP: the LLM made bidirectional and adapted to it with LoRA (merged) by "
        "llm2vec's masked next-token prediction; the starting point of caption contrastive training."
        if args.stage == MNTP_STAGE else
        "Stage 1 of LLM2CLIP: the LLM made bidirectional and fine-tuned with LoRA (merged) on a caption-to-caption "
        "contrastive loss, so that its mean-pooled outputs separate captions." if caption else
        "Stage 2 of LLM2CLIP: an EVA02 vision tower and a text adapter trained with the CLIP loss against "
        "embeddings of a frozen, caption-tuned LLM."
    )
    hyper = {name: getattr(args, name) for name in _HYPERPARAMETERS if hasattr(args, name)}
    hyper["global_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
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
        *[f"| {k} | {v} |" for k, v in hyper.items()], "",
        "## Metrics", "", *metric_lines, "",
        "## Usage", "", (_CAPTION_USAGE if caption else _CLIP_USAGE).format(repo=repo), "",
        "## Citation", "", "```bibtex", "@article{huang2024llm2clip,",
        "  title={LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation},",
        "  author={Huang, Weiquan and Wu, Aoqi and Yang, Yifan and others},",
        "  journal={arXiv preprint arXiv:2411.04997}, year={2024}", "}", "```", "",
    ]
    return "\n".join(lines)


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
