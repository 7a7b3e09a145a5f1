"""The chunked ranking primitive shared by every retrieval-style metric.

Every metric of :mod:`llm2clip_hf.evaluation` asks, per query, whether a correct key is among the ``k`` keys most
similar to it (cosine similarity). Ties are resolved by the **expectation under random tie-breaking**: for each
query, :func:`rank_counts` counts the wrong keys scoring strictly above its best correct score ``s*`` (``g``), the
wrong keys scoring exactly ``s*`` (``t``) and the correct keys scoring exactly ``s*`` (``c >= 1``). If the ``t + c``
tied keys were put in a random order, the number ``X`` of wrong keys ahead of the first correct one would satisfy
``P(X >= j) = C(t, j) / C(t + c, j)``, and the query is a hit at ``k`` with probability ``P(X < k - g)``;
:func:`recall_at_k` averages these probabilities.

Why: counting ties in the query's favour lets a collapsed encoder (constant or all-zero embeddings, where every key
ties) score 100, and breaking them by position (``torch.topk``) makes the result depend on the order of the keys.
The expectation is what an arbitrary tie order gives on average, so a collapsed encoder scores chance level, while
the number stays deterministic, independent of the keys' order and of how the queries are chunked. Without ties it
is the usual 0/1 hit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

_T = TypeVar("_T")


def format_indices(values: list[int], limit: int = 10) -> str:
    """``[a, b, ...] (n in total)``, showing at most ``limit`` values, for error messages."""
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} in total)"


def check_embeddings(name: str, embeds: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Return ``embeds`` as a float32 matrix, raising ``ValueError`` if it is empty, not 2-D, of the wrong width
    or not finite."""
    if not isinstance(embeds, torch.Tensor):
        embeds = torch.as_tensor(embeds)
    if embeds.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(embeds.shape)}); pass at least one non-empty embedding.")
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [num_rows, dim], got shape {tuple(embeds.shape)}.")
    if dim is not None and embeds.shape[1] != dim:
        raise ValueError(
            f"{name} has dimension {embeds.shape[1]} but the other embeddings have dimension {dim}; embed both "
            "sides with the same model (after its projection heads)."
        )
    embeds = embeds.float()
    if not torch.isfinite(embeds).all():
        bad = torch.nonzero(~torch.isfinite(embeds).all(dim=1)).flatten().tolist()
        raise ValueError(f"{name} contains NaN or infinite values in rows {format_indices(bad)}.")
    return embeds


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Return ``ks`` as a tuple of distinct positive ints in the given order; raise ``ValueError`` otherwise."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}.")
    return tuple(dict.fromkeys(ks))


def check_index(name: str, index: Sequence[int] | torch.Tensor, length: int | None, bound: int, bound_name: str
                ) -> torch.Tensor:
    """Return ``index`` as a 1-D LongTensor of values in ``[0, bound)`` (``length`` of them unless ``None``);
    raise ``ValueError`` otherwise."""
    index = torch.as_tensor(index)
    if index.ndim != 1 or (length is not None and index.shape[0] != length):
        expected = "a 1-D sequence" + ("" if length is None else f" of length {length}")
        raise ValueError(f"{name} must be {expected}, got shape {tuple(index.shape)}.")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices, got dtype {index.dtype}.")
    index = index.long().cpu()
    bad = torch.nonzero((index < 0) | (index >= bound)).flatten().tolist()
    if bad:
        raise ValueError(
            f"{name} must hold {bound_name} indices in [0, {bound}); positions {format_indices(bad)} hold "
            f"{format_indices(index[bad].tolist())}."
        )
    return index


class RankCounts(NamedTuple):
    """Per-query counts (``[N_q]`` LongTensors, CPU) that fix where a query's first correct key lands when tied keys
    are ordered at random; ``s*`` is the query's best correct score.

    Attributes:
        higher: wrong keys scoring strictly above ``s*``.
        tied_wrong: wrong keys scoring exactly ``s*``.
        tied_correct: correct keys scoring exactly ``s*`` (at least 1).
    """

    higher: torch.Tensor
    tied_wrong: torch.Tensor
    tied_correct: torch.Tensor


def hit_probability(counts: RankCounts, k: int) -> torch.Tensor:
    """``[N_q]`` float64: the probability that a correct key is among the ``k`` best keys when ties are broken at
    random, ``P(X < k - higher)`` with ``P(X >= j) = prod_{i < j} (1 - tied_correct / (tied - i))``, ``tied`` being
    ``tied_wrong + tied_correct`` (that is, ``C(tied_wrong, j) / C(tied, j)``)."""
    higher, wrong, correct = (count.double() for count in counts)
    slots = k - higher  # places of the top k left to the tied keys
    j = torch.minimum(slots.clamp(min=0), wrong)  # a miss puts these j tied wrong keys first
    log_miss = torch.zeros_like(j)
    for i in range(k):  # a sum of log1p, accurate even when a hit is very unlikely
        log_miss += torch.where(i < j, torch.log1p(-correct / (wrong + correct - i).clamp(min=1)), 0.0)
    return torch.where(slots <= 0, 0.0, torch.where(slots > wrong, 1.0, -torch.expm1(log_miss)))


def recall_at_k(counts: RankCounts, ks: Iterable[int]) -> dict[int, float]:
    """Expected percentage of queries with a correct key among the ``k`` best keys, ties broken at random, for
    every ``k``."""
    return {k: 100.0 * hit_probability(counts, k).mean().item() for k in ks}


def progress(iterable: Iterable[_T], total: int, show_progress_bar: bool | None, desc: str) -> Iterator[_T]:
    """Wrap ``iterable`` in a tqdm bar: ``None`` shows it only when there are at least two steps."""
    show = total >= 2 if show_progress_bar is None else show_progress_bar
    return iter(tqdm(iterable, total=total, desc=desc, disable=not show))


@torch.no_grad()
def rank_counts(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positive_query_index: Sequence[int] | torch.Tensor,
    positive_key_index: Sequence[int] | torch.Tensor,
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
    desc: str = "Ranking",
) -> RankCounts:
    """Count, for every query, the keys scoring above and exactly at its best correct score, by cosine similarity.

    Identical keys always score identically (they are scored once), so duplicated or collapsed embeddings tie
    exactly whatever ``chunk_size`` and the matrix-product kernels do.

    Args:
        queries: ``[N_q, D]`` query embeddings (L2-normalised here).
        keys: ``[N_k, D]`` key embeddings (L2-normalised here).
        positive_query_index, positive_key_index: the correct (query, key) pairs, one pair per position; every
            query must appear in at least one pair and may appear in several.
        chunk_size: number of queries scored against all keys at once (memory is ``chunk_size x N_k``).
        show_progress_bar: tqdm bar over the chunks; ``None`` shows it when there are at least two chunks.
        desc: label of the progress bar.

    Returns:
        The :class:`RankCounts` of every query, for :func:`recall_at_k` and :func:`hit_probability`.
    """
    queries = check_embeddings("queries", queries)
    keys = check_embeddings("keys", keys, dim=queries.shape[1]).to(queries.device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    num_queries, num_keys = queries.shape[0], keys.shape[0]
    pair_queries = check_index("positive_query_index", positive_query_index, None, num_queries, "query")
    pair_keys = check_index("positive_key_index", positive_key_index, len(pair_queries), num_keys, "key")
    missing = torch.nonzero(torch.bincount(pair_queries, minlength=num_queries) == 0).flatten().tolist()
    if missing:
        raise ValueError(f"queries {format_indices(missing)} have no correct key; every query needs at least one.")

    order = torch.argsort(pair_queries, stable=True)
    pair_queries, pair_keys = pair_queries[order].to(queries.device), pair_keys[order].to(queries.device)
    starts = list(range(0, num_queries, chunk_size))
    bounds = torch.searchsorted(pair_queries, torch.tensor(starts + [num_queries], device=queries.device)).tolist()

    # A matrix product may sum identical columns in different orders (e.g. one query at a time), so score each
    # distinct key once and copy its scores to its duplicates.
    distinct_keys, key_to_distinct = torch.unique(F.normalize(keys, dim=-1), dim=0, return_inverse=True)
    queries = F.normalize(queries, dim=-1)
    counts = []
    for chunk, start in enumerate(progress(starts, len(starts), show_progress_bar, desc)):
        scores = (queries[start:start + chunk_size] @ distinct_keys.t())[:, key_to_distinct]
        rows = pair_queries[bounds[chunk]:bounds[chunk + 1]] - start
        columns = pair_keys[bounds[chunk]:bounds[chunk + 1]]
        best = torch.full((scores.shape[0],), -torch.inf, device=scores.device)
        best = best.scatter_reduce(0, rows, scores[rows, columns], reduce="amax")[:, None]
        correct = torch.zeros_like(scores, dtype=torch.bool)
        correct[rows, columns] = True
        tied = scores == best
        tied_correct = (tied & correct).sum(dim=1)
        counts.append(torch.stack([(scores > best).sum(dim=1), tied.sum(dim=1) - tied_correct, tied_correct]).cpu())
    return RankCounts(*torch.cat(counts, dim=1))
