"""Caption retrieval accuracy (CRA), the text-side probe of the LLM2CLIP paper: how well a text encoder tells
captions of the same image apart from captions of other images."""

from __future__ import annotations

import torch

from .ranking import check_embeddings, rank_counts, recall_at_k


def caption_retrieval_accuracy(
    query_embeds: torch.Tensor,
    key_embeds: torch.Tensor,
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
) -> float:
    """Percentage of query captions ``i`` whose most similar key caption (cosine, among all ``N``) is key ``i``.

    ``query_embeds[i]`` and ``key_embeds[i]`` embed two captions of the same image. Keys tied with key ``i``
    count by the expectation under random tie-breaking (see :mod:`.ranking`): with ``t`` wrong keys tied and none
    higher, query ``i`` scores ``1 / (t + 1)``. Collapsed embeddings thus score chance level ``100 / N``.

    Args:
        query_embeds: ``[N, D]`` embeddings of one caption per image.
        key_embeds: ``[N, D]`` embeddings of another caption of the same images, in the same order.
        chunk_size: queries scored at once.
        show_progress_bar: tqdm bar over chunks; ``None`` shows it when there are at least two chunks.
    """
    query_embeds = check_embeddings("query_embeds", query_embeds)
    key_embeds = check_embeddings("key_embeds", key_embeds, dim=query_embeds.shape[1])
    if key_embeds.shape[0] != query_embeds.shape[0]:
        raise ValueError(
            f"query_embeds has {query_embeds.shape[0]} rows but key_embeds has {key_embeds.shape[0]}; row i of "
            "both must embed two captions of the same image i."
        )
    pairs = torch.arange(query_embeds.shape[0])
    counts = rank_counts(query_embeds, key_embeds, pairs, pairs, chunk_size, show_progress_bar,
                         desc="Caption retrieval")
    return recall_at_k(counts, [1])[1]


def caption_retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
) -> dict[str, float]:
    """CRA in both directions, ``a`` -> ``b`` and ``b`` -> ``a``, and their mean ``cra`` (percent)."""
    a_to_b = caption_retrieval_accuracy(a, b, chunk_size, show_progress_bar)
    b_to_a = caption_retrieval_accuracy(b, a, chunk_size, show_progress_bar)
    return {"cra_a_to_b": a_to_b, "cra_b_to_a": b_to_a, "cra": (a_to_b + b_to_a) / 2}
