"""Caption cells: the one rule of what a usable cell is (:func:`caption_problem`) and the helpers built on it, which
read, check or drop caption cells for embedding, training (map-style and streamed) and evaluation.

The rule: a usable caption cell is one string that is not empty or only white space, or a non-empty list / tuple
of such strings. Anything else is unusable: ``None``, a number, an empty or white-space-only string, an empty list
(a row of no caption cannot be trained on: a stage-2 row draws one of its captions), or a list holding one bad
caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Dataset
from transformers.utils import logging as hf_logging

from .loading import ROW_INDEX, require_columns

logger = hf_logging.get_logger(__name__)


def caption_problem(cell: Any) -> str | None:
    """Why ``cell`` is not a usable caption cell (see the module), or ``None`` when it is."""
    texts = cell if isinstance(cell, (list, tuple)) else [cell]
    if not texts:
        return f"the cell is an empty {type(cell).__name__}, not one or more non-empty strings"
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            return f"the caption is {text!r}, not a non-empty string"
    return None


def caption_cell_texts(cell: Any, column: str, row: int) -> list[str]:
    """The captions of one usable cell; a ``ValueError`` naming ``row`` and ``column`` for an unusable one."""
    problem = caption_problem(cell)
    if problem is not None:
        raise _caption_error(problem, column, row)
    return list(cell) if isinstance(cell, (list, tuple)) else [cell]


def _caption_error(problem: str, column: str, row: int) -> ValueError:
    return ValueError(f"Row {row}, column {column!r}: {problem}. Fix or drop that row (e.g. dataset.filter(...)) "
                      "before embedding or evaluating.")


def flatten_captions(cells: Sequence[Any], column: str, first_row: int = 0) -> tuple[list[str], list[int]]:
    """The captions of consecutive cells of one column and, for each, the position of its cell; an unusable cell
    (see the module: an empty list too) raises a ``ValueError`` naming its row (``first_row`` + position)."""
    texts: list[str] = []
    owners: list[int] = []
    for offset, cell in enumerate(cells):
        cell_texts = caption_cell_texts(cell, column, first_row + offset)
        texts += cell_texts
        owners += [offset] * len(cell_texts)
    return texts, owners


def caption_texts(dataset: Dataset, caption_columns: Sequence[str]) -> tuple[list[str], list[int]]:
    """All captions of ``caption_columns`` and, for each, the row it belongs to. Rows are in order; a row's
    captions follow the column order. An unusable cell raises a ``ValueError`` naming its row."""
    texts: list[str] = []
    rows: list[int] = []
    columns = [dataset[c] for c in caption_columns]
    for row, cells in enumerate(zip(*columns)):
        for column, cell in zip(caption_columns, cells):
            cell_texts = caption_cell_texts(cell, column, row)
            texts += cell_texts
            rows += [row] * len(cell_texts)
    return texts, rows


def bad_caption_rows(dataset: Dataset, caption_columns: Sequence[str]) -> list[int]:
    """The rows (positions, ascending) with an unusable cell in any of ``caption_columns``."""
    bad = set()
    for column in caption_columns:
        bad.update(i for i, cell in enumerate(dataset[column]) if caption_problem(cell) is not None)
    return sorted(bad)


def drop_bad_caption_rows(dataset: Dataset, caption_columns: Sequence[str], skip: bool) -> Dataset:
    """Remove rows with unusable captions, logging how many and which (``skip``), or stop naming the first one."""
    require_columns(dataset, caption_columns, "Training")
    bad = bad_caption_rows(dataset, caption_columns)
    if not bad:
        return dataset
    rows = ROW_INDEX in dataset.column_names and dataset[ROW_INDEX]
    names = [rows[i] if rows else i for i in bad]
    if not skip:
        first = dataset[bad[0]]
        raise ValueError(
            f"Row {names[0]} has an empty, missing or non-string caption in {list(caption_columns)}: "
            f"{ {c: first[c] for c in caption_columns} }. Fix or drop it, or train with skip_bad_rows=True "
            f"({len(bad)} such rows in all)."
        )
    logger.warning(f"Skipping {len(bad)} of {len(dataset)} rows with empty, missing or non-string captions "
                   f"(rows {names[:10]}{' ...' if len(bad) > 10 else ''}).")
    keep = sorted(set(range(len(dataset))) - set(bad))
    return dataset.select(keep)


def has_good_captions(row: dict[str, Any], caption_columns: Sequence[str], skip: bool) -> bool:
    """Filter function of one streamed row: whether all its caption cells are usable; with ``skip`` false an
    unusable one raises a ``ValueError`` naming the row by ``ROW_INDEX``."""
    for column in caption_columns:
        problem = caption_problem(row[column])
        if problem is not None:
            if skip:
                return False
            raise _caption_error(problem, column, int(row[ROW_INDEX]))
    return True
