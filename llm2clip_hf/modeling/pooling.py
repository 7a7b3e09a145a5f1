"""Sentence pooling over the tokens marked by a pooling mask (the caption, or every token: see ``pooled_tokens``)."""

from __future__ import annotations

import torch

# llm2vec's modes (the LLM2Vec form takes these), then sentence-transformers' others, for models loaded from it (its
# "lasttoken" is "last_token", its "weightedmean" "weighted_mean").
LLM2VEC_POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token")
POOLING_MODES = (*LLM2VEC_POOLING_MODES, "cls", "max", "mean_sqrt_len_tokens")


def check_pooling_mode(mode: str) -> str:
    """Return ``mode`` if it is supported, else raise a ``ValueError`` listing the supported modes."""
    if mode not in POOLING_MODES:
        raise ValueError(f"Unknown pooling_mode {mode!r}; choose one of {list(POOLING_MODES)}.")
    return mode


def pool(hidden_states: torch.Tensor, pooling_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``(batch, seq, dim)`` states over the positions where ``pooling_mask`` is 1.

    ``mean`` averages them; ``weighted_mean`` weights the k-th pooled token by k (normalised), llm2vec's
    position-weighted mean; ``eos_token`` and ``last_token`` take the last pooled position, ``cls`` the first;
    ``max`` is the element-wise maximum and ``mean_sqrt_len_tokens`` the sum divided by the square root of the count,
    as sentence-transformers' ``Pooling`` computes them.
    """
    check_pooling_mode(mode)
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    if mode in ("eos_token", "last_token"):
        positions = torch.arange(pooling_mask.shape[1], device=pooling_mask.device)
        last = (pooling_mask.bool() * positions).argmax(dim=1)
        return hidden_states[rows, last]
    if mode == "cls":
        return hidden_states[rows, pooling_mask.int().argmax(dim=1)]
    if mode == "max":
        return hidden_states.masked_fill(~pooling_mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)
    weights = pooling_mask.to(hidden_states.dtype)
    if mode == "mean_sqrt_len_tokens":
        return torch.einsum("bs,bsd->bd", weights, hidden_states) / weights.sum(dim=1, keepdim=True).clamp(
            min=1e-9).sqrt()
    if mode == "weighted_mean":
        weights = torch.cumsum(weights, dim=1) * weights
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.einsum("bs,bsd->bd", weights, hidden_states)
