"""Text encoders published as PEFT adapters, loaded as llm2vec's ``LLM2Vec.from_pretrained`` loads them.

llm2vec's ``McGill-NLP/LLM2Vec-<LLM>-mntp`` holds the base LLM's config and tokenizer beside a LoRA adapter whose
``base_model_name_or_path`` names the base weights; ``...-mntp-supervised`` / ``-unsup-simcse`` are a second
adapter alone, applied on top (``peft_model_name_or_path``); LLM2CLIP's fork merges further adapters
(``extra_model_name_or_path``), and the SigLIP2 LLM2CLIP model ships its Llama-3.1-8B text side as such an adapter
(``adapter_model.bin``). Here every adapter is merged in turn with peft (``merge_and_unload``; a ``.bin`` is read
with ``weights_only=True``), so the encoder saves and reloads as one plain model. Registered with
:class:`~llm2clip_hf.modeling.LLM2CLIPTextModel` so that its ``from_llm`` accepts these sources (the remote code
does not import peft itself).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils.peft_utils import find_adapter_config_file

from ..modeling import LLM2CLIPTextModel
from ..modeling import modeling_llm2clip_text
from ..modeling.hub_files import optional_file

logger = logging.getLogger(__name__)

LLM2VEC_CONFIG = "llm2vec_config.json"
# LLM2Vec.__init__'s defaults, which apply where neither the caller nor llm2vec_config.json set a value.
LLM2VEC_DEFAULTS = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True}
# Architectures llm2vec 0.2.3 runs causally although it means them bidirectional: its Qwen2BiModel does not override
# the causal mask (measured with transformers 4.44.2: equal to a causal Qwen2Model to 1.7e-6).
LLM2VEC_CAUSAL_MODEL_TYPES = ("qwen2",)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def adapter_chain(name_or_path: str, adapters: Sequence[str], hub_kwargs: dict[str, Any]) -> tuple[str, list[str]]:
    """The base weights and every adapter to merge on them, in order: ``name_or_path``'s own adapter (and, for an
    adapter whose base is itself an adapter, that one first), then ``adapters``."""
    chain: list[str] = []
    path = str(name_or_path)
    while (config_file := find_adapter_config_file(path, **hub_kwargs)) is not None:
        chain.insert(0, path)
        if any(optional_file(path, name, **hub_kwargs) for name in _WEIGHT_FILES):
            break  # weights beside the adapter: they are its base
        with open(config_file, encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"The adapter {path} names no base_model_name_or_path; pass the base LLM as the text "
                             f"model and {path} as peft_model_name_or_path (CLI: --text-peft-model).")
        path = base
    return path, chain + [str(adapter) for adapter in adapters]


def llm2vec_settings(name_or_path: str, adapters: Sequence[str], hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``llm2vec_config.json`` as ``LLM2Vec.from_pretrained`` reads it: from the last adapter given, else from
    ``name_or_path``; empty when there is none."""
    source = str(adapters[-1]) if adapters else str(name_or_path)
    found = optional_file(source, LLM2VEC_CONFIG, **hub_kwargs)
    if found is None:
        return {}
    with open(found, encoding="utf-8") as handle:
        return json.load(handle)


def text_model_from_adapters(cls: type[LLM2CLIPTextModel], name_or_path: str | os.PathLike, adapters: Sequence[str],
                             settings: dict[str, Any], from_pretrained_kwargs: dict[str, Any]) -> LLM2CLIPTextModel:
    """An :class:`LLM2CLIPTextModel` from a base LLM and PEFT adapters, merged in turn (see the module docstring).

    ``settings`` are ``from_llm``'s; one left ``None`` takes the value of ``llm2vec_config.json``, else llm2vec's
    default (mean pooling, max length 512, doc max length 400). As llm2vec, the name it sees for ``name_or_path``
    chooses the chat wrapper and the text appended under ``eos_token`` pooling, unless given
    (:meth:`LLM2CLIPTextModel.wrap_llm`). The chosen values are stored in the encoder's config, so the saved
    encoder reloads without the adapters. llm2vec's ``skip_instruction=False`` (pooling the
    instruction too) is refused: this encoder pools the caption only. Attention is bidirectional unless given, but
    for the architectures llm2vec 0.2.3 runs causally (:data:`LLM2VEC_CAUSAL_MODEL_TYPES`: Qwen2), as it does."""
    from peft import PeftModel

    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    base, chain = adapter_chain(str(name_or_path), adapters, hub_kwargs)
    found = llm2vec_settings(str(name_or_path), adapters, hub_kwargs)
    if not found.get("skip_instruction", LLM2VEC_DEFAULTS["skip_instruction"]):
        raise ValueError(f"{LLM2VEC_CONFIG} of {adapters[-1] if adapters else name_or_path} sets skip_instruction="
                         "false (the instruction pooled with the caption), which this encoder does not do.")
    resolved = dict(settings)
    for name in ("pooling_mode", "max_length", "doc_max_length"):
        if resolved.get(name) is None:
            resolved[name] = found.get(name, LLM2VEC_DEFAULTS[name])
    llm_config = AutoConfig.from_pretrained(base, trust_remote_code=False, **hub_kwargs)
    if resolved.get("bidirectional") is None:
        resolved["bidirectional"] = llm_config.model_type not in LLM2VEC_CAUSAL_MODEL_TYPES
        if not resolved["bidirectional"]:
            logger.warning(
                f"{name_or_path}: a {llm_config.model_type} encoder loaded as llm2vec 0.2.3 runs it, with causal "
                "attention (its Qwen2BiModel keeps the causal mask, so llm2vec-trained Qwen2 encoders were trained "
                "causal). Pass bidirectional=True (CLI: a plain LLM) for bidirectional attention.")
    llm_config.is_causal = not resolved["bidirectional"]
    llm = AutoModel.from_pretrained(base, config=llm_config, trust_remote_code=False, **from_pretrained_kwargs)
    for adapter in chain:
        llm = PeftModel.from_pretrained(llm, adapter, **hub_kwargs).merge_and_unload()
    tokenizer = _first_tokenizer([str(name_or_path), *reversed(chain), base], hub_kwargs)
    return cls.wrap_llm(llm, tokenizer, name_or_path, hub_kwargs=hub_kwargs,
                        **{k: v for k, v in resolved.items() if v is not None})


def _first_tokenizer(paths: Sequence[str], hub_kwargs: dict[str, Any]):
    """The tokenizer of the first of ``paths`` that has one (an adapter-only folder has none)."""
    for path in dict.fromkeys(paths):
        if any(optional_file(path, name, **hub_kwargs) for name in ("tokenizer.json", "tokenizer_config.json",
                                                                   "tokenizer.model")):
            return AutoTokenizer.from_pretrained(path, **hub_kwargs)
    raise ValueError(f"None of {list(dict.fromkeys(paths))} has a tokenizer.")


modeling_llm2clip_text.ADAPTER_LOADER = text_model_from_adapters
