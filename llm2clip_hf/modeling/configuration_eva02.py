"""Configuration of the EVA02 vision tower used by LLM2CLIP."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Official EVA02-CLIP vision presets (eva_clip model_configs, mlp_ratio 2.6667, head width 64).
EVA02_PRESETS: dict[str, dict[str, int]] = {
    "B/16": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=2048),
    "L/14": dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, intermediate_size=2730),
    "L/14-336": dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=2730),
}


class EVA02VisionConfig(PretrainedConfig):
    """Configuration of :class:`EVA02VisionModel`.

    Defaults describe EVA02-B/16. ``rope_pretrain_grid`` is the patch grid of the pretraining resolution
    (``pt_hw_seq_len`` in eva_clip): rotary positions of any other grid are interpolated onto it.

    ``initializer_range`` is the std of the truncated-normal initialisation of a new tower's Linear layers,
    ``cls_token`` and ``pos_embed`` (eva_clip's 0.02). ``head_init_scale`` is eva_clip's ``init_scale``: a new
    projection head (``LLM2CLIPModel.visual_projection``, eva_clip's ``visual.head``) starts as a truncated normal of
    std ``initializer_range`` multiplied by it, with a zero bias. EVA02-CLIP builds its towers with the
    constructor's default, 0.001. Neither setting matters for weights loaded from a checkpoint.
    """

    model_type = "llm2clip_eva02_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 2048,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        rope_theta: float = 10000.0,
        rope_pretrain_grid: int = 16,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        head_init_scale: float = 0.001,
        **kwargs: Any,
    ) -> None:
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.rope_theta = rope_theta
        self.rope_pretrain_grid = rope_pretrain_grid
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.head_init_scale = head_init_scale
        super().__init__(**kwargs)
        self.validate_shapes()

    def validate_shapes(self) -> None:
        """Raise a ``ValueError`` naming the setting that makes the tower impossible to build."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"EVA02VisionConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose a head count that divides it "
                f"(official EVA02 uses head width 64, i.e. {self.hidden_size // 64} heads)."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 4:
            raise ValueError(
                f"EVA02VisionConfig: head width {head_dim} must be a multiple of 4 for 2-D rotary embeddings "
                "(half of it per axis, rotated in pairs)."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"EVA02VisionConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}."
            )

    @property
    def grid_size(self) -> int:
        """Number of patches along one side of the image."""
        return self.image_size // self.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EVA02VisionConfig":
        """Build the official ``"B/16"``, ``"L/14"`` or ``"L/14-336"`` tower, with optional overrides."""
        if name not in EVA02_PRESETS:
            raise ValueError(f"Unknown EVA02 preset {name!r}; choose one of {sorted(EVA02_PRESETS)}.")
        return cls(**{**EVA02_PRESETS[name], **overrides})


EVA02VisionConfig.register_for_auto_class()
