"""Building the stage-2 cache of LLM caption embeddings (its format, checks and join:
:mod:`llm2clip_hf.data.embedding_cache`).

Building it is a data-parallel, bounded-memory, resumable job. Rows are cut into fixed shards; each process claims
shards one at a time (a file lock per shard), embeds a shard's captions length-sorted, and writes it as one Arrow
file of the ``save_to_disk`` layout. Memory holds one shard, whatever the number of captions; a killed run keeps its
finished shards, and the next run (any number of processes) computes only the missing ones. When every shard is
there, ``state.json`` and ``dataset_info.json`` are written and the folder is a dataset ``load_from_disk`` opens,
the shards in row order, without copying them. Image bytes are never rewritten.

A cache (finished or not) made by another text model, from other data or in another storage dtype is refused, and
nothing is overwritten.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, Sequence as ArrowSequence, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import get_temporary_cache_files_directory
from transformers.utils import logging as hf_logging

from ..conversion.fingerprint import text_model_fingerprint
from ..modeling import LLM2CLIPTextModel
from .captions import flatten_captions
from .embedding_cache import (
    METADATA_KEY,
    ROW_HASH_COLUMN,
    STORAGE_DTYPES,
    caption_data_fingerprint,
    caption_row_hashes,
    check_embedding_cache,
    describe_text_model,
    embedding_column,
    join_embeddings,
    text_model_difference,
)
from .loading import require_columns

logger = hf_logging.get_logger(__name__)

METADATA_FILE = "llm2clip_embedding_cache.json"  # the job's plan, in the cache folder
DEFAULT_ROWS_PER_SHARD = 4096


def precompute_text_embeddings(
    dataset: Dataset,
    text_model: LLM2CLIPTextModel,
    caption_columns: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
    storage_dtype: str = "float32",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    key_column: str | None = None,
) -> Dataset:
    """Embed every caption column with the frozen text model; return ``dataset`` joined with the embedding columns.

    The embeddings are written to ``output_dir`` (default: a temporary folder removed at exit) as a dataset of only
    the columns ``<caption column>_llm_embedding``, one row per row of ``dataset`` in its order; see the module
    docstring for how the work is split, resumed and checked. Call it from every process of an ``accelerate
    launch`` (or any set of processes sharing the folder): each embeds the shards it claims, then all return the
    same result. A finished folder made by the same text model from the same captions is reused as is.

    ``storage_dtype`` is ``float32`` (default), ``float16`` or ``bfloat16`` (stored as uint16 bit patterns; the
    trainer and :func:`~llm2clip_hf.data.embeddings_as_float32` decode them). Each process holds
    ``rows_per_shard`` rows at a time. ``key_column`` copies that column of ``dataset`` into the cache, so a stream
    of the same rows can join the embeddings by key (:func:`~llm2clip_hf.data.join_stream_embeddings`).

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPTextModel
        from llm2clip_hf.data import load_dataset_from_spec, precompute_text_embeddings

        images = load_dataset_from_spec("my_images/")
        text_model = LLM2CLIPTextModel.from_pretrained("my-text-encoder")
        cached = precompute_text_embeddings(images, text_model, ["short_caption", "long_caption"], output_dir="cache")
        print(cached.column_names)  # ..., short_caption_llm_embedding, long_caption_llm_embedding
        ```
    """
    require_columns(dataset, caption_columns, "Embedding captions")
    if output_dir is None:  # removed when the process exits; pass output_dir to keep it or share it between processes
        output_dir = Path(tempfile.mkdtemp(prefix="llm2clip_embeddings_", dir=get_temporary_cache_files_directory()))
    cache = build_embedding_cache(dataset, text_model, caption_columns, Path(output_dir), batch_size,
                                  show_progress_bar, storage_dtype, rows_per_shard, key_column)
    return join_embeddings(dataset, cache)


def build_embedding_cache(dataset: Dataset, text_model: LLM2CLIPTextModel, caption_columns: Sequence[str],
                          output_dir: str | os.PathLike, batch_size: int = 32, show_progress_bar: bool | None = None,
                          storage_dtype: str = "float32", rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                          key_column: str | None = None) -> Dataset:
    """The embedding-columns dataset in ``output_dir`` (with ``key_column`` copied from ``dataset`` when given):
    reused when finished, else completed (see the module)."""
    output_dir = Path(output_dir)
    require_columns(dataset, [*caption_columns, *([key_column] if key_column else [])], "Embedding captions")
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}.")
    if rows_per_shard < 1 or batch_size < 1:
        raise ValueError(f"rows_per_shard and batch_size must be positive, got {rows_per_shard} and {batch_size}.")
    metadata = _cache_metadata(dataset, text_model, caption_columns, storage_dtype, rows_per_shard)
    if key_column is not None:
        metadata["key_column"] = key_column
        metadata["key_feature"] = Features({key_column: dataset.features[key_column]}).to_dict()[key_column]
    with _exclusive_lock(output_dir):
        finished = _finished_cache(output_dir, metadata)
        if finished is not None:
            return finished
        plan = _start_or_resume(output_dir, metadata)
    _embed_missing_shards(dataset, text_model, output_dir, plan, batch_size, show_progress_bar)
    with _exclusive_lock(output_dir):
        if not (output_dir / "state.json").is_file():
            _assemble(output_dir, plan)
    return load_from_disk(str(output_dir))


def _cache_metadata(dataset: Dataset, text_model: LLM2CLIPTextModel, caption_columns: Sequence[str],
                    storage_dtype: str, rows_per_shard: int) -> dict[str, Any]:
    config = text_model.config
    return {
        "fingerprint": text_model_fingerprint(text_model), "embedding_dim": config.hidden_size,
        "caption_columns": list(caption_columns), "text_model": text_model.name_or_path,
        "text_model_dtype": str(text_model.dtype).removeprefix("torch."), "row_hash_column": ROW_HASH_COLUMN,
        "pooling_mode": config.pooling_mode, "text_template": config.text_template,
        "max_seq_length": config.max_seq_length, "pooled_tokens": config.pooled_tokens,
        "normalize_embeddings": config.normalize_embeddings, "padding_side": config.padding_side,
        "default_prompt": config.default_prompt, "num_rows": len(dataset),
        "data_fingerprint": caption_data_fingerprint(dataset, caption_columns), "storage_dtype": storage_dtype,
        "rows_per_shard": rows_per_shard, "num_shards": max(1, math.ceil(len(dataset) / rows_per_shard)),
        "several_captions": [_holds_lists(dataset, c) for c in caption_columns],
    }


def _finished_cache(output_dir: Path, metadata: dict[str, Any]) -> Dataset | None:
    """The finished cache in ``output_dir`` if it is of this text model and data; ``None`` if there is none."""
    if not (output_dir / "state.json").is_file():
        return None
    cached = load_from_disk(str(output_dir))
    found = check_embedding_cache(cached, metadata["caption_columns"], expected_fingerprint=metadata["fingerprint"],
                                  expected_dtype=metadata["text_model_dtype"])
    _check_same_job(found, metadata, output_dir)
    return cached


def _start_or_resume(output_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write the job's plan into a new folder, or return the plan of an unfinished one made for the same job."""
    plan_file = output_dir / METADATA_FILE
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        if plan["fingerprint"] != metadata["fingerprint"]:
            raise ValueError(
                f"{output_dir} holds an unfinished embedding cache of a different text model "
                f"({describe_text_model(plan)}; this one: {describe_text_model(metadata)}). "
                f"{text_model_difference(plan, metadata)} Nothing was changed: write this cache to another folder, "
                "or delete that one to start over."
            )
        _check_same_job(plan, metadata, output_dir)
        done = sum(_shard_path(output_dir, plan, shard).is_file() for shard in range(plan["num_shards"]))
        logger.info(f"Resuming the embedding cache in {output_dir}: {done} of {plan['num_shards']} shards are done "
                    f"({plan['rows_per_shard']} rows each).")
        return plan
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} exists and is not an LLM2CLIP embedding cache; choose an empty or new folder.")
    (output_dir / ".locks").mkdir(parents=True, exist_ok=True)
    _write_atomically(plan_file, json.dumps(metadata, indent=2))
    return metadata


def _check_same_job(found: dict[str, Any], metadata: dict[str, Any], output_dir: Path) -> None:
    """Refuse a cache folder made from other captions than this dataset's (another subset, another dataset),
    without the key column asked for, or stored in another dtype."""
    if metadata.get("key_column") and found.get("key_column") != metadata["key_column"]:
        raise ValueError(
            f"The embedding cache in {output_dir} was made with key column {found.get('key_column')!r}, not "
            f"{metadata.get('key_column')!r}. Nothing was changed: use the same key column, or write this cache to "
            "another folder."
        )
    if found.get("data_fingerprint") != metadata["data_fingerprint"] or found.get("num_rows") != metadata["num_rows"]:
        raise ValueError(
            f"The embedding cache in {output_dir} was made from other data ({found.get('num_rows')} rows, data "
            f"fingerprint {found.get('data_fingerprint')}) than this dataset ({metadata['num_rows']} rows, "
            f"{metadata['data_fingerprint']}), for example a --max-samples subset. Nothing was changed: write this "
            "cache to another folder (output_dir / --embedding-cache), or delete that folder to recompute it."
        )
    if found["storage_dtype"] != metadata["storage_dtype"]:
        raise ValueError(
            f"The embedding cache in {output_dir} is stored as {found['storage_dtype']}, not the "
            f"{metadata['storage_dtype']} asked for. Nothing was changed: use storage_dtype="
            f"{found['storage_dtype']!r} (--storage-dtype) to use it, or write the {metadata['storage_dtype']} cache "
            "to another folder."
        )


def _features(plan: dict[str, Any]) -> Features:
    value = Value("uint16" if plan["storage_dtype"] == "bfloat16" else plan["storage_dtype"])
    vector = ArrowSequence(value, length=plan["embedding_dim"])
    features = {embedding_column(column): ArrowSequence(vector) if several else vector
                for column, several in zip(plan["caption_columns"], plan["several_captions"])}
    if plan.get("row_hash_column"):  # absent from the plans of unfinished caches made by earlier versions
        features[plan["row_hash_column"]] = Value("int64")
    if plan.get("key_column"):
        features.update(Features.from_dict({plan["key_column"]: plan["key_feature"]}))
    return Features(features)


def _shard_path(output_dir: Path, plan: dict[str, Any], shard: int) -> Path:
    return output_dir / f"data-{shard:05d}-of-{plan['num_shards']:05d}.arrow"


def _embed_missing_shards(dataset: Dataset, text_model: LLM2CLIPTextModel, output_dir: Path, plan: dict[str, Any],
                          batch_size: int, show_progress_bar: bool | None) -> None:
    """Claim and embed every shard not written yet; then wait for (or take over) shards other processes hold."""
    if show_progress_bar is None:
        show_progress_bar = hf_logging.is_progress_bar_enabled()
    rows_per_shard, num_rows = plan["rows_per_shard"], plan["num_rows"]

    def rows_of(shard: int) -> int:
        return min(num_rows, (shard + 1) * rows_per_shard) - shard * rows_per_shard

    held_elsewhere = []
    with hf_logging.tqdm(total=num_rows, desc="Embedding captions", unit="rows", unit_scale=True,
                         disable=not show_progress_bar) as bar:
        for shard in range(plan["num_shards"]):
            if not _shard_path(output_dir, plan, shard).is_file():
                with _shard_lock(output_dir, shard, wait=False) as claimed:
                    if not claimed:
                        held_elsewhere.append(shard)
                        continue
                    if not _shard_path(output_dir, plan, shard).is_file():
                        _embed_shard(dataset, text_model, output_dir, plan, shard, batch_size, bar.update)
                        continue
            bar.update(rows_of(shard))
        for shard in held_elsewhere:  # blocks while another process works on it; takes over if that process died
            with _shard_lock(output_dir, shard, wait=True):
                if not _shard_path(output_dir, plan, shard).is_file():
                    _embed_shard(dataset, text_model, output_dir, plan, shard, batch_size, bar.update)
                    continue
            bar.update(rows_of(shard))


def _embed_shard(dataset: Dataset, text_model: LLM2CLIPTextModel, output_dir: Path, plan: dict[str, Any],
                 shard: int, batch_size: int, progress) -> None:
    """Embed one shard's captions (all columns together, length-sorted) and write its Arrow file atomically."""
    start = shard * plan["rows_per_shard"]
    stop = min(plan["num_rows"], start + plan["rows_per_shard"])
    columns = plan["caption_columns"]
    key_column = plan.get("key_column")
    cells = dataset.select_columns([*columns, *([key_column] if key_column else [])]).with_format(None)[start:stop]
    texts, owners, spans = [], [], []
    for column in columns:
        column_texts, column_owners = flatten_captions(cells[column], column, start)
        spans.append((len(texts), len(texts) + len(column_texts)))
        texts += column_texts
        owners.append(np.asarray(column_owners, dtype=np.int64))
    items = text_model.tokenize_items(texts)
    text_model.warn_truncation(sum(item.truncated for item in items), len(items))
    embeddings = text_model.embed_items(items, batch_size, progress=None).numpy()
    stored = _to_storage_dtype(embeddings, plan["storage_dtype"])
    features = _features(plan)
    table = {}
    for column, (first, last), column_owners, several in zip(columns, spans, owners, plan["several_captions"]):
        table[embedding_column(column)] = _arrow_column(stored[first:last], column_owners, stop - start, several)
    if plan.get("row_hash_column"):
        table[plan["row_hash_column"]] = pa.array(caption_row_hashes(cells, columns), type=pa.int64())
    if key_column:
        table[key_column] = pa.array(cells[key_column], type=features[key_column].pa_type)
    path = _shard_path(output_dir, plan, shard)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with ArrowWriter(features=features, path=str(partial)) as writer:
        writer.write_table(pa.table(table, schema=features.arrow_schema))
        writer.finalize()
    os.replace(partial, path)
    progress(stop - start)


def _to_storage_dtype(embeddings: np.ndarray, storage_dtype: str) -> np.ndarray:
    if storage_dtype == "bfloat16":
        return torch.from_numpy(embeddings).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return embeddings.astype(np.dtype(storage_dtype), copy=False)


def _arrow_column(vectors: np.ndarray, owners: np.ndarray, num_rows: int, several: bool):
    """An Arrow column of one vector per row, or (``several``) a list of vectors per row, from vectors in row order."""
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    if not several:
        return fixed
    offsets = np.zeros(num_rows + 1, dtype=np.int32)
    np.add.at(offsets, owners + 1, 1)
    return pa.ListArray.from_arrays(pa.array(np.cumsum(offsets, dtype=np.int32)), fixed)


def _assemble(output_dir: Path, plan: dict[str, Any]) -> None:
    """Make the folder a ``save_to_disk`` dataset of the shards in row order (no data is copied)."""
    missing = [s for s in range(plan["num_shards"]) if not _shard_path(output_dir, plan, s).is_file()]
    if missing:
        raise RuntimeError(f"Embedding shards {missing[:10]} of {output_dir} are missing after every process "
                           "finished; run the same command again to compute them.")
    metadata = {k: v for k, v in plan.items()
                if k not in ("rows_per_shard", "num_shards", "several_captions", "key_feature")}
    info = {"description": json.dumps({METADATA_KEY: metadata}), "citation": "", "homepage": "", "license": "",
            "features": _features(plan).to_dict()}
    state = {
        "_data_files": [{"filename": _shard_path(output_dir, plan, s).name} for s in range(plan["num_shards"])],
        "_fingerprint": hashlib.blake2b(json.dumps(plan, sort_keys=True).encode(), digest_size=8).hexdigest(),
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None,
    }
    _write_atomically(output_dir / "dataset_info.json", json.dumps(info, indent=2))
    _write_atomically(output_dir / "state.json", json.dumps(state, indent=2))  # written last: marks completion
    shutil.rmtree(output_dir / ".locks", ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


@contextmanager
def _exclusive_lock(output_dir: Path) -> Iterator[None]:
    """An advisory lock on ``<output_dir>.lock`` held while the cache's plan is checked or the folder assembled."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.with_name(output_dir.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _shard_lock(output_dir: Path, shard: int, wait: bool) -> Iterator[bool]:
    """The lock of one shard: yields whether it is held. The OS releases it when its process dies, so a killed
    process's shard is taken over by the next process that asks."""
    locks = output_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{shard:05d}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holds_lists(dataset: Dataset, column: str) -> bool:
    return not isinstance(dataset.features[column], Value)
