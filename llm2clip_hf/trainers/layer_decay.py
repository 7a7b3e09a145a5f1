"""Optimizer parameter groups for stage 2: layer-wise learning-rate decay on the vision tower (BEiT/EVA style), for
every tower family the model supports. Layer ids, with names relative to the tower (``vision_model.``) and ``L`` its
``num_hidden_layers``:

* 0 (stem): EVA02 ``patch_embed``, ``pos_embed``, ``cls_token``; CLIP ``embeddings.*`` (patch, position, class) and
  ``pre_layrnorm``; SigLIP ``embeddings.*`` (patch, position);
* ``N + 1``: EVA02 ``blocks.N.``; CLIP and SigLIP ``encoder.layers.N.``;
* ``L + 1``: the rest of the tower (EVA02 ``norm``, CLIP / SigLIP ``post_layernorm``, SigLIP's MAP ``head``).

Parameters outside the tower (``visual_projection``, the text adapter, ``logit_scale``, ``logit_bias``) take the full
rate, as layer ``L + 1`` does.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

# Relative to the vision tower: its stem (layer 0) and its transformer blocks (layer N + 1).
_STEM = re.compile(r"^(?:patch_embed\.|pos_embed$|cls_token$|embeddings\.|pre_layrnorm\.)")
_BLOCK = re.compile(r"^(?:blocks|encoder\.layers)\.(\d+)\.")
# No weight decay, besides every bias and every 0-/1-D parameter (norms, CLIP's class embedding, scalars).
VISION_NO_WEIGHT_DECAY = (
    "pos_embed", "cls_token",  # EVA02
    "embeddings.class_embedding", "embeddings.position_embedding.weight",  # CLIP; SigLIP has the latter
    "head.probe",  # SigLIP's MAP head query
)
NO_WEIGHT_DECAY = ("logit_scale", "logit_bias")


def vision_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a vision-tower parameter named relative to the tower (``blocks.3.attn.q_proj.weight``,
    ``encoder.layers.3.mlp.fc1.weight``, ...): 0 for the patch/position/class embeddings and CLIP's pre-LayerNorm,
    ``N + 1`` for block / layer ``N``, ``num_layers + 1`` for everything after (final norm, SigLIP's MAP head)."""
    if _STEM.search(name):
        return 0
    match = _BLOCK.search(name)
    if match is None:
        return num_layers + 1
    index = int(match.group(1))
    if index >= num_layers:
        raise ValueError(f"Vision parameter {name!r} belongs to block {index}, but the tower has {num_layers} layers; "
                         "pass the vision config's num_hidden_layers.")
    return index + 1


def layer_decay_parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float,
                                 num_vision_layers: int | None = None,
                                 vision_prefix: str = "vision_model.") -> list[dict[str, Any]]:
    """Groups of trainable parameters with their learning rate and weight decay, as the official optimizer builds.

    Vision-tower parameters (names starting with ``vision_prefix``) of layer ``l`` (see :func:`vision_layer_id`) get
    ``lr * layer_decay ** (num_layers + 1 - l)``; everything else (the image projection, text adapter,
    ``logit_scale``, ``logit_bias``) the full rate. ``num_vision_layers`` defaults to
    ``model.config.vision_config.num_hidden_layers``. Biases, norms and other 0-/1-D parameters, position and class
    embeddings, SigLIP's MAP-head probe, ``logit_scale`` and ``logit_bias`` get no weight decay. Each group lists its
    parameters' ``names``.
    """
    if num_vision_layers is None:
        num_vision_layers = model.config.vision_config.num_hidden_layers
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale, decay = 1.0, not (parameter.ndim <= 1 or name.endswith(".bias") or name in NO_WEIGHT_DECAY)
        if name.startswith(vision_prefix):
            relative = name[len(vision_prefix):]
            scale = layer_decay ** (num_vision_layers + 1 - vision_layer_id(relative, num_vision_layers))
            decay = decay and relative not in VISION_NO_WEIGHT_DECAY
        group = groups.setdefault((scale, decay), {
            "params": [], "names": [], "lr": learning_rate * scale, "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())
