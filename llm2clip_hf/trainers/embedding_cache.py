"""Stage-2 cache of LLM caption embeddings, stored as dataset columns and tied to the text model that made them.

The fingerprint covers everything that changes an embedding: the weights, the tokenizer, the pooling mode, the
template and the token budget. A cache whose fingerprint differs from the expected text model is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Sequence as ArrowSequence, Value, load_from_disk

from ..modeling import LLM2CLIPTextModel

EMBEDDING_SUFFIX = "_llm_embedding"
METADATA_KEY = "llm2clip_embedding_cache"
METADATA_FILE = "llm2clip_embedding_cache.json"


def embedding_column(caption_column: str) -> str:
    """Name of the column holding the embeddings of ``caption_column``."""
    return f"{caption_column}{EMBEDDING_SUFFIX}"


def text_model_fingerprint(text_model: LLM2CLIPTextModel) -> str:
    """Hash of the text model's weights, tokenizer, pooling mode, template and max length."""
    digest = hashlib.blake2b(digest_size=16)
    config = text_model.config
    settings = {"pooling_mode": config.pooling_mode, "text_template": config.text_template,
                "max_seq_length": config.max_seq_length, "bidirectional": config.bidirectional}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    tokenizer = text_model.require_tokenizer()
    digest.update(_tokenizer_identity(tokenizer).encode())
    for name, tensor in sorted(text_model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
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

    With ``output_dir`` the result is written as Arrow (``save_to_disk``) and returned memory-mapped; the folder
    appears only once complete, and a folder made by the same text model is reused as is. The text model's
    fingerprint is stored with the data and checked when stage 2 reads it.
    """
    from .caption_pairs import require_columns

    require_columns(dataset, caption_columns, "Embedding captions")
    fingerprint = text_model_fingerprint(text_model)
    if output_dir is not None and Path(output_dir).exists():
        cached = load_from_disk(str(output_dir))
        check_embedding_cache(cached, caption_columns, expected_fingerprint=fingerprint)
        return cached

    dim = text_model.config.hidden_size
    result = dataset
    for column in caption_columns:
        embeddings = text_model.encode(list(dataset[column]), batch_size=batch_size, show_progress_bar=show_progress_bar)
        result = result.add_column(embedding_column(column), _as_arrow_rows(embeddings.numpy()),
                                   feature=ArrowSequence(Value("float32"), length=dim))
    metadata = {
        "fingerprint": fingerprint, "embedding_dim": dim, "caption_columns": list(caption_columns),
        "text_model": text_model.name_or_path, "pooling_mode": text_model.config.pooling_mode,
        "text_template": text_model.config.text_template, "max_seq_length": text_model.config.max_seq_length,
        "num_rows": len(dataset),
    }
    result.info.description = json.dumps({METADATA_KEY: metadata})
    if output_dir is None:
        return result
    return _save_atomically(result, Path(output_dir), metadata)


def _as_arrow_rows(array: np.ndarray) -> list[np.ndarray]:
    return list(array.astype(np.float32, copy=False))


def _save_atomically(dataset: Dataset, output_dir: Path, metadata: dict[str, Any]) -> Dataset:
    partial = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial))
    (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    os.replace(partial, output_dir)
    return load_from_disk(str(output_dir))
