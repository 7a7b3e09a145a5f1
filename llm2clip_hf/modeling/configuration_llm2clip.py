"""Configuration of the full LLM2CLIP model: EVA02 vision tower, text adapter and optional text encoder."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from .configuration_eva02 import EVA02VisionConfig
from .configuration_llm2clip_text import LLM2CLIPTextConfig


def _as_config(value: PretrainedConfig | dict | None, config_class: type[PretrainedConfig]) -> PretrainedConfig:
    if value is None:
        return config_class()
    if isinstance(value, dict):
        return config_class(**{k: v for k, v in value.items() if k != "model_type"})
    if not isinstance(value, config_class):
        raise TypeError(f"Expected a {config_class.__name__} or a dict, got {type(value).__name__}.")
    return value


class LLM2CLIPConfig(PretrainedConfig):
    """Configuration of :class:`LLM2CLIPModel`.

    Args:
        vision_config: :class:`EVA02VisionConfig` (or its dict); defaults to EVA02-B/16.
        text_config: :class:`LLM2CLIPTextConfig` of an embedded text encoder, or ``None`` when the model takes
            precomputed LLM embeddings only (as the official checkpoints do).
        projection_dim: width of the joint space (1280 officially).
        text_embedding_dim: width of the LLM embeddings the adapter takes; derived from ``text_config`` when
            given (4096 for Llama-3-8B, 2048 for Llama-3.2-1B).
        adapter_num_blocks / adapter_expansion: residual MLP blocks of the adapter and their widening (4, 2).
        logit_scale_init_value: initial ``logit_scale`` (ln(1/0.07)); training clamps it (``logit_scale_max`` of
            the training arguments).
        text_model_fingerprint / text_model_name_or_path: the text model whose embeddings the adapter was trained
            on, recorded by stage-2 training so later runs refuse embeddings of another model.
    """

    model_type = "llm2clip"
    sub_configs = {"vision_config": EVA02VisionConfig, "text_config": LLM2CLIPTextConfig}

    def __init__(
        self,
        vision_config: EVA02VisionConfig | dict | None = None,
        text_config: LLM2CLIPTextConfig | dict | None = None,
        projection_dim: int = 1280,
        text_embedding_dim: int | None = None,
        adapter_num_blocks: int = 4,
        adapter_expansion: int = 2,
        logit_scale_init_value: float = math.log(1 / 0.07),
        initializer_range: float = 0.02,
        text_model_fingerprint: str | None = None,
        text_model_name_or_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _as_config(vision_config, EVA02VisionConfig)
        self.text_config = None if text_config is None else _as_config(text_config, LLM2CLIPTextConfig)
        if self.text_config is not None and self.text_config.llm_config is not None:
            llm_width = self.text_config.hidden_size
            if text_embedding_dim is not None and text_embedding_dim != llm_width:
                raise ValueError(
                    f"text_embedding_dim={text_embedding_dim} does not match the embedded LLM's hidden size "
                    f"{llm_width}; leave text_embedding_dim unset to take it from text_config."
                )
            text_embedding_dim = llm_width
        self.text_embedding_dim = 4096 if text_embedding_dim is None else text_embedding_dim
        self.projection_dim = projection_dim
        self.adapter_num_blocks = adapter_num_blocks
        self.adapter_expansion = adapter_expansion
        self.logit_scale_init_value = logit_scale_init_value
        self.initializer_range = initializer_range
        self.text_model_fingerprint = text_model_fingerprint
        self.text_model_name_or_path = text_model_name_or_path
        super().__init__(**kwargs)


LLM2CLIPConfig.register_for_auto_class()
