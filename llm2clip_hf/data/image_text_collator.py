"""Stage-2 batches: images with one caption per example, as cached LLM embeddings or as text for the LLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from .embedding_cache import embedding_column, embeddings_as_float32
from .images import CLIPImageTransform
from .loading import ROW_INDEX
from ..modeling import LLM2CLIPTextModel
from .data_statistics import BATCH_STATISTICS, batch_statistics
from .epoch_sampling import EPOCH
from .._moved import moved_names

logger = hf_logging.get_logger(__name__)


class ImageTextCollator:
    """Builds ``pixel_values`` and either ``llm_embeddings`` (cached) or token inputs (LLM in the loop).

    Each training example draws one caption column (weights default to uniform, the official 50/50 short/dense) and
    its crop from a generator seeded by ``(seed, epoch, row)``, the epoch coming with the row (``EPOCH``, see
    :mod:`.epoch_sampling`): the batch is the same whatever the number of processes or DataLoader workers, and a
    resumed run draws what the uninterrupted run drew. Rows without an epoch (evaluation) draw from ``(seed, row)``,
    the same choice at every evaluation; they go through ``evaluation_transform`` (default: ``image_transform``)
    and are never skipped: an unreadable one is an error. Counts of skipped rows and truncated captions travel in
    the batch (``BATCH_STATISTICS``).
    """

    def __init__(self, image_column: str, caption_columns: Sequence[str], image_transform: CLIPImageTransform,
                 seed: int, weights: Sequence[float] | None = None, text_model: LLM2CLIPTextModel | None = None,
                 skip_bad_rows: bool = True, evaluation_transform: CLIPImageTransform | None = None) -> None:
        self.image_column = image_column
        self.caption_columns = list(caption_columns)
        weights = np.ones(len(caption_columns)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.image_transform = image_transform
        self.evaluation_transform = evaluation_transform or image_transform
        self.seed = seed
        self.text_model = text_model
        self.skip_bad_rows = skip_bad_rows
        self._warned = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, chosen, rngs, skipped = [], [], [], []
        for row in rows:
            index, training = int(row[ROW_INDEX]), EPOCH in row
            rng = np.random.default_rng([self.seed, int(row[EPOCH]), index] if training else [self.seed, index])
            column = self.caption_columns[rng.choice(len(self.caption_columns), p=self.probabilities)]
            transform = self.image_transform if training else self.evaluation_transform
            try:
                pixels.append(transform(row[self.image_column], rng))
            except Exception as error:  # noqa: BLE001 - any unreadable image is a bad row
                self._bad_row(index, error, skip=self.skip_bad_rows and training)
                skipped.append(index)
                continue
            rngs.append(rng)
            chosen.append((row, column))
        if not pixels:
            raise ValueError(f"Every row of this batch has an unreadable image (rows {skipped}).")
        batch: dict[str, Any] = {"pixel_values": torch.stack(pixels),
                                 ROW_INDEX: torch.tensor([int(row[ROW_INDEX]) for row, _ in chosen])}
        truncated = 0
        if self.text_model is None:
            vectors = [_one_of(row[embedding_column(column)], rng, is_vector=True) for (row, column), rng in
                       zip(chosen, rngs)]
            batch["llm_embeddings"] = torch.from_numpy(embeddings_as_float32(np.stack(vectors)))
        else:
            items = self.text_model.tokenize_items([_one_of(row[column], rng) for (row, column), rng in
                                                    zip(chosen, rngs)])
            truncated = sum(item.truncated for item in items)
            batch.update(self.text_model.collate(items))
        batch[BATCH_STATISTICS] = batch_statistics(skipped, truncated)
        return batch

    def _bad_row(self, index: int, error: Exception, skip: bool) -> None:
        reason = f"row {index}: cannot read the image ({type(error).__name__}: {error})"
        if not skip:
            raise ValueError(f"{reason}. Fix or drop the row, or train with skip_bad_rows=True.") from error
        if not self._warned:
            self._warned = True
            logger.warning(f"Skipping {reason}; further bad rows are skipped and counted (skip_bad_rows=True).")


def _one_of(value: Any, rng: np.random.Generator, is_vector: bool = False) -> Any:
    """The cell itself, or one random element when the cell holds several captions (or their embeddings: numpy
    arrays under the trainer's numpy format, lists otherwise)."""
    if is_vector:
        array = np.asarray(value)
        if array.dtype == object or array.ndim == 2:  # several vectors (of one row)
            return np.asarray(array[int(rng.integers(len(array)))])
        return array
    if not isinstance(value, (list, tuple, np.ndarray)):
        return value
    return value[int(rng.integers(len(value)))]

__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)
