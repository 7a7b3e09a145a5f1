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
TEXTS, ROLES = "texts", "roles"  # a collated batch: all texts of the step, and the roles of its equal blocks


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
    """Tokenizes triples for :class:`LLM2CLIPTextModel` into ONE left-padded batch, so that a step runs the LLM once:
    the queries with their direction's instruction (excluded from pooling), then the positives and the hard
    negatives without one (``ROLES`` names the blocks, in that order, each of ``len(rows)`` rows). Also returns the
    row indices and the number of truncated texts (``BATCH_STATISTICS``)."""

    def __init__(self, text_model: LLM2CLIPTextModel, short_query_instruction: str, long_query_instruction: str,
                 instruction_separator: str = "; ") -> None:
        self.text_model = text_model
        self.instructions = {True: short_query_instruction, False: long_query_instruction}
        self.separator = instruction_separator

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        pad = self.text_model.require_tokenizer().pad_token_id
        instructions = [self.instructions[bool(row[QUERY_IS_SHORT])] for row in rows]
        roles = [QUERY, POSITIVE] + ([NEGATIVE] if NEGATIVE in rows[0] else [])
        items = self.text_model.tokenize_items([row[QUERY] for row in rows], instructions, self.separator)
        for role in roles[1:]:
            items += self.text_model.tokenize_items([row[role] for row in rows])
        collated: dict[str, Any] = {TEXTS: collate_left_padded(items, pad), ROLES: roles}
        if ROW_INDEX in rows[0]:
            collated[ROW_INDEX] = torch.tensor([int(row[ROW_INDEX]) for row in rows])
        collated[BATCH_STATISTICS] = batch_statistics(truncated_captions=sum(item.truncated for item in items))
        return collated


def split_roles(embeddings: torch.Tensor, roles: list[str]) -> dict[str, torch.Tensor]:
    """The embeddings of a :class:`CaptionPairCollator` batch, per role."""
    return dict(zip(roles, embeddings.chunk(len(roles))))
