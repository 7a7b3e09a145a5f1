"""Is a text model a usable stage-2 teacher? Statistics of its caption embeddings, raw and centered.

Mean-pooled LLM embeddings share a common component. A raw LLM's captions have a mean pairwise cosine around 0.6; a
stage-1 run that went wrong can push it to 1.000, where every caption looks the same after L2 normalisation (what
the official adapter does first) although the residual around the common mean may still carry meaning. Three
cases, decided on the captions stage 2 will use:

- ``healthy``: the raw embeddings are spread (mean pairwise cosine below ``DOMINATED_MEAN_COSINE``);
- ``dominated``: one common component dominates (mean cosine at or above it) but the centered embeddings are spread:
  a new adapter should center its input (``adapter_input_normalization="center"``);
- ``degenerate``: nothing is left after centering: the residual varies along less than
  ``MIN_CENTERED_EFFECTIVE_RANK`` directions (a few distinct embeddings), or rounding noise can explain it. The
  rounding noise actually present is estimated from the values themselves (:func:`rounding_noise_share`), for the
  dtype they were stored in (one rounding: ``PRECISION_MARGIN`` times it) and the one the text model computed them
  in (every layer rounds: ``COMPUTED_NOISE_MARGIN`` times one rounding). A residual within that band is noise unless
  two captions of each image are given and, centered, retrieve each other better than chance (the centered caption
  retrieval accuracy, CRA, decides). Stage 2 refuses such a teacher unless told otherwise.

On fewer than ``MIN_CHECKED_CAPTIONS`` captions the statistics do not mean enough yet (centered embeddings of N
captions span at most N - 1 directions, and the mean cosine of a few is a coin toss near the bar; measured in
``scripts/experiments/teacher_check_edges.py``): the check is skipped, with the verdict ``skipped``, and nothing is
refused.

Effective rank is ``exp(H(p))`` with ``p`` the singular values of the row-normalised embeddings divided by their sum
(Roy & Vetterli, 2007): 1 for one direction, ``min(rows, dim)`` for isotropic ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DOMINATED_MEAN_COSINE = 0.9
MIN_CENTERED_EFFECTIVE_RANK = 2.0
# A residual around the mean within this many roundings of the stored numbers may be rounding noise,
PRECISION_MARGIN = 10.0
# and within this many roundings of the dtype they were computed in: computing rounds at every layer (SmolLM2-135M in
# bfloat16 is off by 72 roundings' worth, the tests' tiny LLM by 3: scripts/experiments/teacher_check_edges.py).
COMPUTED_NOISE_MARGIN = 150.0
# With caption pairs, the centered CRA must beat chance at this significance to count as signal.
CHANCE_P_VALUE = 1e-3
# Fewer captions: the check is skipped. On 32 random captions the verdict equals that on all 2612 emoji captions in
# >= 99 % of draws for each informative teacher measured (one 0.02 above the dominated bar included), on 16 in 95 %,
# on 8 in 88 %, on 2 or 3 in none (scripts/experiments/teacher_check_edges.py).
MIN_CHECKED_CAPTIONS = 32
HEALTHY, DOMINATED, DEGENERATE, SKIPPED = "healthy", "dominated", "degenerate", "skipped"


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


def rounding_noise_share(embeddings: torch.Tensor, precision: float) -> float:
    """RMS norm of the error that rounding ``embeddings`` to numbers of relative precision ``precision`` (a dtype's
    machine epsilon) leaves, over their RMS norm. Each value rounded to nearest is off by up to half a unit in its
    last place, ``ulp = precision * 2**floor(log2|x|)``, uniformly: RMS ``ulp / sqrt(12)``. Taken per value, so a
    large common component contributes its own (large) rounding and a small residual its own (small) one."""
    x = embeddings.double()
    _, exponent = torch.frexp(x)  # |x| = m * 2**exponent with 0.5 <= m < 1: floor(log2|x|) = exponent - 1
    ulp = torch.where(x == 0, 0.0, precision * torch.ldexp(torch.ones_like(x), exponent - 1))
    energy = x.square().sum(-1).mean()
    return float((ulp.square().sum(-1).mean() / 12 / energy).sqrt()) if energy > 0 else 0.0


def _chance_tail(hits: int, trials: int, p: float) -> float:
    """``P(X >= hits)`` for ``X ~ Binomial(trials, p)``."""
    if hits <= 0:
        return 1.0
    if p >= 1.0:
        return 1.0 if hits <= trials else 0.0
    log_terms = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * math.log(p)
                 + (trials - k) * math.log1p(-p) for k in range(hits, trials + 1)]
    peak = max(log_terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in log_terms))


def pair_retrieval_chance(first: torch.Tensor, second: torch.Tensor) -> float:
    """How likely chance alone retrieves the pairs as well as they do: the smaller of the two directions' binomial
    tails of the top-1 hits among ``N`` candidates (chance ``1 / N`` each, ties counted by expectation as in
    :mod:`.ranking`, rounded down), doubled for the two looks (Bonferroni)."""
    from .caption_retrieval import caption_retrieval_accuracy

    count = first.shape[0]
    tails = [_chance_tail(math.floor(caption_retrieval_accuracy(a, b, show_progress_bar=False) * count / 100 + 1e-6),
                         count, 1.0 / count) for a, b in ((first, second), (second, first))]
    return min(1.0, 2 * min(tails))


def pair_retrieval_beats_chance(first: torch.Tensor, second: torch.Tensor, p_value: float = CHANCE_P_VALUE) -> bool:
    """Whether row *i* of ``first`` and of ``second`` retrieve each other better than chance (at ``p_value``)."""
    return pair_retrieval_chance(first, second) < p_value


@dataclass
class TeacherStatistics:
    """What predicts a usable stage-2 teacher, measured on its caption embeddings (see the module docstring). The
    measurements are ``None`` when the check was skipped (fewer than ``min_captions`` captions)."""

    rows: int
    mean_cosine: float | None = None
    std_cosine: float | None = None
    effective_rank: float | None = None
    centered_mean_cosine: float | None = None
    centered_std_cosine: float | None = None
    centered_effective_rank: float | None = None
    residual_share: float | None = None  # RMS norm of the centered embeddings over that of the raw ones
    precision: float | None = None  # relative precision of the numbers as stored
    computed_precision: float | None = None  # relative precision of the dtype the text model computed them in
    noise_band: float | None = None  # the residual_share that rounding noise may reach (see the module docstring)
    pairs: int = 0  # caption pairs (two captions of one image) the centered CRA was measured on
    centered_cra_chance: float | None = None  # pair_retrieval_chance of the centered pairs
    min_captions: int = MIN_CHECKED_CAPTIONS

    @property
    def skipped(self) -> bool:
        """Too few captions (under ``min_captions``) for the statistics to mean anything: reported, not judged."""
        return self.rows < self.min_captions

    @property
    def residual_is_signal(self) -> bool:
        """A residual above the noise band is signal; within it, it is noise unless caption pairs show otherwise
        (centered, they retrieve each other better than chance)."""
        if self.residual_share > self.noise_band:
            return True
        return self.centered_cra_chance is not None and self.centered_cra_chance < CHANCE_P_VALUE

    @property
    def verdict(self) -> str:
        """``"healthy"``, ``"dominated"``, ``"degenerate"`` or ``"skipped"`` (see the module docstring)."""
        if self.skipped:
            return SKIPPED
        if self.centered_effective_rank < MIN_CENTERED_EFFECTIVE_RANK or not self.residual_is_signal:
            return DEGENERATE
        return DOMINATED if self.mean_cosine >= DOMINATED_MEAN_COSINE else HEALTHY

    def as_dict(self) -> dict[str, float | int | str | None]:
        """Every statistic and the verdict, as a JSON-serialisable dict (what ``evaluate --task teacher`` prints)."""
        return {**asdict(self), "verdict": self.verdict}

    def describe(self) -> str:
        """One line naming the verdict's numbers, for warnings and errors."""
        if self.skipped:
            return (f"skipped: {self.rows} caption{'s' * (self.rows != 1)}, fewer than the {self.min_captions} its "
                    "statistics need to mean anything")
        pairs = (f"; centered CRA of {self.pairs} caption pairs: chance {self.centered_cra_chance:.1e}"
                 if self.centered_cra_chance is not None else "")
        return (f"mean pairwise cosine {self.mean_cosine:.3f} (std {self.std_cosine:.3f}), effective rank "
                f"{self.effective_rank:.1f}; centered: mean cosine {self.centered_mean_cosine:.3f} (std "
                f"{self.centered_std_cosine:.3f}), effective rank {self.centered_effective_rank:.1f}; residual around "
                f"the mean {self.residual_share:.2e} of the norm (rounding noise may reach {self.noise_band:.1e})"
                f"{pairs}, on {self.rows} captions")


def teacher_statistics(embeddings: torch.Tensor, precision: float | None = None, max_rows: int = 4096,
                       seed: int = 0, pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                       min_captions: int = MIN_CHECKED_CAPTIONS, computed_precision: float | None = None
                       ) -> TeacherStatistics:
    """:class:`TeacherStatistics` of ``[N, D]`` caption embeddings (a random ``max_rows`` of them, ``seed``).

    ``precision``: relative precision of the numbers as stored (default: the machine epsilon of their dtype; give
    bfloat16's for a cache stored in bfloat16 and decoded to float32). ``computed_precision``: that of the dtype the
    text model computed them in (default float32's). ``pairs``: two ``[P, D]`` embeddings of two captions of each of
    ``P`` images, whose centered CRA decides whether a residual within the noise band is signal. Fewer than
    ``min_captions`` embeddings (at least 2) are not measured: the statistics say the check was skipped."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"Teacher statistics need [N >= 1, D] embeddings, got shape {tuple(embeddings.shape)}.")
    if min_captions < 2:
        raise ValueError(f"min_captions must be at least 2 (pairwise cosines), got {min_captions}.")
    if not torch.isfinite(embeddings).all():
        raise ValueError("The teacher's embeddings hold NaN or infinite values: the text model is broken.")
    if embeddings.shape[0] < min_captions:
        return TeacherStatistics(rows=embeddings.shape[0], min_captions=min_captions)
    precision = torch.finfo(embeddings.dtype).eps if precision is None else precision
    computed_precision = torch.finfo(torch.float32).eps if computed_precision is None else computed_precision
    if embeddings.shape[0] > max_rows:
        chosen = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        embeddings = embeddings[chosen]
    x = embeddings.double()
    centered = x - x.mean(dim=0, keepdim=True)
    raw_energy = x.square().sum(-1).mean()
    residual_share = float((centered.square().sum(-1).mean() / raw_energy).sqrt()) if raw_energy > 0 else 0.0
    mean_cos, std_cos = _cosine_moments(x)
    centered_mean_cos, centered_std_cos = _cosine_moments(centered)
    chance = None
    if pairs is not None and len(pairs[0]) > 0:
        mean = torch.cat(pairs).double().mean(dim=0, keepdim=True)
        chance = pair_retrieval_chance(pairs[0].double() - mean, pairs[1].double() - mean)
    return TeacherStatistics(
        rows=x.shape[0], mean_cosine=mean_cos, std_cosine=std_cos, effective_rank=effective_rank(x),
        centered_mean_cosine=centered_mean_cos, centered_std_cosine=centered_std_cos,
        centered_effective_rank=effective_rank(centered) if residual_share > 0 else 0.0,
        residual_share=residual_share, precision=precision, computed_precision=computed_precision,
        noise_band=max(PRECISION_MARGIN * rounding_noise_share(x, precision),
                       COMPUTED_NOISE_MARGIN * rounding_noise_share(x, computed_precision)),
        pairs=0 if chance is None else len(pairs[0]), centered_cra_chance=chance, min_captions=min_captions,
    )


def check_teacher(statistics: TeacherStatistics, allow_degenerate: bool = False,
                  override: str = "allow_degenerate_teacher=True") -> None:
    """Refuse a degenerate teacher (``ValueError`` naming the numbers and the fix) unless ``allow_degenerate``."""
    if statistics.verdict != DEGENERATE or allow_degenerate:
        return
    if statistics.centered_effective_rank < MIN_CENTERED_EFFECTIVE_RANK:
        what = "they have no spread left, even after centering"
    else:
        what = "what is left after centering is within the rounding noise of the dtypes they were computed and " \
               "stored in"
        if statistics.centered_cra_chance is not None:
            what += (f", and the two captions of an image, centered, retrieve each other no better than chance "
                     f"(chance {statistics.centered_cra_chance:.2g} on {statistics.pairs} pairs)")
    raise ValueError(
        f"The text model's caption embeddings are degenerate: {what} ({statistics.describe()}); stage 2 cannot learn "
        "from them. The usual cause is a stage-1 run whose embeddings collapsed; use the last good weights it saved "
        "(last-good-step-N), rerun stage 1 with a lower learning rate or a longer warmup, or teach with the raw LLM. "
        "A text model computing in bfloat16/float16 (or a cache stored in it) can also drown a small residual in "
        f"rounding noise: embed in float32. To train on it anyway, set {override}."
    )


def auto_adapter_input_normalization(statistics: TeacherStatistics) -> str | None:
    """What ``adapter_input_normalization="auto"`` gives a new adapter for a teacher: ``"center"`` when its embeddings
    are dominated by one common component, else ``None`` (the official adapter; also when the check was skipped)."""
    return "center" if statistics.verdict == DOMINATED else None


def check_cached_teacher(dataset, caption_columns: Sequence[str], allow_degenerate: bool = False,
                         override: str = "allow_degenerate_teacher=True", seed: int = 0) -> TeacherStatistics:
    """:class:`TeacherStatistics` of a stage-2 cache (a sample of its rows; at the coarsest precision the embeddings
    went through, computed or stored; with two caption columns, their centered CRA), a degenerate teacher refused
    by :func:`check_teacher`."""
    from ..data import cached_embedding_sample

    sample = cached_embedding_sample(dataset, caption_columns, seed=seed)
    statistics = teacher_statistics(sample.embeddings, sample.precision, max_rows=len(sample.embeddings),
                                    pairs=sample.pairs, computed_precision=sample.computed_precision)
    check_teacher(statistics, allow_degenerate, override)
    return statistics


def teacher_report(statistics: TeacherStatistics, caption_retrieval: dict[str, float] | None = None,
                   centered_caption_retrieval: dict[str, float] | None = None) -> dict[str, float | int | str | None]:
    """The statistics with CRA raw and centered (where caption pairs exist), flat, for metrics files."""
    report = statistics.as_dict()
    for prefix, metrics in (("", caption_retrieval), ("centered_", centered_caption_retrieval)):
        for name, value in (metrics or {}).items():
            report[prefix + name] = value
    return report


def evaluate_teacher(text_model, dataset, caption_columns: Sequence[str], max_rows: int = 2048, batch_size: int = 32,
                     seed: int = 0) -> dict[str, float | int | str | None]:
    """The teacher check on a user's captions, before any GPU hour is spent on stage 2: embeds the captions of
    ``caption_columns`` of up to ``max_rows`` random rows of ``dataset`` with ``text_model`` (an
    :class:`~llm2clip_hf.LLM2CLIPTextModel`; its dtype sets the precision) and reports :class:`TeacherStatistics`
    and, with two caption columns (two captions of each image), caption retrieval accuracy between them raw and on
    centered embeddings.

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPTextModel
        from llm2clip_hf.data import load_dataset_from_spec
        from llm2clip_hf.evaluation import evaluate_teacher

        text_model = LLM2CLIPTextModel.from_pretrained("my-text-encoder")
        report = evaluate_teacher(text_model, load_dataset_from_spec("pairs.jsonl"), ["short_caption", "long_caption"])
        print(report["verdict"], report["cra"])
        ```
    """
    if len(dataset) > max_rows:
        dataset = dataset.shuffle(seed=seed).select(range(max_rows))
    columns = []
    for column in caption_columns:
        texts = dataset[column]
        if any(not isinstance(t, str) for t in texts):
            raise ValueError(f"evaluate_teacher needs one caption string per row in {column!r}.")
        columns.append(text_model.encode(texts, batch_size=batch_size, show_progress_bar=False).float().cpu())
    computed = torch.finfo(text_model.dtype).eps
    if len(columns) != 2:
        embeddings = torch.cat(columns)
        return teacher_report(teacher_statistics(embeddings, max_rows=len(embeddings), computed_precision=computed))
    return caption_pair_teacher_check(*columns, computed_precision=computed)[1]


def caption_pair_teacher_check(first: torch.Tensor, second: torch.Tensor, precision: float | None = None,
                               computed_precision: float | None = None
                               ) -> tuple[TeacherStatistics, dict[str, float | int | str | None]]:
    """The teacher check on the embeddings of two captions of each image (``[N, D]`` each, row *i* of both from one
    image): :class:`TeacherStatistics` of all ``2N`` (``precision`` and ``computed_precision`` as in
    :func:`teacher_statistics`; the centered pairs decide whether a residual within the noise band is signal), and
    the report with caption retrieval accuracy between the two, raw and on embeddings centered by their common
    mean."""
    from .caption_retrieval import caption_retrieval_metrics

    embeddings = torch.cat([first, second])
    statistics = teacher_statistics(embeddings, precision, max_rows=len(embeddings), pairs=(first, second),
                                    computed_precision=computed_precision)
    mean = embeddings.mean(dim=0, keepdim=True)
    return statistics, teacher_report(statistics, caption_retrieval_metrics(first, second),
                                      caption_retrieval_metrics(first - mean, second - mean))
