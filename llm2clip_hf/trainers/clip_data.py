"""Stage-2 batches: images with one caption per example, as cached LLM embeddings or as text for the LLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..modeling import LLM2CLIPTextModel
from ..modeling.caption_tokenization import collate_left_padded
from .embedding_cache import embedding_column
from .image_transforms import CLIPImageTransform

ROW_INDEX = "__llm2clip_row__"


class CLIPCollator:
    """Builds ``pixel_values`` and either ``llm_embeddings`` (cached) or token inputs (LLM in the loop).

    Each example draws one caption column (weights default to uniform, the official 50/50 short/dense) and its
    crop from a generator seeded by ``(seed, epoch, row)``: the batch is the same whatever the number of
    processes, and a resumed run draws what the uninterrupted run drew.
    """

    def __init__(self, image_column: str, caption_columns: Sequence[str], image_transform: CLIPImageTransform,
                 seed: int, weights: Sequence[float] | None = None, text_model: LLM2CLIPTextModel | None = None) -> None:
        self.image_column = image_column
        self.caption_columns = list(caption_columns)
        weights = np.ones(len(caption_columns)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.image_transform = image_transform
        self.seed = seed
        self.text_model = text_model
        self.epoch = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, chosen = [], []
        for row in rows:
            rng = np.random.default_rng([self.seed, self.epoch, int(row[ROW_INDEX])])
            column = self.caption_columns[rng.choice(len(self.caption_columns), p=self.probabilities)]
            chosen.append((row, column))
            pixels.append(self.image_transform(row[self.image_column], rng))
        batch: dict[str, torch.Tensor] = {"pixel_values": torch.stack(pixels)}
        if self.text_model is None:
            batch["llm_embeddings"] = torch.tensor(
                np.stack([np.asarray(row[embedding_column(column)], dtype=np.float32) for row, column in chosen])
            )
        else:
            items = self.text_model.tokenize_items([row[column] for row, column in chosen])
            batch.update(collate_left_padded(items, self.text_model.require_tokenizer().pad_token_id))
        return batch
