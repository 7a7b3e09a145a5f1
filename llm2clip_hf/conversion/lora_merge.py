"""LoRA-adapted models seen as what they compute: the PEFT unwrap, and their weights with every adapter merged.

One merge serves the live model (:func:`merged_state_dict`) and a state dict gathered elsewhere, e.g. the
consolidated one FSDP or DeepSpeed hand to the final save (:func:`merge_lora_state_dict`): per LoRA layer
``W + scaling * B @ A`` for each active, not yet merged adapter, computed in float32 (as PEFT's ``merge``), cast
back to ``W``'s dtype and moved to the CPU, as it would be saved. The live weights are never touched: merging and
unmerging in place (``W + d - d``) does not give ``W`` back in bfloat16 / float16, so saving during training would
nudge the base weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

_BASE = "base_layer."


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a ``PeftModel`` wraps, or ``model`` itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


@dataclass(frozen=True)
class LoraMerge:
    """What merging one LoRA layer takes besides its tensors: the scaling of each adapter to add (active and not
    merged yet), and whether the base weight is stored transposed (``fan_in_fan_out``, GPT-2's ``Conv1D``)."""

    scalings: dict[str, float]
    fan_in_fan_out: bool = False


def lora_merges(module: nn.Module) -> dict[str, LoraMerge]:
    """The LoRA layers of ``module`` by name (their state-dict prefix), with how to merge each.

    Only plain LoRA on linear layers is merged this way (what LLM2CLIP trains); DoRA and other variants, and LoRA
    on embeddings or convolutions, raise ``NotImplementedError``.
    """
    merges = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if not isinstance(layer, LoraLinear) or getattr(layer, "lora_variant", None):
            raise NotImplementedError(
                f"Cannot merge the LoRA layer {name!r} ({type(layer).__name__}"
                f"{', a LoRA variant such as DoRA' if getattr(layer, 'lora_variant', None) else ''}): only plain "
                "LoRA on linear layers is supported."
            )
        adapters = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
        merges[name] = LoraMerge({a: float(layer.scaling[a]) for a in adapters}, bool(layer.fan_in_fan_out))
    return merges


def iter_merged_lora(state: Mapping[str, torch.Tensor], merges: Mapping[str, LoraMerge]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of ``state`` with each LoRA layer of ``merges`` replaced by its merged base layer.

    Keys are those of the model without adapters (``...q_proj.weight``, not ``...q_proj.base_layer.weight`` or
    ``lora_A``). Merged tensors are computed one layer at a time; other tensors are passed through as they are.
    """
    for key, value in state.items():
        owner = next((name for name in merges if key.startswith(name + ".")), None)
        if owner is None:
            yield key, value
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith(_BASE):
            continue  # lora_A / lora_B: merged into the base layer's tensors
        rest = rest[len(_BASE):]
        if rest in ("weight", "bias"):
            value = _merged_tensor(state, owner, rest, value, merges[owner])
        yield f"{owner}.{rest}", value


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every LoRA layer merged (what ``save_pretrained(state_dict=...)`` takes)."""
    return dict(iter_merged_state(module))


def iter_merged_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`merged_state_dict` one tensor at a time."""
    return iter_merged_lora(module.state_dict(), lora_merges(module))


def merge_lora_state_dict(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of ``module`` gathered elsewhere (same keys; e.g. FSDP's or DeepSpeed's consolidated one) with
    every LoRA layer merged, using ``module``'s LoRA scalings and active adapters."""
    return dict(iter_merged_lora(state, lora_merges(module)))


def _merged_tensor(state: Mapping[str, torch.Tensor], owner: str, kind: str, base: torch.Tensor,
                   merge: LoraMerge) -> torch.Tensor:
    """``base`` (the weight or bias of ``owner``'s base layer) plus each adapter's ``scaling * B @ A`` (or, for a
    bias, ``scaling * B.bias`` where the adapter has one), in float32, then in ``base``'s dtype on the CPU."""
    merged = base.detach().float()
    changed = False
    for adapter, scaling in merge.scalings.items():
        lora_b = f"{owner}.lora_B.{adapter}.{kind}"
        if kind == "bias":
            if lora_b not in state:
                continue
            delta = state[lora_b].float()
        else:
            delta = state[lora_b].float() @ state[f"{owner}.lora_A.{adapter}.weight"].float()
            delta = delta.t() if merge.fan_in_fan_out else delta
        merged = merged + delta * scaling
        changed = True
    return merged.to(base.dtype).cpu() if changed else base
