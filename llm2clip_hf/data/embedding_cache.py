"""Stage-2 cache of LLM caption embeddings, stored as dataset columns and tied to the text model and the data that
made them.

The text model's fingerprint covers everything that changes an embedding: the weights as the encoder computes with
them (LoRA adapters merged), the LLM's configuration (RoPE, norms, ...), the tokenizer, the pooling mode, the
template and the token budget. The data fingerprint covers the caption columns' contents and the number of rows.
A cache made by another text model or from other data is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Sequence as ArrowSequence, Value, load_from_disk

from ..lora import iter_merged_state
from ..modeling import LLM2CLIPTextModel
from .loading import caption_texts, require_columns

EMBEDDING_SUFFIX = "_llm_embedding"
METADATA_KEY = "llm2clip_embedding_cache"
METADATA_FILE = "llm2clip_embedding_cache.json"


def embedding_column(caption_column: str) -> str:
    """Name of the column holding the embeddings of ``caption_column``."""
    return f"{caption_column}{EMBEDDING_SUFFIX}"


# Config entries that say how a checkpoint was saved or what a forward returns, not what it computes.
_BOOKKEEPING_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "initializer_range",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
})


def _computing_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {key: _computing_settings(value) if isinstance(value, dict) else value
            for key, value in config.items() if key not in _BOOKKEEPING_CONFIG_KEYS}


def text_model_fingerprint(text_model: LLM2CLIPTextModel) -> str:
    """Hash of what the text encoder computes: its configuration (the LLM's included), tokenizer, and weights with
    any LoRA adapters merged, so a model in training and its saved, reloaded copy have the same fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(_computing_settings(text_model.config.to_dict()), sort_keys=True, default=str).encode())
    digest.update(_tokenizer_identity(text_model.require_tokenizer()).encode())
    tensors = {}  # one digest per tensor, combined in key order: merged tensors are made one at a time
    for name, tensor in iter_merged_state(text_model):
        tensor_digest = hashlib.blake2b(f"{tuple(tensor.shape)}:{tensor.dtype}".encode(), digest_size=16)
        tensor_digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        tensors[name] = tensor_digest.hexdigest()
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return digest.hexdigest()


def caption_data_fingerprint(dataset: Dataset, caption_columns: Sequence[str], batch_size: int = 10_000) -> str:
    """Hash of the number of rows and the contents of ``caption_columns``: what a cache of their embeddings is of."""
    digest = hashlib.blake2b(json.dumps([len(dataset), list(caption_columns)]).encode(), digest_size=16)
    for column in caption_columns:
        for batch in dataset.select_columns([column]).with_format(None).iter(batch_size=batch_size):
            digest.update(json.dumps(batch[column], default=str).encode())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer's vocabulary and pipeline, without the padding/truncation state that calls change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True) + json.dumps(tokenizer.padding_side)


def read_cache_metadata(dataset: Dataset) -> dict[str, Any] | None:
    """The cache metadata stored with a dataset by :func:`precompute_text_embeddings`, if any."""
    try:
        return json.loads(dataset.info.description or "")[METADATA_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def check_embedding_cache(dataset: Dataset, caption_columns: Sequence[str], expected_fingerprint: str | None = None,
                          embedding_dim: int | None = None) -> dict[str, Any]:
    """Validate a dataset's cached embeddings: present for every caption column, made by the expected text model,
    of the adapter's width. Returns the cache metadata; raises ``ValueError`` saying what to do otherwise."""
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
        raise ValueError(
            f"The embedding cache was made by a different text model (fingerprint {metadata['fingerprint']}, "
            f"{metadata.get('text_model')!r}) than the one expected here ({expected_fingerprint}). The weights, "
            "tokenizer, pooling mode, template or max length differ. Recompute the cache with this text model."
        )
    if embedding_dim is not None and metadata["embedding_dim"] != embedding_dim:
        raise ValueError(
            f"Cached embeddings are {metadata['embedding_dim']}-dimensional but the model's text adapter takes "
            f"{embedding_dim}. Use embeddings of the LLM the adapter was built for, or build the model with "
            f"text_embedding_dim={metadata['embedding_dim']}."
        )
    return metadata


def precompute_text_embeddings(
    dataset: Dataset,
    text_model: LLM2CLIPTextModel,
    caption_columns: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> Dataset:
    """Embed every caption column with the frozen text model and add the embeddings as float32 columns.

    With ``output_dir`` the result is written as Arrow (``save_to_disk``) and returned memory-mapped. The folder
    appears only once complete (written aside, then renamed); a run killed midway leaves only a hidden partial
    folder, which the next run removes before starting again. A lock file serialises writers: a second process
    waits, then reuses the finished cache. A folder made by the same text model from the same captions is reused
    as is; one made by another text model or from other data is refused (nothing is overwritten). The text model's
    fingerprint is stored with the data and checked when stage 2 reads it.
    """
    require_columns(dataset, caption_columns, "Embedding captions")
    if output_dir is None:
        return _embed_columns(dataset, text_model, caption_columns, batch_size, show_progress_bar)
    output_dir = Path(output_dir)
    with _exclusive_lock(output_dir):  # a second writer waits here, then reuses the finished cache
        if output_dir.exists():
            cached = load_from_disk(str(output_dir))
            metadata = check_embedding_cache(cached, caption_columns,
                                             expected_fingerprint=text_model_fingerprint(text_model))
            _check_same_data(metadata, dataset, caption_columns, output_dir)
            return cached
        for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*"):  # left by a killed run: restart
            shutil.rmtree(stale, ignore_errors=True)
        result = _embed_columns(dataset, text_model, caption_columns, batch_size, show_progress_bar)
        return _save_atomically(result, output_dir, read_cache_metadata(result))


def _embed_columns(dataset: Dataset, text_model: LLM2CLIPTextModel, caption_columns: Sequence[str], batch_size: int,
                   show_progress_bar: bool | None) -> Dataset:
    fingerprint = text_model_fingerprint(text_model)

    dim = text_model.config.hidden_size
    result = dataset
    for column in caption_columns:
        texts, rows = caption_texts(dataset, [column])
        embeddings = text_model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar).numpy()
        vector = ArrowSequence(Value("float32"), length=dim)
        if len(texts) == len(dataset) and not _holds_lists(dataset, column):
            values, feature = list(embeddings.astype(np.float32, copy=False)), vector
        else:  # several captions per row: a list of vectors per row
            values, feature = _group_rows(embeddings, rows, len(dataset)), ArrowSequence(vector)
        result = result.add_column(embedding_column(column), values, feature=feature)
    metadata = {
        "fingerprint": fingerprint, "embedding_dim": dim, "caption_columns": list(caption_columns),
        "text_model": text_model.name_or_path, "pooling_mode": text_model.config.pooling_mode,
        "text_template": text_model.config.text_template, "max_seq_length": text_model.config.max_seq_length,
        "num_rows": len(dataset), "data_fingerprint": caption_data_fingerprint(dataset, caption_columns),
    }
    result.info.description = json.dumps({METADATA_KEY: metadata})
    return result


def _check_same_data(metadata: dict[str, Any], dataset: Dataset, caption_columns: Sequence[str],
                     output_dir: Path) -> None:
    """Refuse a cache folder made from other captions than ``dataset``'s (another subset, another dataset)."""
    fingerprint = caption_data_fingerprint(dataset, caption_columns)
    if metadata.get("data_fingerprint") != fingerprint or metadata.get("num_rows") != len(dataset):
        raise ValueError(
            f"The embedding cache in {output_dir} was made from other data ({metadata.get('num_rows')} rows, data "
            f"fingerprint {metadata.get('data_fingerprint')}) than this dataset ({len(dataset)} rows, {fingerprint}), "
            "for example a --max-samples subset. Nothing was changed: write this cache to another folder "
            "(output_dir / --embedding-cache), or delete that folder to recompute it."
        )


@contextmanager
def _exclusive_lock(output_dir: Path) -> Iterator[None]:
    """An advisory lock on ``<output_dir>.lock`` held while the cache is checked or written."""
    import fcntl

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.with_name(output_dir.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holds_lists(dataset: Dataset, column: str) -> bool:
    feature = dataset.features[column]
    return not isinstance(feature, Value)


def _group_rows(embeddings: np.ndarray, rows: list[int], num_rows: int) -> list[list[list[float]]]:
    grouped: list[list[list[float]]] = [[] for _ in range(num_rows)]
    for vector, row in zip(embeddings.astype(np.float32, copy=False), rows):
        grouped[row].append(vector.tolist())
    return grouped


def _save_atomically(dataset: Dataset, output_dir: Path, metadata: dict[str, Any]) -> Dataset:
    partial = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial))
    (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    os.replace(partial, output_dir)
    return load_from_disk(str(output_dir))
