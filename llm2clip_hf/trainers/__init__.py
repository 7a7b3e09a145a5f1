"""Training for both LLM2CLIP stages on transformers' Trainer. The data path they share with evaluation (datasets,
images, the embedding cache) is :mod:`llm2clip_hf.data`."""

from .caption_pairs import CaptionPairCollator, build_caption_pairs, text_pair_source
from .clip_data import CLIPCollator
from .distributed import all_gather_with_grad
from .layer_decay import layer_decay_parameter_groups
from .losses import CaptionContrastiveLoss, CLIPContrastiveLoss, MaskedNextTokenLoss, SigLIPContrastiveLoss
from .masked_next_token import MaskedTextCollator, build_mntp_texts
from .mixed_sources import SourceBatchSampler
from .trainer import LLM2CLIPTrainer
from .training_args import LLM2CLIPTrainingArguments

__all__ = [
    "CLIPCollator", "CLIPContrastiveLoss", "CaptionContrastiveLoss", "CaptionPairCollator", "LLM2CLIPTrainer",
    "LLM2CLIPTrainingArguments", "MaskedNextTokenLoss", "MaskedTextCollator", "SigLIPContrastiveLoss",
    "SourceBatchSampler", "all_gather_with_grad", "build_caption_pairs", "build_mntp_texts",
    "layer_decay_parameter_groups", "text_pair_source",
]
