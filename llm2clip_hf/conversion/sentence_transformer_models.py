"""sentence-transformers models as text encoders (teachers): read a folder's or Hub repo's ``modules.json``,
``sentence_bert_config.json``, ``1_Pooling/config.json`` and ``config_sentence_transformers.json``, and build the
:class:`~llm2clip_hf.modeling.LLM2CLIPTextModel` that computes what ``SentenceTransformer(...).encode`` computes.

What the text encoder can express, and so what is loaded: a ``Transformer`` (text only, ``feature-extraction``),
then one ``Pooling`` (``cls``, ``max``, ``mean``, ``mean_sqrt_len_tokens``, ``weightedmean``, ``lasttoken``; with or
without the prompt), then optionally ``Normalize``; the prompts and default prompt; the tokenizer's padding side;
``max_seq_length``. Attention stays as the model has it: an encoder (BERT, ...) is bidirectional, a decoder embedder
keeps its causal mask. Anything else (``Dense``, ``LayerNorm``, custom modules, several pooling modes at once, a
lower-casing ``do_lower_case``, chat-template inputs, PEFT adapters, remote code) is refused by name, since the
saved encoder's remote code could not compute it. The result saves as a normal ``LLM2CLIPTextModel`` folder.
Registered with :class:`~llm2clip_hf.modeling.LLM2CLIPTextModel` so that ``from_llm`` (and ``load_text_model``,
CLI ``--text-model``) take these sources.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Any

from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils.peft_utils import find_adapter_config_file

from ..modeling import LLM2CLIPTextModel
from ..modeling import modeling_llm2clip_text
from ..modeling.caption_tokenization import ALL_BUT_PROMPT, ALL_TOKENS
from ..modeling.configuration_llm2clip_text import is_encoder_config
from ..modeling.hub_files import optional_file

logger = logging.getLogger(__name__)

SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# sentence-transformers' pooling mode -> this package's; "weightedmean" only with the prompt pooled (see below).
POOLING_MODES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "weightedmean": "weighted_mean", "lasttoken": "last_token"}
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                        "sentence_camembert_config.json", "sentence_albert_config.json",
                        "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
# Keys of model_kwargs / model_args that choose how the weights load, not what they compute.
_LOADING_KEYS = {"torch_dtype", "dtype", "attn_implementation", "low_cpu_mem_usage", "device_map"}
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")
# from_llm settings a sentence-transformers model decides itself (max_length may shorten or lengthen truncation).
_OWN_SETTINGS = ("pooling_mode", "text_template", "doc_max_length", "eos_text", "bidirectional")


def _read_json(name_or_path: str, filename: str, hub_kwargs: dict[str, Any]) -> dict | list | None:
    found = optional_file(name_or_path, filename, **hub_kwargs)
    if found is None:
        return None
    with open(found, encoding="utf-8") as handle:
        return json.load(handle)


def _module_kind(module: dict[str, Any]) -> str:
    """``Transformer`` / ``Pooling`` / ``Normalize`` for sentence-transformers' own classes (any of their import
    paths), else the full type name."""
    type_name = str(module.get("type", ""))
    short = type_name.rsplit(".", 1)[-1]
    return short if type_name.startswith("sentence_transformers.") and short in SUPPORTED_MODULES else type_name


def sentence_transformer_modules(name_or_path: str, hub_kwargs: dict[str, Any]) -> tuple[str, str, str | None]:
    """The folders (paths inside the model) of its Transformer and Pooling modules and whether it normalises
    (``Normalize``'s path or ``None``); refuses every other layout by name."""
    modules = sorted(_read_json(name_or_path, "modules.json", hub_kwargs) or [], key=lambda m: m.get("idx", 0))
    kinds = [_module_kind(module) for module in modules]
    unsupported = [f"{kind!r} (module {module.get('idx')}, {module.get('path')!r})"
                   for kind, module in zip(kinds, modules) if kind not in SUPPORTED_MODULES]
    if unsupported:
        raise ValueError(
            f"{name_or_path} uses the sentence-transformers module(s) {', '.join(unsupported)}, which an "
            f"LLM2CLIP text encoder cannot compute (its remote code expresses {', '.join(SUPPORTED_MODULES)} only). "
            "Use a model built of those, or embed the captions with sentence-transformers and train stage 2 on "
            "an embedding cache of your own."
        )
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(f"{name_or_path}: modules.json holds {kinds}; an LLM2CLIP text encoder takes a Transformer, "
                         "then one Pooling, then optionally Normalize.")
    return modules[0].get("path", ""), modules[1].get("path", ""), modules[2].get("path") if len(kinds) == 3 else None


def transformer_settings(name_or_path: str, path: str, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Transformer module's config (``sentence_bert_config.json`` or a legacy name), refusing what changes the
    computation beyond a plain text forward: lower-casing, other tasks, chat-template or multimodal inputs,
    processor (but ``padding_side``) or config overrides."""
    found: dict[str, Any] = {}
    for filename in _TRANSFORMER_CONFIGS:
        found = _read_json(name_or_path, posixpath.join(path, filename) if path else filename, hub_kwargs) or {}
        if found:
            break
    problems = []
    if found.get("do_lower_case"):
        problems.append("do_lower_case: true (sentence-transformers lower-cases the text before its tokenizer)")
    if found.get("transformer_task", "feature-extraction") != "feature-extraction":
        problems.append(f"transformer_task {found['transformer_task']!r} (only feature-extraction)")
    modality = found.get("modality_config", {"text": {"method": "forward", "method_output_name": "last_hidden_state"}})
    text = modality.get("text", {})
    if set(modality) != {"text"} or text.get("method") != "forward" or \
            text.get("method_output_name") not in ("last_hidden_state", ["last_hidden_state"]):
        problems.append(f"modality_config {modality} (only text through forward's last_hidden_state; 'message' "
                        "means chat-template inputs)")
    for key in ("processing_kwargs", "config_kwargs", "config_args"):
        if found.get(key):
            problems.append(f"{key} {found[key]}")
    if set(_tokenizer_kwargs(found)) - {"padding_side"}:
        problems.append(f"processor_kwargs {_tokenizer_kwargs(found)} (only padding_side)")
    model_kwargs = {**found.get("model_args", {}), **found.get("model_kwargs", {})}
    if set(model_kwargs) - _LOADING_KEYS:
        problems.append(f"model_kwargs {model_kwargs}")
    if problems:
        raise ValueError(f"{name_or_path}'s Transformer module sets {'; '.join(problems)}, which an LLM2CLIP text "
                         "encoder cannot reproduce. Use a model without them.")
    return found


def _tokenizer_kwargs(transformer: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer arguments of a Transformer module's config (``processor_kwargs``, legacy ``tokenizer_args``)."""
    return {**transformer.get("tokenizer_args", {}), **transformer.get("processor_kwargs", {})}


def pooling_settings(name_or_path: str, path: str, hub_kwargs: dict[str, Any]) -> tuple[str, str]:
    """``(pooling_mode, pooled_tokens)`` from the Pooling module's ``config.json`` (current or legacy keys)."""
    config = _read_json(name_or_path, posixpath.join(path, "config.json") if path else "config.json", hub_kwargs)
    if config is None:
        raise ValueError(f"{name_or_path}: the Pooling module's folder {path!r} has no config.json.")
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    include_prompt = config.get("include_prompt", True)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{name_or_path}'s Pooling uses pooling_mode {mode!r}; an LLM2CLIP text encoder takes one of "
                         f"{sorted(POOLING_MODES)} (not several concatenated).")
    if modes[0] == "weightedmean" and not include_prompt:
        raise ValueError(f"{name_or_path}'s Pooling is weightedmean with include_prompt false (weights counted from "
                         "the prompt's first token), which an LLM2CLIP text encoder does not compute.")
    return POOLING_MODES[modes[0]], ALL_TOKENS if include_prompt else ALL_BUT_PROMPT


def text_model_from_sentence_transformer(cls: type[LLM2CLIPTextModel], name_or_path: str | os.PathLike,
                                         settings: dict[str, Any],
                                         from_pretrained_kwargs: dict[str, Any]) -> LLM2CLIPTextModel:
    """An :class:`LLM2CLIPTextModel` computing what ``SentenceTransformer(name_or_path).encode`` computes (see the
    module docstring). ``settings`` are ``from_llm``'s: ``max_length`` replaces the model's ``max_seq_length``; the
    others are the model's own, and a different value is refused rather than silently changing its embeddings."""
    name_or_path = str(name_or_path)
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    card = _read_json(name_or_path, "config_sentence_transformers.json", hub_kwargs) or {}
    if card.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise ValueError(f"{name_or_path} is a {card['model_type']}, not a SentenceTransformer (dense sentence "
                         "embeddings), which an LLM2CLIP text encoder does not compute.")
    transformer_path, pooling_path, normalize = sentence_transformer_modules(name_or_path, hub_kwargs)
    transformer = transformer_settings(name_or_path, transformer_path, hub_kwargs)
    pooling_mode, pooled_tokens = pooling_settings(name_or_path, pooling_path, hub_kwargs)
    model_kwargs = dict(from_pretrained_kwargs)
    if transformer_path:
        model_kwargs["subfolder"] = posixpath.join(model_kwargs.get("subfolder") or "", transformer_path)
    location = {k: v for k, v in model_kwargs.items() if k in (*_HUB_KWARGS, "subfolder")}
    if find_adapter_config_file(name_or_path, **location) is not None:
        raise ValueError(f"{name_or_path}'s Transformer module is a PEFT adapter; merge it into its base, save the "
                         "sentence-transformers model again and load that.")
    llm_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **location)
    if getattr(llm_config, "is_encoder_decoder", False):
        raise ValueError(f"{name_or_path} is a {llm_config.model_type} encoder-decoder (sentence-transformers runs its "
                         "encoder alone), which an LLM2CLIP text encoder does not compute.")
    encoder = is_encoder_config(llm_config)
    bidirectional = True if encoder else getattr(llm_config, "is_causal", True) is False
    own = {"pooling_mode": pooling_mode, "text_template": None, "doc_max_length": None, "eos_text": None,
           "bidirectional": bidirectional}
    conflicts = {k: (settings[k], own[k]) for k in _OWN_SETTINGS if settings.get(k) is not None
                 and settings[k] != own[k] and not (k == "text_template" and settings[k] == "none")}
    if conflicts:
        details = ", ".join(f"{k}={given!r} (the model's: {mine!r})" for k, (given, mine) in conflicts.items())
        raise ValueError(f"{name_or_path} is a sentence-transformers model with its own settings; {details} would "
                         "change its embeddings. Drop these options.")
    llm = AutoModel.from_pretrained(name_or_path, config=llm_config, trust_remote_code=False, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **location, **_tokenizer_kwargs(transformer))
    max_length = settings.get("max_length") or transformer.get("max_seq_length") or \
        _longest_input(tokenizer, llm_config)
    prompts = {name: prompt for name, prompt in (card.get("prompts") or {}).items() if prompt is not None}
    text_model = cls.wrap_llm(
        llm, tokenizer, name_or_path, hub_kwargs=hub_kwargs, text_template="none", pooling_mode=pooling_mode,
        max_length=max_length, bidirectional=bidirectional, pooled_tokens=pooled_tokens,
        normalize_embeddings=normalize is not None, padding_side=tokenizer.padding_side, prompts=prompts,
        default_prompt_name=card.get("default_prompt_name"),
    )
    logger.info(f"Text encoder from the sentence-transformers model {name_or_path}: {llm_config.model_type} "
                f"({'encoder' if encoder else 'causal' if not bidirectional else 'bidirectional'}), {pooling_mode} "
                f"pooling over {pooled_tokens} tokens, normalised: {normalize is not None}, padding "
                f"{tokenizer.padding_side}, max length {max_length}, prompts {sorted(prompts)}.")
    return text_model


def _longest_input(tokenizer: Any, llm_config: Any) -> int:
    """sentence-transformers' limit where ``max_seq_length`` is not set: the tokenizer's ``model_max_length``, or
    (a tokenizer without one) the model's ``max_position_embeddings``."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000:
        return limit
    positions = getattr(llm_config, "max_position_embeddings", None)
    if positions is None:
        raise ValueError("This sentence-transformers model sets no max_seq_length and its tokenizer and config no "
                         "length; pass max_length.")
    return positions


modeling_llm2clip_text.SENTENCE_TRANSFORMERS_LOADER = text_model_from_sentence_transformer
