"""Metrics of the evaluation suite: retrieval recall, zero-shot classification and caption retrieval accuracy,
all computed from embeddings in chunks, a local ``evaluate`` metric wrapping :func:`retrieval_recall`, the
teacher check (is a text model's embedding usable for stage 2), and any model as an MTEB encoder with local
image-text data as MTEB tasks (mteb is imported only when these are used)."""

from __future__ import annotations

from pathlib import Path

from .model_evaluation import (
    embed_images,
    evaluate_caption_retrieval,
    evaluate_retrieval,
    evaluate_zero_shot,
    zero_shot_labels,
)
from .mteb_encoder import LLM2CLIPMTEBEncoder, mteb_encoder, weights_revision
from .mteb_tasks import image_text_retrieval_tasks, run_mteb_from_cli, run_mteb_tasks, zero_shot_task
from .caption_retrieval import caption_retrieval_accuracy, caption_retrieval_metrics
from .ranking import RankCounts, hit_probability, rank_counts, recall_at_k
from .retrieval import retrieval_recall
from .teacher_quality import TeacherStatistics, check_teacher, evaluate_teacher, teacher_statistics
from .zero_shot import DEFAULT_TEMPLATES, build_classifier, zero_shot_accuracy

_METRIC_DIR = Path(__file__).with_name("metric")


def metric_path(name: str = "llm2clip_retrieval") -> str:
    """Directory of a bundled ``evaluate`` metric, for ``evaluate.load(metric_path())`` (works offline)."""
    path = _METRIC_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in _METRIC_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No bundled evaluate metric named {name!r}; available: {available}.")
    return str(path)


__all__ = [
    "DEFAULT_TEMPLATES", "RankCounts", "build_classifier", "caption_retrieval_accuracy", "caption_retrieval_metrics",
    "embed_images", "evaluate_caption_retrieval", "evaluate_retrieval", "evaluate_zero_shot", "hit_probability",
    "metric_path", "rank_counts", "recall_at_k", "retrieval_recall", "zero_shot_accuracy", "TeacherStatistics",
    "check_teacher", "evaluate_teacher", "teacher_statistics", "zero_shot_labels", "LLM2CLIPMTEBEncoder",
    "mteb_encoder", "weights_revision", "image_text_retrieval_tasks", "run_mteb_tasks",
    "zero_shot_task",
]
