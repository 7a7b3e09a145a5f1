"""LoRA-adapted models seen as what they compute: the PEFT unwrap, and their weights with every adapter merged.

Merging happens on a float32 copy of one layer at a time, never on the live weights: merging and unmerging in
place (``W + d - d``) does not give ``W`` back in bfloat16 / float16, so saving during training would nudge the base
weights. Each merged tensor is cast back to its layer's dtype and moved to the CPU, as it would be saved.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a ``PeftModel`` wraps, or ``model`` itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def iter_merged_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of ``module``'s state dict with each LoRA layer replaced by its merged base layer.

    Keys are those of the model without adapters (``...q_proj.weight``, not ``...q_proj.base_layer.weight`` or
    ``lora_A``). Merged layers are computed one at a time (float32 copy, PEFT's own ``merge``); other tensors are the
    live ones (detached).
    """
    lora_layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}
    done: set[str] = set()
    for key, value in module.state_dict().items():
        owner = next((name for name in lora_layers if key.startswith(name + ".")), None)
        if owner is None:
            yield key, value
        elif owner not in done:
            done.add(owner)
            for name, tensor in _merged_base_state(lora_layers[owner]).items():
                yield f"{owner}.{name}", tensor


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`iter_merged_state` as a dict (what ``save_pretrained(state_dict=...)`` takes)."""
    return dict(iter_merged_state(module))


def _merged_base_state(layer: LoraLayer) -> dict[str, torch.Tensor]:
    base = layer.get_base_layer()
    dtypes = {name: tensor.dtype for name, tensor in base.state_dict().items()}
    if layer.merged:  # the adapters are already in the base weights
        return {name: tensor.detach().cpu() for name, tensor in base.state_dict().items()}
    work = copy.deepcopy(layer).float()
    work.merge()
    merged = work.get_base_layer().state_dict()
    return {name: merged[name].detach().to(dtype=dtypes[name]).cpu() for name in dtypes}
