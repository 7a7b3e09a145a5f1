"""The data path shared by training and evaluation: opening datasets, captions and images, the embedding cache,
streams, and the collators and samplers that turn rows into the batches of each stage."""

from ..conversion.fingerprint import text_model_fingerprint
from .captions import caption_texts, drop_bad_caption_rows
from .data_statistics import BATCH_STATISTICS, DataStatistics
from .embedding_cache import (
    ROW_HASH_COLUMN,
    STORAGE_DTYPES,
    check_cache_rows,
    check_embedding_cache,
    embedding_column,
    cached_embedding_sample,
    embedding_statistics,
    embeddings_as_float32,
    join_embeddings,
    read_cache_metadata,
)
from .embedding_cache_building import build_embedding_cache, precompute_text_embeddings
from .epoch_sampling import EPOCH, EpochTaggedDataset, EpochTaggedSampler
from .image_text_collator import ImageTextCollator
from .images import CLIPImageTransform, load_image
from .loading import ROW_INDEX, load_dataset_from_spec, require_columns, with_row_index
from .masked_next_token import MaskedTextCollator, build_mntp_texts
from .mixed_sources import SourceBatchSampler
from .streaming import (
    KEY_COLUMN,
    KeyIndex,
    drop_bad_stream_caption_rows,
    join_stream_embeddings,
    key_hashes,
    training_stream,
    with_key_row_index,
)
from .text_pairs import TextPairCollator, build_caption_pairs, build_text_pairs, text_pair_source
from .._moved import moved_names

__all__ = [
    "BATCH_STATISTICS", "CLIPImageTransform", "DataStatistics", "EPOCH", "EpochTaggedDataset", "EpochTaggedSampler",
    "ImageTextCollator", "KEY_COLUMN", "KeyIndex", "MaskedTextCollator", "ROW_HASH_COLUMN", "ROW_INDEX",
    "STORAGE_DTYPES", "SourceBatchSampler", "TextPairCollator", "build_caption_pairs", "build_embedding_cache",
    "build_mntp_texts", "build_text_pairs", "caption_texts", "check_cache_rows", "check_embedding_cache",
    "cached_embedding_sample", "drop_bad_caption_rows", "drop_bad_stream_caption_rows", "embedding_column",
    "embedding_statistics",
    "embeddings_as_float32", "join_embeddings", "join_stream_embeddings", "key_hashes", "load_dataset_from_spec",
    "load_image", "precompute_text_embeddings", "read_cache_metadata", "require_columns", "text_model_fingerprint",
    "text_pair_source", "training_stream", "with_key_row_index", "with_row_index",
]

__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)
