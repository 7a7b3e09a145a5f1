"""Training for both LLM2CLIP stages on transformers' Trainer."""

from .caption_pairs import CaptionPairCollator, build_caption_pairs
from .clip_data import CLIPCollator
from .distributed import all_gather_with_grad
from .embedding_cache import (
    check_embedding_cache,
    embedding_column,
    precompute_text_embeddings,
    read_cache_metadata,
    text_model_fingerprint,
)
from .image_transforms import CLIPImageTransform
from .layer_decay import layer_decay_parameter_groups
from .losses import CaptionContrastiveLoss, CLIPContrastiveLoss
from .trainer import LLM2CLIPTrainer, merged_state_dict
from .training_args import LLM2CLIPTrainingArguments

__all__ = [
    "CLIPCollator", "CLIPContrastiveLoss", "CLIPImageTransform", "CaptionContrastiveLoss", "CaptionPairCollator",
    "LLM2CLIPTrainer", "LLM2CLIPTrainingArguments", "all_gather_with_grad", "build_caption_pairs",
    "check_embedding_cache", "embedding_column", "layer_decay_parameter_groups", "merged_state_dict",
    "precompute_text_embeddings", "read_cache_metadata", "text_model_fingerprint",
]
