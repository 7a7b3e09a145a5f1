"""Stage-1 data: query / positive / hard-negative triples from two captions of each image, and their collator."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset

from ..data import ROW_INDEX, require_columns
from ..modeling import LLM2CLIPTextModel
from ..modeling.caption_tokenization import collate_left_padded
from .data_statistics import BATCH_STATISTICS, batch_statistics

QUERY, POSITIVE, NEGATIVE, QUERY_IS_SHORT = "query", "positive", "negative", "query_is_short"


def build_caption_pairs(dataset: Dataset, short_column: str, long_column: str, seed: int,
                        hard_negatives: bool = True) -> Dataset:
    """Add ``query``, ``positive``, ``negative`` and ``query_is_short`` columns, as the official stage-1 data does.

    Per row a coin flip picks the direction (short query -> long positive, or the reverse); the hard negative is
    the caption, of the positive's kind, of another row. Deterministic for a given ``seed``.
    """
    require_columns(dataset, [short_column, long_column], "Caption contrastive training")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"Caption contrastive training needs at least 2 rows, got {n}.")
    rng = np.random.default_rng(seed)
    query_is_short = rng.random(n) < 0.5
    # A random cyclic order: each row's negative is the row after it, never the row itself.
    order = rng.permutation(n)
    negative_row = np.empty(n, dtype=np.int64)
    negative_row[order] = np.roll(order, -1)

    def to_triples(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        short, long = batch[short_column], batch[long_column]
        flips = query_is_short[indices]
        out = {
            QUERY: [s if f else l for s, l, f in zip(short, long, flips)],
            POSITIVE: [l if f else s for s, l, f in zip(short, long, flips)],
            QUERY_IS_SHORT: flips.tolist(),
        }
        if hard_negatives:
            other = dataset.select(negative_row[indices])
            out[NEGATIVE] = [l if f else s for s, l, f in zip(other[short_column], other[long_column], flips)]
        return out

    fingerprint = f"llm2clip-pairs-{dataset._fingerprint}-{short_column}-{long_column}-{seed}-{hard_negatives}"
    return dataset.map(to_triples, batched=True, with_indices=True, desc="Building caption pairs",
                       new_fingerprint=fingerprint[:64] if len(fingerprint) <= 64 else _digest(fingerprint))


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:32]


class CaptionPairCollator:
    """Tokenizes triples for :class:`LLM2CLIPTextModel`: the query with its direction's instruction (excluded
    from pooling), positive and negative without one. Returns one input dict per role, the row indices, and the
    number of truncated texts (``BATCH_STATISTICS``)."""

    def __init__(self, text_model: LLM2CLIPTextModel, short_query_instruction: str, long_query_instruction: str,
                 instruction_separator: str = "; ") -> None:
        self.text_model = text_model
        self.instructions = {True: short_query_instruction, False: long_query_instruction}
        self.separator = instruction_separator

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, dict]:
        pad = self.text_model.require_tokenizer().pad_token_id
        instructions = [self.instructions[bool(row[QUERY_IS_SHORT])] for row in rows]
        batch = {
            QUERY: self.text_model.tokenize_items([row[QUERY] for row in rows], instructions, self.separator),
            POSITIVE: self.text_model.tokenize_items([row[POSITIVE] for row in rows]),
        }
        if NEGATIVE in rows[0]:
            batch[NEGATIVE] = self.text_model.tokenize_items([row[NEGATIVE] for row in rows])
        collated: dict = {role: collate_left_padded(items, pad) for role, items in batch.items()}
        if ROW_INDEX in rows[0]:
            collated[ROW_INDEX] = torch.tensor([int(row[ROW_INDEX]) for row in rows])
        truncated = sum(item.truncated for items in batch.values() for item in items)
        collated[BATCH_STATISTICS] = batch_statistics(truncated_captions=truncated)
        return collated
