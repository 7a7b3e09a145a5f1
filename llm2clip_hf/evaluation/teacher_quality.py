"""Is a text model a usable stage-2 teacher? Statistics of its caption embeddings, raw and centered.

Mean-pooled LLM embeddings share a common component. A raw LLM's captions have a mean pairwise cosine around 0.6; a
stage-1 run that went wrong can push it to 1.000, where every caption looks the same after L2 normalisation (what
the official adapter does first) although the residual around the common mean may still carry meaning. Three
cases, decided on the captions stage 2 will use:

- ``healthy``: the raw embeddings are spread (mean pairwise cosine below ``DOMINATED_MEAN_COSINE``);
- ``dominated``: one common component dominates (mean cosine at or above it) but the centered embeddings are spread:
  a new adapter should center its input (``adapter_input_normalization="center"``);
- ``degenerate``: nothing is left after centering: the residual is within the storage precision of the numbers (a
  collapse stored in bfloat16, constant or zero embeddings) or varies along less than
  ``MIN_CENTERED_EFFECTIVE_RANK`` directions (a few distinct embeddings). Stage 2 refuses such a teacher unless told
  otherwise.

Effective rank is ``exp(H(p))`` with ``p`` the singular values of the row-normalised embeddings divided by their sum
(Roy & Vetterli, 2007): 1 for one direction, ``min(rows, dim)`` for isotropic ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DOMINATED_MEAN_COSINE = 0.9
MIN_CENTERED_EFFECTIVE_RANK = 2.0
# The residual around the mean must exceed the storage rounding by this factor to count as signal.
PRECISION_MARGIN = 10.0
HEALTHY, DOMINATED, DEGENERATE = "healthy", "dominated", "degenerate"


def effective_rank(embeddings: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values of the L2-normalised rows (zero rows are dropped);
    0 when no row is left."""
    rows = embeddings[embeddings.norm(dim=-1) > 0]
    if rows.shape[0] == 0:
        return 0.0
    singular = torch.linalg.svdvals(F.normalize(rows.double(), dim=-1))
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _cosine_moments(embeddings: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the pairwise cosines of distinct rows (zero rows count as cosine 0)."""
    unit = F.normalize(embeddings.double(), dim=-1)
    cosines = unit @ unit.T
    off_diagonal = cosines[~torch.eye(len(unit), dtype=torch.bool)]
    return float(off_diagonal.mean()), float(off_diagonal.std())


@dataclass
class TeacherStatistics:
    """What predicts a usable stage-2 teacher, measured on its caption embeddings (see the module docstring)."""

    rows: int
    mean_cosine: float
    std_cosine: float
    effective_rank: float
    centered_mean_cosine: float
    centered_std_cosine: float
    centered_effective_rank: float
    residual_share: float  # RMS norm of the centered embeddings over that of the raw ones
    precision: float  # relative precision of the numbers they were stored in

    @property
    def verdict(self) -> str:
        if self.residual_share <= PRECISION_MARGIN * self.precision or \
                self.centered_effective_rank < MIN_CENTERED_EFFECTIVE_RANK:
            return DEGENERATE
        return DOMINATED if self.mean_cosine >= DOMINATED_MEAN_COSINE else HEALTHY

    def as_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "verdict": self.verdict}

    def describe(self) -> str:
        return (f"mean pairwise cosine {self.mean_cosine:.3f} (std {self.std_cosine:.3f}), effective rank "
                f"{self.effective_rank:.1f}; centered: mean cosine {self.centered_mean_cosine:.3f} (std "
                f"{self.centered_std_cosine:.3f}), effective rank {self.centered_effective_rank:.1f}; residual around "
                f"the mean {self.residual_share:.2e} of the norm, on {self.rows} captions")


def teacher_statistics(embeddings: torch.Tensor, precision: float | None = None, max_rows: int = 4096,
                       seed: int = 0) -> TeacherStatistics:
    """:class:`TeacherStatistics` of ``[N, D]`` caption embeddings (a random ``max_rows`` of them, ``seed``).
    ``precision``: relative precision of the stored numbers (default: the machine epsilon of their dtype; give
    bfloat16's for a cache stored in bfloat16 and decoded to float32)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"Teacher statistics need [N >= 2, D] embeddings, got shape {tuple(embeddings.shape)}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("The teacher's embeddings hold NaN or infinite values: the text model is broken.")
    precision = torch.finfo(embeddings.dtype).eps if precision is None else precision
    if embeddings.shape[0] > max_rows:
        chosen = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        embeddings = embeddings[chosen]
    x = embeddings.double()
    centered = x - x.mean(dim=0, keepdim=True)
    raw_energy = x.square().sum(-1).mean()
    residual_share = float((centered.square().sum(-1).mean() / raw_energy).sqrt()) if raw_energy > 0 else 0.0
    mean_cos, std_cos = _cosine_moments(x)
    centered_mean_cos, centered_std_cos = _cosine_moments(centered)
    return TeacherStatistics(
        rows=x.shape[0], mean_cosine=mean_cos, std_cosine=std_cos, effective_rank=effective_rank(x),
        centered_mean_cosine=centered_mean_cos, centered_std_cosine=centered_std_cos,
        centered_effective_rank=effective_rank(centered) if residual_share > 0 else 0.0,
        residual_share=residual_share, precision=precision,
    )


def check_teacher(statistics: TeacherStatistics, allow_degenerate: bool = False,
                  override: str = "allow_degenerate_teacher=True") -> None:
    """Refuse a degenerate teacher (``ValueError`` naming the numbers and the fix) unless ``allow_degenerate``."""
    if statistics.verdict != DEGENERATE or allow_degenerate:
        return
    raise ValueError(
        f"The text model's caption embeddings have no spread left, even after centering ({statistics.describe()}): "
        "stage 2 cannot learn from them. The usual cause is a stage-1 run whose embeddings collapsed; use the "
        "last good weights it saved (last-good-step-N), rerun stage 1 with a lower learning rate or a longer "
        "warmup, or teach with the raw LLM. A cache stored in bfloat16/float16 can also round a small residual "
        f"away: embed in float32. To train on it anyway, set {override}."
    )


def auto_adapter_input_normalization(statistics: TeacherStatistics) -> str | None:
    """What ``adapter_input_normalization="auto"`` gives a new adapter for a teacher: ``"center"`` when its embeddings
    are dominated by one common component, else ``None`` (the official adapter)."""
    return "center" if statistics.verdict == DOMINATED else None


def check_cached_teacher(dataset, caption_columns: Sequence[str], allow_degenerate: bool = False,
                         override: str = "allow_degenerate_teacher=True", seed: int = 0) -> TeacherStatistics:
    """:class:`TeacherStatistics` of a stage-2 cache (a sample of its rows, at its storage precision), a degenerate
    teacher refused by :func:`check_teacher`."""
    from ..data import cached_embedding_sample

    statistics = teacher_statistics(*cached_embedding_sample(dataset, caption_columns, seed=seed))
    check_teacher(statistics, allow_degenerate, override)
    return statistics


def teacher_report(statistics: TeacherStatistics, caption_retrieval: dict[str, float] | None = None,
                   centered_caption_retrieval: dict[str, float] | None = None) -> dict[str, float | int | str]:
    """The statistics with CRA raw and centered (where caption pairs exist), flat, for metrics files."""
    report = statistics.as_dict()
    for prefix, metrics in (("", caption_retrieval), ("centered_", centered_caption_retrieval)):
        for name, value in (metrics or {}).items():
            report[prefix + name] = value
    return report


def evaluate_teacher(text_model, dataset, caption_columns: Sequence[str], max_rows: int = 2048, batch_size: int = 32,
                     seed: int = 0) -> dict[str, float | int | str]:
    """The teacher check on a user's captions, before any GPU hour is spent on stage 2: embeds the captions of
    ``caption_columns`` of up to ``max_rows`` random rows of ``dataset`` with ``text_model`` (an
    :class:`~llm2clip_hf.LLM2CLIPTextModel`) and reports :class:`TeacherStatistics` and, with two caption columns
    (two captions of each image), caption retrieval accuracy between them raw and on centered embeddings."""
    if len(dataset) > max_rows:
        dataset = dataset.shuffle(seed=seed).select(range(max_rows))
    columns = []
    for column in caption_columns:
        texts = dataset[column]
        if any(not isinstance(t, str) for t in texts):
            raise ValueError(f"evaluate_teacher needs one caption string per row in {column!r}.")
        columns.append(text_model.encode(texts, batch_size=batch_size, show_progress_bar=False).float().cpu())
    if len(columns) != 2:
        embeddings = torch.cat(columns)
        return teacher_report(teacher_statistics(embeddings, max_rows=len(embeddings)))
    return caption_pair_teacher_check(*columns)[1]


def caption_pair_teacher_check(first: torch.Tensor, second: torch.Tensor, precision: float | None = None
                               ) -> tuple[TeacherStatistics, dict[str, float | int | str]]:
    """The teacher check on the embeddings of two captions of each image (``[N, D]`` each, row *i* of both from one
    image): :class:`TeacherStatistics` of all ``2N`` (``precision`` as in :func:`teacher_statistics`), and the report
    with caption retrieval accuracy between the two, raw and on embeddings centered by their common mean."""
    from .caption_retrieval import caption_retrieval_metrics

    embeddings = torch.cat([first, second])
    statistics = teacher_statistics(embeddings, precision, max_rows=len(embeddings))
    mean = embeddings.mean(dim=0, keepdim=True)
    return statistics, teacher_report(statistics, caption_retrieval_metrics(first, second),
                                      caption_retrieval_metrics(first - mean, second - mean))
