"""Where the official LLM2CLIP checkpoints keep the text adapter (and whether their forward L2-normalises its
input), and which text-side weights a conversion drops (CLIP text towers, the LLM itself), naming them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .io import CheckpointConversionError
from .layouts import count_indices


@dataclass(frozen=True)
class AdapterLayout:
    prefix: str
    l2_normalize: bool
    origin: str


# Where the official checkpoints keep the text adapter, and whether their forward L2-normalises its input.
ADAPTER_LAYOUTS = (
    AdapterLayout("text.text_proj.text_adaptor.", False,
                  "LLM2VecTextTransformer.text_proj (SigLIP2 model; called with l2_norm=False)"),
    AdapterLayout("text.text_adaptor.", True, "CustomCLIP.text = TextProj (l2_norm=True)"),
    AdapterLayout("text_adapter.adaptor.", True, "HF LLM2CLIPModel.text_adapter = LLM2CLIP_Adapter (inferred)"),
)
# Weights that are not part of LLM2CLIPModel and are dropped (named in a log line): the CLIP text tower of open_clip
# / EVA-CLIP checkpoints (under text.* for CustomCLIP, top level for open_clip's CLIP, text_model.* in transformers),
# and the LLM held by LLM2VecTextTransformer (text.text.*).
DROPPED_TEXT = (
    (r"text\.text\..+", "LLM weights of LLM2VecTextTransformer (text.text.*)"),
    (r"text\.(?!text_adaptor\.|text_proj\.text_adaptor\.).+", "CLIP text tower (text.*)"),
    (r"(transformer\.resblocks\.\d+\..+|token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)"
     r"|text_projection|attn_mask)", "open_clip CLIP text tower (top level)"),
    (r"text_model\..+|text_projection\.weight", "transformers CLIP text tower (text_model.*)"),
)


def find_adapter(state: Mapping[str, torch.Tensor]) -> AdapterLayout | None:
    found = [layout for layout in ADAPTER_LAYOUTS if any(k.startswith(layout.prefix) for k in state)]
    if len(found) > 1:
        raise CheckpointConversionError(
            f"The checkpoint holds text-adapter keys under several prefixes ({[a.prefix for a in found]}); keep one."
        )
    return found[0] if found else None


def infer_adapter(state: Mapping[str, torch.Tensor], adapter: AdapterLayout) -> dict[str, int]:
    first = adapter.prefix + "0.fn.0.weight"
    if first not in state:
        raise CheckpointConversionError(
            f"The checkpoint has text-adapter keys under {adapter.prefix!r} but lacks {first!r}, needed to read the "
            f"adapter's sizes; its adapter keys: {sorted(k for k in state if k.startswith(adapter.prefix))[:12]}."
        )
    weight = state[first]
    blocks = count_indices(state, re.escape(adapter.prefix) + r"(\d+)\.fn\.")
    return dict(text_embedding_dim=weight.shape[1], adapter_num_blocks=blocks,
                adapter_expansion=weight.shape[0] // weight.shape[1])


def map_adapter_key(key: str, adapter: AdapterLayout) -> str | None:
    if key.startswith(adapter.prefix):
        return "text_adapter.layers." + key[len(adapter.prefix):]
    return None


def dropped_category(key: str) -> str | None:
    for pattern, category in DROPPED_TEXT:
        if re.fullmatch(pattern, key):
            return category
    return None
