"""Convert official eva_clip LLM2CLIP checkpoints (``LLM2CLIP-EVA02-*.pt``: vision tower + text adapter)."""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .modeling import EVA02VisionConfig, LLM2CLIPConfig, LLM2CLIPModel
from .modeling.modeling_eva02 import resize_position_embedding

# Recomputed from the config, never loaded.
_ROPE_BUFFER = re.compile(r"^visual\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
# Wrappers that training scripts put around the state dict.
_WRAPPER_KEYS = ("state_dict", "module", "model")
_RENAMES = (
    (re.compile(r"^visual\.head\.(weight|bias)$"), r"visual_projection.\1"),
    (re.compile(r"^visual\.blocks\.(\d+)\.attn\.q_bias$"), r"vision_model.blocks.\1.attn.q_proj.bias"),
    (re.compile(r"^visual\.blocks\.(\d+)\.attn\.v_bias$"), r"vision_model.blocks.\1.attn.v_proj.bias"),
    (re.compile(r"^visual\.(.+)$"), r"vision_model.\1"),
    (re.compile(r"^text\.text_adaptor\.(.+)$"), r"text_adapter.layers.\1"),
    (re.compile(r"^logit_scale$"), "logit_scale"),
)


class CheckpointConversionError(ValueError):
    """The checkpoint does not match the LLM2CLIP layout; the message lists what is missing or unexpected."""


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.pt`` checkpoint safely (``weights_only=True``) and strip ``state_dict``/``module`` wrappers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle refusing arbitrary objects lands here
        raise CheckpointConversionError(
            f"Could not load {path} with torch.load(weights_only=True): {error}. Only plain tensor checkpoints are "
            "read; re-save it as a dict of tensors (torch.save(model.state_dict(), ...)) from a trusted environment."
        ) from error
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if wrapper is None:
            raise CheckpointConversionError(
                f"{path} holds no tensors at its top level nor under {list(_WRAPPER_KEYS)}; top-level keys: "
                f"{sorted(state)[:20]}."
            )
        state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return {_strip_module_prefix(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_module_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def official_to_hf_key(key: str) -> str | None:
    """Our parameter name for an official key, or ``None`` if the key belongs to no LLM2CLIP parameter."""
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def infer_config(state: Mapping[str, torch.Tensor], vision_num_heads: int | None = None,
                 **config_overrides: Any) -> LLM2CLIPConfig:
    """Read every size of the model from tensor shapes; ``config_overrides`` replace vision or top-level settings."""
    required = ("visual.cls_token", "visual.pos_embed", "visual.patch_embed.proj.weight", "visual.blocks.0.mlp.w1.weight",
                "visual.head.weight", "text.text_adaptor.0.fn.0.weight")
    absent = [key for key in required if key not in state]
    if absent:
        raise CheckpointConversionError(
            f"Not an LLM2CLIP eva_clip checkpoint: missing {absent}. Found keys such as {sorted(state)[:10]}."
        )
    width = state["visual.cls_token"].shape[-1]
    patch = state["visual.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["visual.pos_embed"].shape[1] - 1)
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"visual\.blocks\.(\d+)\.", k))})
    adapter_dim = state["text.text_adaptor.0.fn.0.weight"].shape[1]
    adapter_blocks = len({int(m.group(1)) for k in state if (m := re.match(r"text\.text_adaptor\.(\d+)\.fn\.", k))})
    heads = vision_num_heads if vision_num_heads is not None else width // 64
    if heads < 1 or width % heads:
        raise CheckpointConversionError(
            f"vision_num_heads={heads} does not divide the vision width {width}; official EVA02 towers use head "
            f"width 64 ({width // 64} heads for this checkpoint)."
        )
    vision = dict(
        image_size=grid * patch, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
        num_attention_heads=heads, intermediate_size=state["visual.blocks.0.mlp.w1.weight"].shape[0],
        qkv_bias="visual.blocks.0.attn.q_proj.bias" in state or "visual.blocks.0.attn.q_bias" in state,
    )
    top = dict(
        projection_dim=state["visual.head.weight"].shape[0], text_embedding_dim=adapter_dim,
        adapter_num_blocks=adapter_blocks,
        adapter_expansion=state["text.text_adaptor.0.fn.0.weight"].shape[0] // adapter_dim,
    )
    vision_keys = set(inspect.signature(EVA02VisionConfig.__init__).parameters) - {"self", "kwargs"}
    top_keys = set(inspect.signature(LLM2CLIPConfig.__init__).parameters) - {"self", "kwargs", "vision_config"}
    for key, value in config_overrides.items():
        if key in vision_keys:
            vision[key] = value
        elif key in top_keys:
            top[key] = value
        else:
            raise TypeError(f"Unknown config override {key!r}; vision settings: {sorted(vision_keys)}, "
                            f"model settings: {sorted(top_keys)}.")
    try:
        vision_config = EVA02VisionConfig(**vision)
    except ValueError as error:
        raise CheckpointConversionError(str(error)) from error
    return LLM2CLIPConfig(vision_config=vision_config, **top)


def convert_state_dict(state: Mapping[str, torch.Tensor], model: LLM2CLIPModel) -> dict[str, torch.Tensor]:
    """Rename official keys for ``model``, resize the position embedding to its grid, and check completeness."""
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        if _ROPE_BUFFER.match(key):
            continue
        target = official_to_hf_key(key)
        if target is None or target not in expected:
            unexpected.append(key)
            continue
        converted[target] = tensor.float()
    if "vision_model.pos_embed" in converted:
        converted["vision_model.pos_embed"] = resize_position_embedding(
            converted["vision_model.pos_embed"], model.config.vision_config.grid_size
        )
    missing = sorted(set(expected) - set(converted))
    mismatched = [f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in sorted(converted) if converted[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        raise CheckpointConversionError(
            "The checkpoint does not match the LLM2CLIP layout.\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {sorted(unexpected)}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}"
        )
    return converted


def convert_eva_clip_checkpoint(path: str | os.PathLike, *, vision_num_heads: int | None = None,
                                **config_overrides: Any) -> LLM2CLIPModel:
    """Build an :class:`LLM2CLIPModel` (float32) from an official eva_clip ``.pt`` checkpoint.

    Sizes come from tensor shapes; heads default to width // 64. ``config_overrides`` (for example
    ``image_size=336``, which resizes the position embedding bicubically) go to the vision or model config.
    Every official key must map onto the model; otherwise the error lists the missing and unexpected keys.
    """
    state = load_official_state_dict(path)
    config = infer_config(state, vision_num_heads=vision_num_heads, **config_overrides)
    with torch.device("meta"):
        model = LLM2CLIPModel(config)
    model.load_state_dict(convert_state_dict(state, model), strict=True, assign=True)
    return model.eval()
