"""Training for both LLM2CLIP stages on transformers' Trainer: the trainer, its arguments, the losses (GradCache
among them), and its callbacks. The batches they train on are made in :mod:`llm2clip_hf.data`."""

from .deepspeed_settings import models_built_whole
from .distributed import all_gather_with_grad
from .layer_decay import layer_decay_parameter_groups
from .losses import CaptionContrastiveLoss, CLIPContrastiveLoss, MaskedNextTokenLoss, SigLIPContrastiveLoss
from .trainer import LLM2CLIPTrainer
from .training_args import LLM2CLIPTrainingArguments
from .._moved import moved_names

__all__ = [
    "CLIPContrastiveLoss", "CaptionContrastiveLoss", "LLM2CLIPTrainer", "LLM2CLIPTrainingArguments",
    "MaskedNextTokenLoss", "SigLIPContrastiveLoss", "all_gather_with_grad", "layer_decay_parameter_groups",
    "models_built_whole",
]

__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)
