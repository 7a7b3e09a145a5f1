"""Stage-2 cache of LLM caption embeddings, as it is read: a dataset of embedding columns, one row per source row,
tied to the text model and the data that made them, and joined to the source (images) by row (:func:`join_embeddings`).
Building it: :mod:`llm2clip_hf.data.embedding_cache_building`.

The text model's fingerprint covers everything that changes an embedding: the weights as the encoder computes with
them (LoRA adapters merged), the LLM's configuration (RoPE, norms, ...), the tokenizer, the pooling mode, the
template and the token budget. The data fingerprint covers the caption columns' contents and the number of rows.
Both are recorded in the cache's metadata (:func:`read_cache_metadata`) and checked before use
(:func:`check_embedding_cache`).

Each cache row also holds the hash of the captions it was made from (``ROW_HASH_COLUMN``). The column travels
with the embeddings (joins, ``select``, ``shuffle``, ``filter``, splits), so :func:`check_cache_rows` can verify at
any time that every row's embeddings are of that row's captions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from transformers.utils import logging as hf_logging

from .captions import flatten_captions
from .loading import require_columns
from .streaming import key_hashes
from .._moved import moved_names

logger = hf_logging.get_logger(__name__)

EMBEDDING_SUFFIX = "_llm_embedding"
METADATA_KEY = "llm2clip_embedding_cache"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # bfloat16 has no Arrow type: stored as its uint16 bit patterns
ROW_HASH_COLUMN = "llm2clip_caption_hash"  # per row: hash of the caption cells its embeddings were made from


def embedding_column(caption_column: str) -> str:
    """Name of the column holding the embeddings of ``caption_column``."""
    return f"{caption_column}{EMBEDDING_SUFFIX}"


def caption_data_fingerprint(dataset: Dataset, caption_columns: Sequence[str], batch_size: int = 10_000) -> str:
    """Hash of the number of rows and the contents of ``caption_columns``: what a cache of their embeddings is of.

    Reads the columns in batches (memory does not grow with the dataset) and stops at the first unusable caption
    with a ``ValueError`` naming its row, before any embedding is computed."""
    digest = hashlib.blake2b(json.dumps([len(dataset), list(caption_columns)]).encode(), digest_size=16)
    for column in caption_columns:
        start = 0
        for batch in dataset.select_columns([column]).with_format(None).iter(batch_size=batch_size):
            flatten_captions(batch[column], column, start)
            digest.update(json.dumps(batch[column], default=str).encode())
            start += len(batch[column])
    return digest.hexdigest()


def read_cache_metadata(dataset: Dataset) -> dict[str, Any] | None:
    """The cache metadata stored with a dataset by :func:`~llm2clip_hf.data.build_embedding_cache`, if any."""
    try:
        return json.loads(dataset.info.description or "")[METADATA_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def check_embedding_cache(dataset: Dataset, caption_columns: Sequence[str], expected_fingerprint: str | None = None,
                          embedding_dim: int | None = None, expected_dtype: str | None = None) -> dict[str, Any]:
    """Validate a dataset's cached embeddings: present for every caption column, made by the expected text model,
    of the adapter's width. Returns the cache metadata; raises ``ValueError`` saying what to do otherwise.

    ``expected_dtype`` (the expected text model's weight dtype, e.g. ``"bfloat16"``) only makes the refusal of
    another text model say whether the weight dtypes differ. Row alignment is :func:`check_cache_rows`'s."""
    metadata = read_cache_metadata(dataset)
    if metadata is None:
        raise ValueError(
            "The dataset carries no LLM2CLIP embedding cache metadata. Make the embeddings with "
            "precompute_text_embeddings(...) or `llm2clip-hf embed`, which record the text model that made them."
        )
    missing = [c for c in caption_columns if embedding_column(c) not in dataset.column_names]
    if missing:
        raise ValueError(
            f"No cached embeddings for caption column(s) {missing}; cached columns: "
            f"{[c for c in dataset.column_names if c.endswith(EMBEDDING_SUFFIX)]}. Run the cache step for them."
        )
    if expected_fingerprint is not None and metadata["fingerprint"] != expected_fingerprint:
        expected = {"fingerprint": expected_fingerprint, "text_model_dtype": expected_dtype}
        raise ValueError(
            f"The embedding cache was made by a different text model ({describe_text_model(metadata)}) than the one "
            f"expected here ({describe_text_model(expected)}). {text_model_difference(metadata, expected)} "
            "Recompute the cache with this text model."
        )
    if embedding_dim is not None and metadata["embedding_dim"] != embedding_dim:
        raise ValueError(
            f"Cached embeddings are {metadata['embedding_dim']}-dimensional but the model's text adapter takes "
            f"{embedding_dim}. Use embeddings of the LLM the adapter was built for, or build the model with "
            f"text_embedding_dim={metadata['embedding_dim']}."
        )
    return metadata


def check_cache_rows(dataset: Dataset, batch_size: int = 10_000) -> None:
    """Verify that every row's cached embeddings were made from that row's captions; raise a ``ValueError`` naming
    the first misaligned rows (up to 10) otherwise.

    ``dataset`` carries the cache's embedding columns beside the caption columns they were made from, as
    :func:`join_embeddings` makes it, and may since have been reordered or subset (``select``, ``shuffle``,
    ``filter``, ``train_test_split``): the hash column travels with the embeddings. Each row's captions are hashed
    again and compared with ``ROW_HASH_COLUMN``, reading ``batch_size`` rows at a time.

    A cache made before the hash column existed is checked by its data fingerprint instead, when ``dataset`` has
    the cache's number of rows (a reordered or different dataset is refused); for any other number of rows (a
    subset) row alignment cannot be verified and a warning says so.
    """
    metadata = read_cache_metadata(dataset)
    if metadata is None:
        raise ValueError("The dataset carries no LLM2CLIP embedding cache metadata; join the cache with "
                         "join_embeddings(dataset, cache) or make it with precompute_text_embeddings(...).")
    columns = metadata["caption_columns"]
    hash_column = metadata.get("row_hash_column")
    require_columns(dataset, [*columns, *([hash_column] if hash_column else [])],
                    "Checking that the cached embeddings belong to their rows")
    if hash_column is None:
        _check_rows_by_data_fingerprint(dataset, metadata)
        return
    misaligned: list[int] = []
    start = 0
    for batch in dataset.select_columns([*columns, hash_column]).with_format(None).iter(batch_size=batch_size):
        found = np.asarray(batch[hash_column], dtype=np.int64)
        misaligned += (start + np.flatnonzero(caption_row_hashes(batch, columns) != found)).tolist()
        start += len(found)
        if len(misaligned) >= 10:
            break
    if misaligned:
        raise ValueError(
            f"Rows {misaligned[:10]} of the dataset carry cached embeddings of other captions than theirs (columns "
            f"{columns}): the cache was joined to other rows, or in another order, than those it was made from. "
            "Join the cache to the exact rows it was made from, in the same order (join_embeddings(dataset, "
            "cache), then select / shuffle / filter the joined dataset); or rebuild it for these rows."
        )


def _check_rows_by_data_fingerprint(dataset: Dataset, metadata: dict[str, Any]) -> None:
    """:func:`check_cache_rows` for a cache without row hashes: the whole dataset's captions against the cache's."""
    if len(dataset) != metadata["num_rows"]:
        logger.warning(
            f"The embedding cache holds no per-row caption hashes (made by an earlier version) and the dataset has "
            f"{len(dataset)} rows, not the cache's {metadata['num_rows']}: that each row's embeddings belong to its "
            "captions cannot be verified. Rebuild the cache to have its rows checked."
        )
        return
    if caption_data_fingerprint(dataset, metadata["caption_columns"]) != metadata["data_fingerprint"]:
        raise ValueError(
            f"The dataset's captions (columns {metadata['caption_columns']}) are not, row by row, those the "
            "embedding cache was made from: the cache was joined to other rows, or in another order (this cache "
            "holds no per-row hashes, so a reordered joined dataset cannot be told from a misaligned one). Join the "
            "cache to the exact rows it was made from, in the same order; or rebuild it."
        )


def caption_row_hashes(cells: dict[str, list], caption_columns: Sequence[str]) -> np.ndarray:
    """One int64 hash per row of the rows' caption cells (canonical JSON of the cells, in column order)."""
    return key_hashes(json.dumps(row, separators=(",", ":"), default=str)
                      for row in zip(*(cells[c] for c in caption_columns)))


def describe_text_model(metadata: dict[str, Any]) -> str:
    """The recorded identity of a text model: fingerprint, name and weight dtype where known."""
    parts = [f"fingerprint {metadata['fingerprint']}"]
    if metadata.get("text_model"):
        parts.append(repr(metadata["text_model"]))
    if metadata.get("text_model_dtype"):
        parts.append(f"{metadata['text_model_dtype']} weights")
    return ", ".join(parts)


def text_model_difference(made: dict[str, Any], expected: dict[str, Any]) -> str:
    """What may differ between the text model that ``made`` a cache and the ``expected`` one."""
    made_dtype, expected_dtype = made.get("text_model_dtype"), expected.get("text_model_dtype")
    if made_dtype and expected_dtype and made_dtype != expected_dtype:
        return (f"The weight dtypes differ: the cache was made with {made_dtype} weights, this model's are "
                f"{expected_dtype}; load the LLM in {made_dtype} (e.g. --dtype {made_dtype}) to use this cache.")
    return ("The weights or their dtype (a bfloat16 LLM does not compute the embeddings of its float32 original), "
            "tokenizer, pooling mode, template or max length differ.")


def join_embeddings(dataset: Dataset, cache: Dataset) -> Dataset:
    """``dataset`` with the embedding columns (and row hashes) of ``cache`` beside it, row by row (no data is
    copied); the cache's metadata travels with the result for the checks of stage 2.

    The rows are verified with :func:`check_cache_rows`: a cache is joined only to the rows it was made from, in
    the same order (a cache without row hashes: the same captions, by data fingerprint).

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPTextModel
        from llm2clip_hf.data import build_embedding_cache, join_embeddings, load_dataset_from_spec

        images = load_dataset_from_spec("my_images/")
        cache = build_embedding_cache(images, LLM2CLIPTextModel.from_pretrained("my-text-encoder"), ["short_caption"],
                                      "short-caption-cache")
        rows = join_embeddings(images, cache)  # the image rows with their short_caption_llm_embedding
        ```
    """
    metadata = read_cache_metadata(cache)
    if metadata is None:
        raise ValueError("The cache dataset carries no LLM2CLIP embedding metadata; make it with "
                         "precompute_text_embeddings(...) or `llm2clip-hf embed`.")
    if len(cache) != len(dataset):
        raise ValueError(f"The embedding cache has {len(cache)} rows but the dataset has {len(dataset)}; a cache "
                         "joins the exact dataset it was made from (same rows, same order).")
    columns = [embedding_column(c) for c in metadata["caption_columns"]]
    columns += [metadata["row_hash_column"]] if metadata.get("row_hash_column") else []
    joined = concatenate_datasets([dataset.remove_columns([c for c in columns if c in dataset.column_names]),
                                   cache.select_columns(columns)], axis=1)
    joined.info.description = cache.info.description
    check_cache_rows(joined)
    return joined


def embeddings_as_float32(values: Any) -> np.ndarray:
    """Cached embedding cells as float32 numpy (float16 widened; bfloat16 bit patterns decoded: they are stored as
    uint16, which datasets' numpy / torch formats widen to int64)."""
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.integer):
        bits = np.ascontiguousarray(array.astype(np.uint16)).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).float().numpy()
    return array.astype(np.float32, copy=False)


def _cell_vectors(cells: np.ndarray) -> np.ndarray:
    """A batch of one embedding column as ``[captions, dim]`` float32: cells of ``[dim]``, ``[captions, dim]`` or an
    object array of ``[captions, dim]`` cells (each caption of a list cell counts once)."""
    stacked = np.concatenate([np.asarray(cell) for cell in cells]) if cells.dtype == object else cells
    return embeddings_as_float32(stacked).reshape(-1, stacked.shape[-1])


def embedding_statistics(dataset: Dataset, caption_columns: Sequence[str], batch_size: int = 8192
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and per-dimension standard deviation (float32) of every cached embedding of ``caption_columns`` (each
    caption of a list cell counts once), and how many there were; one pass in batches, float64 sums."""
    columns = [embedding_column(c) for c in caption_columns]
    total = squares = None
    count = 0
    for batch in dataset.select_columns(columns).with_format("numpy").iter(batch_size=batch_size):
        for column in columns:
            vectors = _cell_vectors(batch[column]).astype(np.float64)
            total = vectors.sum(0) if total is None else total + vectors.sum(0)
            squares = (vectors ** 2).sum(0) if squares is None else squares + (vectors ** 2).sum(0)
            count += len(vectors)
    if not count:
        raise ValueError("No cached embeddings to take statistics of: the dataset is empty.")
    mean = total / count
    return mean.astype(np.float32), np.sqrt(np.maximum(squares / count - mean ** 2, 0.0)).astype(np.float32), count


def _dtype_precision(name: Any) -> float | None:
    """Machine epsilon of the floating dtype named ``name`` (``"bfloat16"``, ...); ``None`` for anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@dataclass
class CachedEmbeddingSample:
    """Cached embeddings of a sample of rows: ``embeddings`` ``[captions, dim]`` float32 (every caption of the rows,
    column after column); ``pairs``: the first caption of the first two caption columns of each row that has both
    (two captions of one image, ``[rows, dim]`` each), ``None`` with one column; ``precision``: relative precision
    of the numbers as stored (``storage_dtype``); ``computed_precision``: that of the dtype the text model computed
    them in (``text_model_dtype``; ``None`` for a cache made before it was recorded)."""

    embeddings: torch.Tensor
    pairs: tuple[torch.Tensor, torch.Tensor] | None
    precision: float
    computed_precision: float | None


def cached_embedding_sample(dataset: Dataset, caption_columns: Sequence[str], max_rows: int = 2048,
                            seed: int = 0) -> CachedEmbeddingSample:
    """The cached embeddings of ``caption_columns`` of up to ``max_rows`` random rows (``seed``), with their caption
    pairs and precisions (:class:`CachedEmbeddingSample`)."""
    if len(dataset) == 0:
        raise ValueError("No cached embeddings to sample: the dataset is empty.")
    rows = np.random.default_rng(seed).permutation(len(dataset))[:max_rows] if len(dataset) > max_rows else None
    part = dataset.select(np.sort(rows)) if rows is not None else dataset
    columns = [embedding_column(c) for c in caption_columns]
    cells = part.select_columns(columns).with_format("numpy")[:]
    vectors = np.concatenate([_cell_vectors(cells[column]) for column in columns])
    pairs = None
    if len(columns) >= 2:
        (first, has_first), (second, has_second) = (_first_vectors(cells[column]) for column in columns[:2])
        both = has_first & has_second
        pairs = (torch.from_numpy(first[both]), torch.from_numpy(second[both]))
    metadata = read_cache_metadata(dataset) or {}
    return CachedEmbeddingSample(torch.from_numpy(vectors), pairs,
                                 _dtype_precision(metadata.get("storage_dtype", "float32")),
                                 _dtype_precision(metadata.get("text_model_dtype")))


def _first_vectors(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first caption's embedding of each row of one embedding column (``[rows, dim]`` float32, zeros where a
    row has none) and which rows have one."""
    if cells.dtype != object:  # [rows, dim], or [rows, captions, dim] when every row has as many
        if cells.ndim == 2:
            return embeddings_as_float32(cells), np.ones(len(cells), dtype=bool)
        present = np.full(len(cells), cells.shape[1] > 0)
        return embeddings_as_float32(cells[:, 0] if cells.shape[1] else cells.sum(1)), present
    cells = [np.asarray(cell) for cell in cells]  # rows of different caption counts
    present = np.array([len(cell) > 0 for cell in cells], dtype=bool)
    model = next(cell for cell in cells if len(cell))  # its dtype: bfloat16 caches hold uint16 bit patterns
    first = np.stack([cell[0] if len(cell) else np.zeros_like(model[0]) for cell in cells])
    return embeddings_as_float32(first), present


__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)
