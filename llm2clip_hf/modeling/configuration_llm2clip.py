"""Configuration of the full LLM2CLIP model: a vision tower (EVA02, OpenAI CLIP or SigLIP), the text adapter and an
optional text encoder."""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig, SiglipVisionConfig

from .configuration_eva02 import EVA02VisionConfig
from .configuration_llm2clip_text import LLM2CLIPTextConfig, migrate_text_config_dict

# The vision towers LLM2CLIP is published with, by family: our EVA02, and transformers' own CLIP and SigLIP.
VISION_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "eva02": EVA02VisionConfig, "clip": CLIPVisionConfig, "siglip": SiglipVisionConfig,
}
# Per family, as the official checkpoints compute: the image projection (EVA02 head with bias, OpenAI CLIP `proj`
# without, none for SigLIP whose features are the MAP head's output) and whether the text adapter L2-normalises the
# LLM embedding first (the SigLIP2 model's adapter is called with l2_norm=False).
VISION_PROJECTIONS = ("linear_bias", "linear", "none")
FAMILY_DEFAULTS = {
    "eva02": dict(vision_projection="linear_bias", adapter_l2_normalize=True),
    "clip": dict(vision_projection="linear", adapter_l2_normalize=True),
    "siglip": dict(vision_projection="none", adapter_l2_normalize=False),
}


def vision_family(config: PretrainedConfig) -> str:
    """``"eva02"``, ``"clip"`` or ``"siglip"``: which tower a vision config builds.

    Decided by ``model_type``, not by class: where the package is installed and a checkpoint's remote code is
    loaded too, the same config class exists twice."""
    for family, config_class in VISION_CONFIG_CLASSES.items():
        if getattr(config, "model_type", None) == config_class.model_type:
            return family
    raise TypeError(
        f"Unsupported vision config {type(config).__name__}; LLM2CLIP takes an EVA02VisionConfig, a transformers "
        "CLIPVisionConfig or a SiglipVisionConfig (or the vision_config of a CLIPConfig / SiglipConfig)."
    )


def as_vision_config(value: PretrainedConfig | dict | None) -> PretrainedConfig:
    """A vision config object from a config, its dict (``model_type`` picks the class; EVA02 when absent, as in
    configs saved before other towers existed), or ``None`` (EVA02-B/16)."""
    if value is None:
        return EVA02VisionConfig()
    if isinstance(value, dict):
        model_type = value.get("model_type", EVA02VisionConfig.model_type)
        by_type = {config_class.model_type: config_class for config_class in VISION_CONFIG_CLASSES.values()}
        if model_type not in by_type:
            raise ValueError(
                f"vision_config has model_type {model_type!r}; supported: {sorted(by_type)} (EVA02, OpenAI CLIP, "
                "SigLIP / fixed-resolution SigLIP2)."
            )
        return by_type[model_type](**{k: v for k, v in value.items() if k != "model_type"})
    vision_family(value)  # raises for unsupported classes
    return value


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
        vision_config: :class:`EVA02VisionConfig`, transformers ``CLIPVisionConfig`` or ``SiglipVisionConfig`` (or
            a dict of one; ``model_type`` picks the class); defaults to EVA02-B/16.
        text_config: :class:`LLM2CLIPTextConfig` of an embedded text encoder, or ``None`` when the model takes
            precomputed LLM embeddings only (as the official checkpoints do).
        projection_dim: width of the joint space (1280 officially); with ``vision_projection="none"`` it is the
            tower's output width (1152 for SigLIP2 So400m), taken from the vision config when left unset.
        vision_projection: ``"linear_bias"`` (EVA02 head), ``"linear"`` (OpenAI CLIP ``proj``, no bias) or
            ``"none"`` (SigLIP: the MAP head's output is the image feature); default by tower family.
        adapter_l2_normalize: whether the text adapter L2-normalises the LLM embedding first (EVA02 and OpenAI
            CLIP models: yes; the SigLIP2 model: no); default by tower family.
        logit_bias_init_value: ``None`` (CLIP's softmax loss, no bias) or the initial learnable ``logit_bias`` of
            the sigmoid (SigLIP) loss, -10 as SigLIP initialises it (with ``logit_scale_init_value=log(10)``).
        text_embedding_dim: width of the LLM embeddings the adapter takes; derived from ``text_config`` when
            given (4096 for Llama-3-8B, 2048 for Llama-3.2-1B).
        adapter_num_blocks / adapter_expansion: residual MLP blocks of the adapter and their widening (4, 2).
        logit_scale_init_value: initial ``logit_scale`` (ln(1/0.07)); training clamps it (``logit_scale_max`` of
            the training arguments).
        text_model_fingerprint / text_model_name_or_path: the text model whose embeddings the adapter was trained
            on, recorded by stage-2 training so later runs refuse embeddings of another model.
        adapter_input_normalization: ``None`` (official), ``"center"`` or ``"standardize"``: the adapter first
            subtracts the mean of the training embeddings (and divides by their per-dimension standard deviation),
            statistics fitted once by stage-2 training on its cached embeddings (see ``TextAdapter``).
        adapter_input_statistics_rows: embeddings those statistics were fitted on (0: not fitted yet).
    """

    model_type = "llm2clip"
    sub_configs = {"vision_config": AutoConfig, "text_config": LLM2CLIPTextConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: LLM2CLIPTextConfig | dict | None = None,
        projection_dim: int | None = None,
        text_embedding_dim: int | None = None,
        adapter_num_blocks: int = 4,
        adapter_expansion: int = 2,
        logit_scale_init_value: float = math.log(1 / 0.07),
        vision_projection: str | None = None,
        adapter_l2_normalize: bool | None = None,
        logit_bias_init_value: float | None = None,
        initializer_range: float = 0.02,
        text_model_fingerprint: str | None = None,
        text_model_name_or_path: str | None = None,
        adapter_input_normalization: str | None = None,
        adapter_input_statistics_rows: int = 0,
        **kwargs: Any,
    ) -> None:
        self.vision_config = as_vision_config(vision_config)
        defaults = FAMILY_DEFAULTS[vision_family(self.vision_config)]
        self.vision_projection = defaults["vision_projection"] if vision_projection is None else vision_projection
        if self.vision_projection not in VISION_PROJECTIONS:
            raise ValueError(f"vision_projection must be one of {VISION_PROJECTIONS}, got {vision_projection!r}.")
        vision_width = self.vision_config.hidden_size
        if self.vision_projection == "none":
            if projection_dim is not None and projection_dim != vision_width:
                raise ValueError(
                    f"vision_projection='none' makes the tower's {vision_width}-d output the image feature, so "
                    f"projection_dim must be {vision_width} (got {projection_dim}); leave it unset, or choose "
                    "vision_projection='linear' to project to another width."
                )
            projection_dim = vision_width
        self.adapter_l2_normalize = (defaults["adapter_l2_normalize"] if adapter_l2_normalize is None
                                     else adapter_l2_normalize)
        self.logit_bias_init_value = logit_bias_init_value
        if isinstance(text_config, dict):  # a saved config's: migrate as LLM2CLIPTextConfig.from_dict does
            text_config = migrate_text_config_dict(text_config)
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
        self.projection_dim = 1280 if projection_dim is None else projection_dim
        self.adapter_num_blocks = adapter_num_blocks
        self.adapter_expansion = adapter_expansion
        self.logit_scale_init_value = logit_scale_init_value
        self.initializer_range = initializer_range
        self.text_model_fingerprint = text_model_fingerprint
        self.text_model_name_or_path = text_model_name_or_path
        if adapter_input_normalization not in (None, "center", "standardize"):
            raise ValueError(f"adapter_input_normalization must be None, 'center' or 'standardize', got "
                             f"{adapter_input_normalization!r}.")
        self.adapter_input_normalization = adapter_input_normalization
        self.adapter_input_statistics_rows = adapter_input_statistics_rows
        super().__init__(**kwargs)


LLM2CLIPConfig.register_for_auto_class()
