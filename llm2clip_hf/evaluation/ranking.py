"""The chunked ranking primitive shared by every retrieval-style metric.

Every metric of :mod:`llm2clip_hf.evaluation` reduces to one number per query: the *rank* of its best-scoring
correct key, defined as the number of keys whose cosine similarity to the query is **strictly greater** than
that of the best correct key. A query is a hit at ``k`` when ``rank < k``.

Ties therefore count in the query's favour: a correct key tied with wrong keys is ranked ahead of all of them.
The rule depends only on the scores, never on the order of the keys or on how the queries are chunked, so the
result is deterministic (unlike ``torch.topk``, whose choice among tied scores is unspecified).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

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


def recall_at_k(ranks: torch.Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Percentage of queries whose rank is below ``k``, for every ``k``."""
    return {k: 100.0 * (ranks < k).double().mean().item() for k in ks}


def progress(iterable: Iterable[_T], total: int, show_progress_bar: bool | None, desc: str) -> Iterator[_T]:
    """Wrap ``iterable`` in a tqdm bar: ``None`` shows it only when there are at least two steps."""
    show = total >= 2 if show_progress_bar is None else show_progress_bar
    return iter(tqdm(iterable, total=total, desc=desc, disable=not show))


@torch.no_grad()
def best_correct_rank(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positive_query_index: Sequence[int] | torch.Tensor,
    positive_key_index: Sequence[int] | torch.Tensor,
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
    desc: str = "Ranking",
) -> torch.Tensor:
    """Rank of the best correct key of every query, by cosine similarity.

    Args:
        queries: ``[N_q, D]`` query embeddings (L2-normalised here).
        keys: ``[N_k, D]`` key embeddings (L2-normalised here).
        positive_query_index, positive_key_index: the correct (query, key) pairs, one pair per position; every
            query must appear in at least one pair and may appear in several.
        chunk_size: number of queries scored against all keys at once (memory is ``chunk_size x N_k``).
        show_progress_bar: tqdm bar over the chunks; ``None`` shows it when there are at least two chunks.
        desc: label of the progress bar.

    Returns:
        ``[N_q]`` LongTensor (CPU): for each query, the number of keys with strictly greater similarity than its
        best-scoring correct key (``0`` means a correct key is ranked first, ties counting in its favour).
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

    queries, keys = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    ranks = []
    for chunk, start in enumerate(progress(starts, len(starts), show_progress_bar, desc)):
        scores = queries[start:start + chunk_size] @ keys.t()
        rows = pair_queries[bounds[chunk]:bounds[chunk + 1]] - start
        pair_scores = scores[rows, pair_keys[bounds[chunk]:bounds[chunk + 1]]]
        best = torch.full((scores.shape[0],), -torch.inf, device=scores.device)
        best = best.scatter_reduce(0, rows, pair_scores, reduce="amax")
        ranks.append((scores > best[:, None]).sum(dim=1).cpu())
    return torch.cat(ranks)
