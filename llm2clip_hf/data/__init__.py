"""The data path shared by training and evaluation: opening datasets, reading images, and the embedding cache."""

from .embedding_cache import (
    ROW_HASH_COLUMN,
    STORAGE_DTYPES,
    build_embedding_cache,
    check_cache_rows,
    check_embedding_cache,
    embedding_column,
    embedding_statistics,
    embeddings_as_float32,
    join_embeddings,
    precompute_text_embeddings,
    read_cache_metadata,
    text_model_fingerprint,
)
from .images import CLIPImageTransform, load_image
from .loading import (
    ROW_INDEX,
    caption_texts,
    drop_bad_caption_rows,
    load_dataset_from_spec,
    require_columns,
    with_row_index,
)

__all__ = [
    "CLIPImageTransform", "ROW_HASH_COLUMN", "ROW_INDEX", "STORAGE_DTYPES", "build_embedding_cache",
    "caption_texts", "check_cache_rows", "check_embedding_cache", "drop_bad_caption_rows", "embedding_column",
    "embedding_statistics", "embeddings_as_float32", "join_embeddings", "load_dataset_from_spec", "load_image", "precompute_text_embeddings",
    "read_cache_metadata", "require_columns", "text_model_fingerprint", "with_row_index",
]

from .streaming import (  # noqa: E402 - streams of stage 2 (docs/streaming.md)
    KEY_COLUMN,
    KeyIndex,
    drop_bad_stream_caption_rows,
    join_stream_embeddings,
    key_hashes,
    training_stream,
    with_key_row_index,
)

__all__ += [
    "KEY_COLUMN", "KeyIndex", "drop_bad_stream_caption_rows", "join_stream_embeddings", "key_hashes",
    "training_stream", "with_key_row_index",
]
