"""Stage-2 data as streams: a ``datasets.IterableDataset`` read from webdataset or parquet shards (local or on the
Hub, ``load_dataset(..., streaming=True)``), joined by key with the cached LLM caption embeddings, and split between
training processes and DataLoader workers.

Keys. A streamed row is named by its key: webdataset's ``__key__`` or a column the user names. The 63-bit hash of
the key (:func:`key_hashes`) is the row's ``ROW_INDEX``, which seeds its per-row draws (caption column, crop), so
they are the same in every process, worker and run. The embedding cache is a map-style dataset with a key column
beside its embedding columns; :func:`join_stream_embeddings` finds each streamed row's cache row through a
:class:`KeyIndex` (sorted key hashes, binary search per batch) and attaches its embeddings as the row is read.

Splitting, epochs, shuffling and resuming: see :func:`training_stream` and ``docs/streaming.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
from datasets import Dataset, Features, IterableDataset, Value
from datasets.distributed import split_dataset_by_node
from transformers.utils import logging as hf_logging

from .captions import has_good_captions
from .loading import ROW_INDEX, require_columns

logger = hf_logging.get_logger(__name__)

KEY_COLUMN = "__key__"  # webdataset's sample key
DEFAULT_SHUFFLE_BUFFER = 1000


def key_hashes(keys: Iterable[Any]) -> np.ndarray:
    """Non-negative 63-bit hashes (int64) of keys (of their ``str``): blake2b, so the same in every process and run
    (Python's ``hash`` of a string is salted per process)."""
    digests = b"".join(hashlib.blake2b(str(key).encode(), digest_size=8).digest() for key in keys)
    return (np.frombuffer(digests, dtype="<u8") >> np.uint64(1)).astype(np.int64)


class KeyIndex:
    """The row of each key of a dataset's key column, as the keys' sorted 63-bit hashes and the rows in that order
    (16 bytes a row, not a dict of strings); :meth:`find` looks up a batch of hashes by binary search."""

    def __init__(self, dataset: Dataset, key_column: str, batch_size: int = 100_000) -> None:
        if len(dataset) == 0:
            raise ValueError("The embedding cache has no rows, so no streamed row can be joined to it.")
        keys = dataset.select_columns([key_column]).with_format(None)
        hashes = np.concatenate([key_hashes(batch[key_column]) for batch in keys.iter(batch_size=batch_size)])
        self.rows = np.argsort(hashes, kind="stable")
        self.hashes = hashes[self.rows]
        same = np.flatnonzero(self.hashes[1:] == self.hashes[:-1])
        if same.size:
            first, second = (int(self.rows[same[0]]), int(self.rows[same[0] + 1]))
            a, b = keys[first][key_column], keys[second][key_column]
            problem = f"has the key {a!r} twice" if str(a) == str(b) else f"has keys {a!r} and {b!r} of equal hash"
            raise ValueError(f"The embedding cache {problem} (rows {first} and {second}); each key must name one "
                             "row. Drop the duplicate (or rename one of the keys) and build the index again.")

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """The row of each key hash, ``-1`` where the dataset has no such key."""
        position = np.searchsorted(self.hashes, hashes).clip(max=len(self.hashes) - 1)
        return np.where(self.hashes[position] == hashes, self.rows[position], -1)


class _EmbeddingJoin:
    """Batched map function: ``ROW_INDEX`` (key hash) and the cache's embedding columns for streamed rows."""

    def __init__(self, cache: Dataset, cache_key_column: str, key_column: str, columns: list[str]) -> None:
        self.cache_key_column, self.key_column, self.columns = cache_key_column, key_column, columns
        self.index = KeyIndex(cache, cache_key_column)
        self.cache = cache.select_columns([cache_key_column, *columns]).with_format("numpy")

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        keys = batch[self.key_column]
        hashes = key_hashes(keys)
        rows = self.index.find(hashes)
        fetched = self.cache[rows.clip(min=0)]
        for key, row, cached_key in zip(keys, rows, fetched[self.cache_key_column]):
            if row < 0 or str(cached_key) != str(key):  # a key absent from the cache may still share a hash
                raise ValueError(
                    f"No cached embedding for the streamed row with {self.key_column}={key!r}: the embedding cache "
                    "has no row of that key. Build the cache from the same data as the stream (every key), or "
                    "drop such rows from the stream."
                )
        return {ROW_INDEX: hashes, **{column: fetched[column] for column in self.columns}}


def join_stream_embeddings(stream: IterableDataset, cache: Dataset, key_column: str = KEY_COLUMN,
                           cache_key_column: str | None = None, batch_size: int = 1000) -> IterableDataset:
    """``stream`` with the embedding columns of ``cache`` attached by key as rows are read, and ``ROW_INDEX`` set
    to the key's hash; the cache's metadata travels with the result for the checks of stage 2.

    ``cache`` is a map-style dataset of the embedding columns and a key column, ``cache_key_column`` (default: the
    stream's ``key_column``); all its other columns are attached. The lookup is a :class:`KeyIndex` built here (one
    pass over the cache's keys); a streamed row whose key is not in the cache stops the reading with a
    ``ValueError`` naming the key.
    """
    cache_key_column = cache_key_column or key_column
    _require_known_columns(stream)
    require_columns(stream, [key_column], "Joining cached embeddings by key")
    require_columns(cache, [cache_key_column], "Joining cached embeddings by key")
    columns = [c for c in cache.column_names if c != cache_key_column]
    features = Features({**stream.features, **{c: cache.features[c] for c in columns}, ROW_INDEX: Value("int64")})
    joined = stream.map(_EmbeddingJoin(cache, cache_key_column, key_column, columns), batched=True,
                        batch_size=batch_size, features=features)
    joined.info.description = cache.info.description
    return joined


def with_key_row_index(stream: IterableDataset, key_column: str = KEY_COLUMN) -> IterableDataset:
    """``stream`` with ``ROW_INDEX`` set to the 63-bit hash of each row's key (see the module), unless it has one."""
    _require_known_columns(stream)
    if ROW_INDEX in stream.column_names:
        return stream
    if key_column not in stream.column_names:
        raise ValueError(
            f"Streamed rows need a key naming each row (it seeds the row's caption and crop draws), but the stream "
            f"has no {key_column!r} column: it has {stream.column_names}. webdataset streams have '__key__'; for "
            "others name the column: with_key_row_index(stream, key_column=...) or "
            "join_stream_embeddings(stream, cache, key_column=...)."
        )
    features = Features({**stream.features, ROW_INDEX: Value("int64")})
    return stream.map(partial(_key_row_index, key_column=key_column), batched=True, features=features)


def _key_row_index(batch: dict[str, list], key_column: str) -> dict[str, np.ndarray]:
    return {ROW_INDEX: key_hashes(batch[key_column])}


def drop_bad_stream_caption_rows(stream: IterableDataset, caption_columns: Sequence[str],
                                 skip: bool) -> IterableDataset:
    """``stream`` without rows whose captions are unusable (``skip``; see :mod:`llm2clip_hf.data.captions`); otherwise
    such a row stops the reading with a ``ValueError`` naming it by ``ROW_INDEX`` (its key's hash). A stream is not
    read ahead, so dropped rows are not counted."""
    _require_known_columns(stream)
    require_columns(stream, caption_columns, "Training")
    return stream.filter(partial(has_good_captions, caption_columns=list(caption_columns), skip=skip))


def training_stream(stream: IterableDataset, seed: int, rank: int, world_size: int, epoch_column: str,
                    shuffle: bool = True, buffer_size: int = DEFAULT_SHUFFLE_BUFFER) -> IterableDataset:
    """What one training process reads of ``stream``: shuffled, its own part of the data, each row tagged with
    the epoch.

    * Shuffling (``shuffle``): ``stream.shuffle(seed, buffer_size)``, the order of the shards and a buffer of
      ``buffer_size`` rows, both re-drawn each epoch (the seed is shifted by the epoch), the same on every process.
    * Processes: :func:`datasets.distributed.split_dataset_by_node`. When the number of shards is a multiple of
      ``world_size`` each process reads only its own shards (a new assignment each epoch, disjoint and covering the
      data); otherwise every process reads every shard and keeps one row in ``world_size``, which costs each
      process the reading (and transfer) of all the data: a warning says so. Processes whose shards hold fewer
      rows start their next epoch earlier; training still takes the same number of steps on every process.
    * DataLoader workers: datasets gives each worker of a process its own shards of that process's part. With
      fewer shards than workers the extra workers stop at once (datasets warns): aim for a number of shards that
      is a multiple of ``world_size * dataloader_num_workers``.
    * Epochs: the Trainer calls ``set_epoch`` on this stream before each pass; every row carries that epoch in
      ``epoch_column``, read from the stream as it is iterated, in whichever worker (datasets shares the epoch
      with persistent workers too). Nothing may be derived from the returned stream (shuffle, map, ...): the
      epoch is read from this object.
    * Resuming (transformers' Trainer): the stream is read again from the start of its first pass and as many
      batches are skipped (read, decoded and collated) as steps were trained, so within the first pass the
      resumed run sees exactly what the uninterrupted run saw; from a checkpoint in a later pass it starts the
      second pass over. ``ignore_data_skip=True`` starts the stream over. The Trainer keeps no DataLoader state
      in checkpoints (no ``use_stateful_dataloader``), so datasets' ``state_dict`` resume is not used.
    """
    if shuffle:
        stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    if world_size > 1:
        if stream.num_shards % world_size:
            logger.warning(
                f"The stream has {stream.num_shards} shards, not a multiple of the {world_size} processes: every "
                f"process reads all of them and keeps one row in {world_size}. Write the data in a multiple of "
                f"{world_size} shards (of {world_size} x dataloader_num_workers, better) to have each process read "
                "only its own."
            )
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    tag = _EpochTag(epoch_column)
    features = None if stream.features is None else Features({**stream.features, epoch_column: Value("int64")})
    tagged = stream.map(tag, batched=True, features=features)
    tag.stream = tagged
    return tagged


class _EpochTag:
    """Batched map function: the epoch of the stream it is mapped into, for every row of the batch."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.stream: IterableDataset | None = None

    def __call__(self, batch: dict[str, list]) -> dict[str, list[int]]:
        return {self.column: [self.stream.epoch] * len(next(iter(batch.values())))}


def _require_known_columns(stream: IterableDataset) -> None:
    if stream.features is None:
        raise ValueError(
            "The stream's columns are unknown (after an IterableDataset.map() without features=...). Give map() "
            "the features of its output, or declare them with stream.cast(features)."
        )
