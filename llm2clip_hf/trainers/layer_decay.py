"""Optimizer parameter groups for stage 2: layer-wise learning-rate decay on the vision tower (BEiT/EVA style)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

_EMBEDDING_PARAMETERS = ("patch_embed", "pos_embed", "cls_token")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
NO_WEIGHT_DECAY = ("vision_model.pos_embed", "vision_model.cls_token", "logit_scale")


def vision_layer_id(name: str, num_layers: int) -> int:
    """0 for the patch/position/CLS embeddings, ``i + 1`` for block ``i``, ``num_layers + 1`` for the rest."""
    if any(part in name for part in _EMBEDDING_PARAMETERS):
        return 0
    match = _BLOCK.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def layer_decay_parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float,
                                 num_vision_layers: int, vision_prefix: str = "vision_model.") -> list[dict[str, Any]]:
    """Groups of trainable parameters with their learning rate and weight decay, as the official optimizer builds.

    Vision-tower parameters of layer ``l`` get ``lr * layer_decay ** (num_layers + 1 - l)``; everything else (the
    vision head, text adapter, ``logit_scale``) the full rate. Biases, norms, other 1-D parameters, the position
    embedding, the CLS token and ``logit_scale`` get no weight decay.
    """
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = 1.0
        if name.startswith(vision_prefix):
            scale = layer_decay ** (num_vision_layers + 1 - vision_layer_id(name, num_vision_layers))
        decay = not (parameter.ndim <= 1 or name.endswith(".bias") or name in NO_WEIGHT_DECAY)
        group = groups.setdefault((scale, decay), {
            "params": [], "names": [], "lr": learning_rate * scale, "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())
