"""The identity of a text encoder's computation: the fingerprint that binds an embedding cache, and a stage-2
model's adapter, to the text model whose embeddings they were made from or trained on."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..modeling import LLM2CLIPTextConfig, LLM2CLIPTextModel
from .lora_merge import iter_merged_state


# Config entries that say how a checkpoint was saved or what a forward returns, not what it computes.
_BOOKKEEPING_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "initializer_range",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
})


# Text-config settings added with sentence-transformers teachers (issue 35). At their defaults they compute what
# encoders computed before they existed, so they are left out there: embedding caches made earlier stay valid.
_ADDED_SETTINGS = ("pooled_tokens", "normalize_embeddings", "padding_side", "prompts", "default_prompt_name")


def _computing_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {key: _computing_settings(value) if isinstance(value, dict) else value
            for key, value in config.items() if key not in _BOOKKEEPING_CONFIG_KEYS}


def _text_settings(config: LLM2CLIPTextConfig) -> dict[str, Any]:
    """The text config's computing settings, the :data:`_ADDED_SETTINGS` at their defaults left out."""
    settings, defaults = _computing_settings(config.to_dict()), LLM2CLIPTextConfig().to_dict()
    return {key: value for key, value in settings.items()
            if key not in _ADDED_SETTINGS or value != defaults[key]}


def text_model_fingerprint(text_model: LLM2CLIPTextModel) -> str:
    """Hash of what the text encoder computes: its configuration (the LLM's included), tokenizer, and weights with
    any LoRA adapters merged, so a model in training and its saved, reloaded copy have the same fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(_text_settings(text_model.config), sort_keys=True, default=str).encode())
    digest.update(_tokenizer_identity(text_model.require_tokenizer()).encode())
    tensors = {}  # one digest per tensor, combined in key order: merged tensors are made one at a time
    for name, tensor in iter_merged_state(text_model):
        tensor_digest = hashlib.blake2b(f"{tuple(tensor.shape)}:{tensor.dtype}".encode(), digest_size=16)
        tensor_digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        tensors[name] = tensor_digest.hexdigest()
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer's vocabulary and pipeline, without the padding/truncation state that calls change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True) + json.dumps(tokenizer.padding_side)
