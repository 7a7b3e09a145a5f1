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


class TextAdapter(nn.Module):
    """L2-normalise the input (``l2_normalize``; the official SigLIP2 model skips it), then ``num_blocks`` residual
    MLP blocks, a LayerNorm and a Linear to ``output_dim``.

    Indices of ``layers`` match the official ``text.text_adaptor`` ``nn.Sequential``.
    """

    def __init__(self, input_dim: int, output_dim: int, num_blocks: int = 4, expansion: int = 2,
                 dropout: float = 0.0, l2_normalize: bool = True) -> None:
        super().__init__()
        self.l2_normalize = l2_normalize
        self.layers = nn.Sequential(
            *[ResidualMLPBlock(input_dim, expansion, dropout) for _ in range(num_blocks)],
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, output_dim),
        )

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(llm_embeddings, p=2, dim=-1) if self.l2_normalize else llm_embeddings)
