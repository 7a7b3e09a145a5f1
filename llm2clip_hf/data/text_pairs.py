"""Stage-1 data: query / positive / hard-negative triples from two captions of each image or from text pairs, and
their collator.

Every prepared row holds ``query``, ``positive`` (optionally ``negative``) and ``query_instruction``, the instruction
put before its query and excluded from pooling (``""``: none).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, Value, concatenate_datasets

from .captions import drop_bad_caption_rows
from .loading import ROW_INDEX, require_columns
from ..modeling import LLM2CLIPTextModel
from .data_statistics import BATCH_STATISTICS, batch_statistics
from .._moved import moved_names

QUERY, POSITIVE, NEGATIVE, QUERY_IS_SHORT = "query", "positive", "negative", "query_is_short"
QUERY_INSTRUCTION = "query_instruction"  # of every prepared row
INSTRUCTION = "instruction"  # optional per-row query instruction of a text-pair source
TEXTS, ROLES = "texts", "roles"  # a collated batch: all texts of the step, and the roles of its equal blocks


def build_caption_pairs(dataset: Dataset, short_column: str, long_column: str, seed: int,
                        hard_negatives: bool = True, *, short_query_instruction: str,
                        long_query_instruction: str) -> Dataset:
    """Add ``query``, ``positive``, ``negative``, ``query_is_short`` and ``query_instruction`` columns, as the
    official stage-1 data does.

    Per row a coin flip picks the direction (short query -> long positive, or the reverse) and with it the query's
    instruction; the hard negative is the caption, of the positive's kind, of another row. Deterministic for a
    given ``seed``.
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
            QUERY_INSTRUCTION: [short_query_instruction if f else long_query_instruction for f in flips],
        }
        if hard_negatives:
            other = dataset.select(negative_row[indices])
            out[NEGATIVE] = [l if f else s for s, l, f in zip(other[short_column], other[long_column], flips)]
        return out

    fingerprint = (f"llm2clip-pairs-{dataset._fingerprint}-{short_column}-{long_column}-{seed}-{hard_negatives}-"
                   f"{short_query_instruction}-{long_query_instruction}")
    return dataset.map(to_triples, batched=True, with_indices=True, desc="Building caption pairs",
                       new_fingerprint=fingerprint[:64] if len(fingerprint) <= 64 else _digest(fingerprint))


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:32]


def text_pair_source(dataset: Dataset, instruction: str | None, query_column: str = QUERY,
                     positive_column: str = POSITIVE, negative_column: str | None = None) -> Dataset:
    """``dataset`` as a stage-1 text-pair source (e.g. one E5 retrieval task): its columns renamed to ``query``,
    ``positive`` and, from ``negative_column``, ``negative`` (a hard negative), and an ``instruction`` column holding
    ``instruction`` for every query (``None`` keeps the dataset's own ``instruction`` column, if any)."""
    columns = {query_column: QUERY, positive_column: POSITIVE}
    if negative_column is not None:
        columns[negative_column] = NEGATIVE
    require_columns(dataset, list(columns), "A text-pair source (CLI: --pair-columns)")
    dataset = dataset.rename_columns({old: new for old, new in columns.items() if old != new})
    if instruction is None:
        return dataset
    if INSTRUCTION in dataset.column_names:
        dataset = dataset.remove_columns(INSTRUCTION)
    return dataset.add_column(INSTRUCTION, [instruction] * len(dataset))


def build_text_pairs(dataset: Dataset, hard_negatives: bool, skip_bad_rows: bool) -> Dataset:
    """Prepare a text-pair source (``query``, ``positive``, optional ``negative`` and ``instruction`` columns): drop
    rows with unusable texts (see :func:`~llm2clip_hf.data.drop_bad_caption_rows`), drop ``negative`` unless
    ``hard_negatives``, and add ``query_instruction`` (the row's ``instruction``, ``""`` for none)."""
    if NEGATIVE in dataset.column_names and not hard_negatives:
        dataset = dataset.remove_columns(NEGATIVE)
    texts = [column for column in (QUERY, POSITIVE, NEGATIVE) if column in dataset.column_names]
    dataset = drop_bad_caption_rows(dataset, texts, skip_bad_rows)

    def add_instruction(batch: dict[str, list]) -> dict[str, list]:
        instructions = batch.get(INSTRUCTION) or [None] * len(batch[QUERY])
        return {QUERY_INSTRUCTION: [text or "" for text in instructions]}

    return dataset.map(add_instruction, batched=True, desc="Building text pairs")


def check_negatives_agree(sources: dict[str, Dataset]) -> None:
    """Prepared sources mixed in one run must all have hard negatives or none: a batch is
    ``[queries; positives; negatives]``."""
    without = [name for name, dataset in sources.items() if NEGATIVE not in dataset.column_names]
    if without and len(without) < len(sources):
        with_negatives = [name for name in sources if name not in without]
        raise ValueError(
            f"The stage-1 sources {with_negatives} have hard negatives but {without} have none, and a run's batches "
            f"all need them or none. Add a '{NEGATIVE}' column to {without} (text_pair_source(..., negative_column=...)"
            f" or --pair-columns QUERY POSITIVE NEGATIVE), or train without hard negatives (hard_negatives=False, "
            "--hard-negatives false)."
        )


def concatenate_sources(sources: dict[str, Dataset]) -> Dataset:
    """Prepared sources one after another (in their order), with only the columns the collator reads."""
    first = next(iter(sources.values()))
    columns = [c for c in (ROW_INDEX, QUERY, POSITIVE, NEGATIVE, QUERY_INSTRUCTION) if c in first.column_names]
    features = Features({c: Value("int64") if c == ROW_INDEX else Value("string") for c in columns})
    parts = [dataset.select_columns(columns) for dataset in sources.values()]
    return concatenate_datasets([part if part.features == features else part.cast(features) for part in parts])


class TextPairCollator:
    """Tokenizes prepared rows for :class:`LLM2CLIPTextModel` into ONE batch padded on the model's side, so that a
    step runs the LLM once: the queries, each with its row's ``query_instruction`` (excluded from pooling in the
    LLM2Vec form), then the positives and the hard negatives without one (``ROLES`` names the blocks, in that order,
    each of ``len(rows)`` rows). Also returns the row indices and the number of truncated texts
    (``BATCH_STATISTICS``)."""

    def __init__(self, text_model: LLM2CLIPTextModel, instruction_separator: str = "; ") -> None:
        self.text_model = text_model
        self.separator = instruction_separator

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        instructions = [row[QUERY_INSTRUCTION] for row in rows]
        roles = [QUERY, POSITIVE] + ([NEGATIVE] if NEGATIVE in rows[0] else [])
        items = self.text_model.tokenize_items([row[QUERY] for row in rows], instructions, self.separator)
        for role in roles[1:]:
            items += self.text_model.tokenize_items([row[role] for row in rows])
        collated: dict[str, Any] = {TEXTS: self.text_model.collate(items), ROLES: roles}
        if ROW_INDEX in rows[0]:
            collated[ROW_INDEX] = torch.tensor([int(row[ROW_INDEX]) for row in rows])
        collated[BATCH_STATISTICS] = batch_statistics(truncated_captions=sum(item.truncated for item in items))
        return collated


def split_roles(embeddings: torch.Tensor, roles: list[str]) -> dict[str, torch.Tensor]:
    """The embeddings of a :class:`TextPairCollator` batch, per role."""
    return dict(zip(roles, embeddings.chunk(len(roles))))

__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)
