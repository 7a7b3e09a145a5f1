"""Open the datasets users point the CLI at: a Hub name, a local ``imagefolder``, a ``save_to_disk`` folder, or
jsonl / json / csv / parquet files (image paths in them are resolved against the file's folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)

ROW_INDEX = "__llm2clip_row__"  # the row's position in the dataset the user gave, carried through batches
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tar": "webdataset"}
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def load_dataset_from_spec(spec: str, split: str = "train", image_column: str | None = None,
                           streaming: bool = False) -> Dataset | IterableDataset:
    """One split of the dataset named by ``spec``.

    ``spec`` is a local folder (``imagefolder`` with metadata.jsonl / .csv, a ``save_to_disk`` folder, or a folder
    of jsonl / csv / parquet / webdataset .tar files), a data file, or a Hub dataset name. String values of
    ``image_column`` in data files are paths relative to the file and are decoded as images. ``streaming=True``
    returns a ``datasets.IterableDataset`` read shard by shard (not for ``save_to_disk`` folders).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        loaded, base = _load_folder(path, streaming), path
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Cannot read {path}: use one of {sorted(FILE_BUILDERS)} files or a dataset folder.")
        loaded, base = load_dataset(builder, data_files=str(path), streaming=streaming), path.parent
    else:
        loaded, base = _load_hub(spec, split, streaming), None
    dataset = _pick_split(loaded, split, spec)
    if image_column is not None and image_column in (dataset.column_names or []) and base is not None:
        dataset = _decode_image_paths(dataset, image_column, base)
    return dataset


def _load_folder(path: Path, streaming: bool = False) -> Dataset | DatasetDict:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        if streaming:
            raise ValueError(f"{path} is a save_to_disk folder, which cannot be streamed; drop --streaming (it is "
                             "memory-mapped already) or stream the parquet / webdataset shards it was made from.")
        return load_from_disk(str(path))
    if any(next(path.rglob(name), None) is not None for name in IMAGEFOLDER_METADATA):
        return load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
    for suffix, builder in FILE_BUILDERS.items():
        files = sorted(str(p) for p in path.glob(f"*{suffix}"))
        if files:
            return load_dataset(builder, data_files=files, streaming=streaming)
    raise ValueError(
        f"{path} is neither an imagefolder (no {' / '.join(IMAGEFOLDER_METADATA)}), a save_to_disk folder, nor a "
        f"folder of {sorted(FILE_BUILDERS)} files."
    )


def _load_hub(name: str, split: str, streaming: bool = False) -> Dataset | DatasetDict:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or datasets.config.HF_HUB_OFFLINE
    try:
        return load_dataset(name, split=split, streaming=streaming)
    except FileNotFoundError as error:
        hint = (" HF_HUB_OFFLINE is set, so only datasets already in the local cache can be opened by name; "
                "download it where the Hub is reachable, or pass a local path.") if offline else ""
        raise FileNotFoundError(f"Dataset {name!r} is not a local path and could not be loaded by name: {error}.{hint}")
    except ConnectionError as error:
        raise ConnectionError(
            f"Could not reach the Hub for dataset {name!r} ({error}). Pass a local path, or set HF_HUB_OFFLINE=1 to "
            "use the local cache only."
        ) from error


def _pick_split(loaded, split: str, spec: str) -> Dataset | IterableDataset:
    if isinstance(loaded, (Dataset, IterableDataset)):
        return loaded
    if split not in loaded:
        raise ValueError(f"{spec} has no split {split!r}; it has {list(loaded)}. Choose one with --split.")
    return loaded[split]


def _decode_image_paths(dataset: Dataset | IterableDataset, image_column: str, base: Path):
    feature = dataset.features[image_column] if dataset.features is not None else None
    if isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) not in ("string", "large_string"):
        return dataset

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        return {image_column: [value if value is None or os.path.isabs(value) else str(base / value)
                               for value in batch[image_column]]}

    progress = {"desc": "Resolving image paths"} if isinstance(dataset, Dataset) else {}
    features = datasets.Features({**dataset.features, image_column: datasets.Image()})
    return dataset.map(resolve, batched=True, features=features, **progress)


def require_columns(dataset: Dataset, columns: Sequence[str], purpose: str) -> None:
    """Raise a ``ValueError`` naming missing columns and listing the columns that exist."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{purpose} needs the column(s) {missing}, but the dataset has {dataset.column_names}. "
            "Rename the columns or point the arguments (e.g. --caption-columns) at the right ones."
        )


def caption_texts(dataset: Dataset, caption_columns: Sequence[str]) -> tuple[list[str], list[int]]:
    """All captions of ``caption_columns`` (cells may hold one string or a list of strings) and, for each, the row
    it belongs to. Rows are in order; a row's captions follow the column order."""
    texts: list[str] = []
    rows: list[int] = []
    columns = [dataset[c] for c in caption_columns]
    for row, cells in enumerate(zip(*columns)):
        for column, cell in zip(caption_columns, cells):
            cell_texts, _ = flatten_captions([cell], column, first_row=row)
            texts += cell_texts
            rows += [row] * len(cell_texts)
    return texts, rows


def flatten_captions(cells: Sequence[Any], column: str, first_row: int = 0) -> tuple[list[str], list[int]]:
    """The captions of consecutive cells of one column (each one string or a list of strings) and, for each, the
    position of its cell; a missing, empty or non-string caption raises a ``ValueError`` naming its row."""
    texts: list[str] = []
    owners: list[int] = []
    for offset, cell in enumerate(cells):
        for text in (cell if isinstance(cell, (list, tuple)) else [cell]):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"Row {first_row + offset}, column {column!r}: the caption is {text!r}, not a non-empty string. "
                    "Fix or drop that row (e.g. dataset.filter(...)) before embedding or evaluating."
                )
            texts.append(text)
            owners.append(offset)
    return texts, owners


def with_row_index(dataset: Dataset) -> Dataset:
    """``dataset`` with a ``ROW_INDEX`` column (0..n-1) unless it has one, so batches can name their rows."""
    return dataset if ROW_INDEX in dataset.column_names else dataset.add_column(ROW_INDEX, list(range(len(dataset))))


def bad_caption_rows(dataset: Dataset, caption_columns: Sequence[str]) -> list[int]:
    """Rows where a caption cell is missing, empty, or not a string (or a list of non-empty strings)."""
    def good(cell) -> bool:
        cells = cell if isinstance(cell, (list, tuple)) else [cell]
        return bool(cells) and all(isinstance(c, str) and c.strip() for c in cells)

    bad = set()
    for column in caption_columns:
        bad.update(i for i, cell in enumerate(dataset[column]) if not good(cell))
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
