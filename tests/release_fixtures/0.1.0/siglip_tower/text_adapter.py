"""LLM2CLIP's text adapter: maps frozen LLM sentence embeddings into the joint image-text space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLPBlock(nn.Module):
    """``x + fn(ln(x))`` with ``fn = Linear(d -> e*d), GELU, Dropout, Linear(e*d -> d)`` (official ``LinearBlock``)."""

    def __init__(self, dim: int, expansion: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.fn = nn.Sequential(
            nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(expansion * dim, dim)
        )
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


INPUT_NORMALIZATIONS = ("center", "standardize")


class TextAdapter(nn.Module):
    """Optionally normalise the LLM embedding with statistics of the training embeddings (``input_normalization``:
    ``"center"`` subtracts their mean, ``"standardize"`` also divides by their per-dimension standard deviation; the
    buffers ``input_mean`` / ``input_scale``, fitted once by the trainer), then L2-normalise it (``l2_normalize``;
    the official SigLIP2 model skips it), then ``num_blocks`` residual MLP blocks, a LayerNorm and a Linear to
    ``output_dim``. Without ``input_normalization`` this is the official adapter.

    Why normalise: mean-pooled LLM embeddings share a large common component (a stage-1 SmolLM2-135M's have a
    mean pairwise cosine of 0.95), so after L2 normalisation they differ by a few percent and a new adapter
    starts with nearly one output for every caption.

    Indices of ``layers`` match the official ``text.text_adaptor`` ``nn.Sequential``.
    """

    def __init__(self, input_dim: int, output_dim: int, num_blocks: int = 4, expansion: int = 2,
                 dropout: float = 0.0, l2_normalize: bool = True, input_normalization: str | None = None) -> None:
        super().__init__()
        if input_normalization is not None and input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(f"input_normalization must be None or one of {INPUT_NORMALIZATIONS}, got "
                             f"{input_normalization!r}.")
        self.l2_normalize = l2_normalize
        self.input_normalization = input_normalization
        if input_normalization is not None:
            self.register_buffer("input_mean", torch.zeros(input_dim))
            self.register_buffer("input_scale", torch.ones(input_dim))
        self.layers = nn.Sequential(
            *[ResidualMLPBlock(input_dim, expansion, dropout) for _ in range(num_blocks)],
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, output_dim),
        )

    def set_input_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fit the input normalisation to training embeddings of this ``mean`` and per-dimension ``std``."""
        if self.input_normalization is None:
            raise ValueError("This adapter has no input normalisation; build the model with "
                             "adapter_input_normalization='center' or 'standardize'.")
        with torch.no_grad():
            self.input_mean.copy_(mean)
            if self.input_normalization == "standardize":
                self.input_scale.copy_(std.clamp_min(1e-6))

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        x = llm_embeddings
        if self.input_normalization is not None:
            x = (x - self.input_mean.to(x.dtype)) / self.input_scale.to(x.dtype)
        return self.layers(F.normalize(x, p=2, dim=-1) if self.l2_normalize else x)
