"""Sentence pooling over the caption tokens marked by a pooling mask."""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token")


def check_pooling_mode(mode: str) -> str:
    """Return ``mode`` if it is supported, else raise a ``ValueError`` listing the supported modes."""
    if mode not in POOLING_MODES:
        raise ValueError(f"Unknown pooling_mode {mode!r}; choose one of {list(POOLING_MODES)}.")
    return mode


def pool(hidden_states: torch.Tensor, pooling_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``(batch, seq, dim)`` states over the positions where ``pooling_mask`` is 1.

    ``mean`` averages them; ``weighted_mean`` weights the k-th pooled token by k (normalised), llm2vec's
    position-weighted mean; ``eos_token`` and ``last_token`` take the last pooled position.
    """
    check_pooling_mode(mode)
    if mode in ("eos_token", "last_token"):
        positions = torch.arange(pooling_mask.shape[1], device=pooling_mask.device)
        last = (pooling_mask.bool() * positions).argmax(dim=1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]
    weights = pooling_mask.to(hidden_states.dtype)
    if mode == "weighted_mean":
        weights = torch.cumsum(weights, dim=1) * weights
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.einsum("bs,bsd->bd", weights, hidden_states)
