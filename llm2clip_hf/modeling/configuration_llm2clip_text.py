"""Configuration of the LLM2Vec-style text encoder: a decoder LLM made bidirectional, plus pooling settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from .caption_tokenization import (
    CAPTION_TAIL, check_doc_max_length, check_padding_side, check_pooled_tokens, resolve_text_template,
)
from .llm2vec_naming import llm2vec_eos_text
from .pooling import check_pooling_mode

CONFIG_VERSION = 2
"""What a saved text config means (CHANGELOG.md). 1, configs without ``config_version``: under ``eos_token`` pooling
a config without ``eos_text`` appended the tokenizer's eos token *id* after truncating to ``max_length - 1``
(releases before the llm2vec eos rule). 2: ``eos_text`` is appended as text, as llm2vec does; a version-1 config
migrates to ``append_eos_token_id=True``, so it keeps giving what it gave."""


def migrate_text_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A saved text config's dict in the current :data:`CONFIG_VERSION`'s meaning (see there); refuses a newer one."""
    config_dict = dict(config_dict)
    version = config_dict.get("config_version", 1)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(
            f"This text config has config_version {version!r}, written by a newer llm2clip-hf than this code (which "
            f"reads up to {CONFIG_VERSION}); load it with trust_remote_code=True (the checkpoint's own code) or "
            "upgrade llm2clip-hf."
        )
    if version < 2 and config_dict.get("pooling_mode") == "eos_token" and config_dict.get("eos_text") is None:
        config_dict["append_eos_token_id"] = True
    config_dict["config_version"] = CONFIG_VERSION
    return config_dict


def is_encoder_config(llm_config: PretrainedConfig) -> bool:
    """Whether ``llm_config`` is of an encoder-only architecture (BERT, RoBERTa, MPNet, ...: bidirectional by
    construction, absolute positions), as opposed to a decoder LLM (Llama, Qwen2, ...)."""
    return (not getattr(llm_config, "is_decoder", False) and not getattr(llm_config, "is_encoder_decoder", False)
            and getattr(llm_config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


class LLM2CLIPTextConfig(PretrainedConfig):
    """Configuration of :class:`LLM2CLIPTextModel`.

    Args:
        llm_config: configuration of the wrapped transformers decoder (Llama, Mistral, Qwen2, ...) or, for an encoder
            loaded from a sentence-transformers model, encoder (BERT, ...), as a config object or its dict.
        pooling_mode: ``"mean"`` (official), ``"weighted_mean"``, ``"eos_token"`` or ``"last_token"``; also
            sentence-transformers' ``"cls"``, ``"max"`` and ``"mean_sqrt_len_tokens"``.
        text_template: ``None``, a string holding ``{text}`` once (e.g. a chat wrapper), or a preset name from
            ``TEXT_TEMPLATES``. Stored as the resolved string.
        max_length: token budget per text, special tokens and template included (stored as ``max_seq_length``,
            since ``max_length`` is a generation setting in transformers configs).
        bidirectional: drop the causal mask (``llm_config.is_causal = False``), as LLM2Vec does. An encoder is
            bidirectional by construction: its config is left as it is (``False`` is refused).
        doc_max_length: ``None`` (default, LLM2CLIP's behaviour: captions are only truncated at ``max_length``)
            or a positive token count. When set, a caption whose own token count (counted alone, without
            special tokens, instruction or template, truncated at ``max_length``) exceeds it is first cut to
            fewer words, ``int(len(words) * doc_max_length / count)``, until it fits, as upstream llm2vec's
            ``LLM2Vec(doc_max_length=400)`` does. LLM2CLIP passes ``doc_max_length=512 = max_length``, where the
            rule never triggers, which is what ``None`` reproduces.
        eos_text: under ``eos_token`` pooling, the text appended to every input (after the template), pooled as
            the last token(s). ``None``: llm2vec's choice for the LLM (:func:`llm2vec_eos_text`: the text
            ``" </s>"`` for Llama and Mistral configs, ...); ``from_llm`` stores it resolved.
        append_eos_token_id: under ``eos_token`` pooling, append the tokenizer's eos token id (after truncating to
            ``max_length - 1``) instead of ``eos_text``: what encoders saved before ``eos_text`` existed did; set
            by the migration of their configs (:func:`migrate_text_config_dict`), not meant for new encoders.
        pooled_tokens: which tokens are pooled: ``"caption_tail"`` (default: llm2vec's rule, the caption and template
            suffix, instruction excluded), or as sentence-transformers pools: ``"all"`` (every token the attention
            mask covers, special tokens and prompt included) or ``"all_but_prompt"`` (its ``include_prompt: false``).
            The latter two tokenize as sentence-transformers does: ``prompt + text``, no template.
        normalize_embeddings: L2-normalise the pooled embeddings (sentence-transformers' ``Normalize`` module).
        padding_side: ``"left"`` (default, llm2vec's) or ``"right"`` (encoders with absolute positions, BERT).
        prompts: named prompts (sentence-transformers' ``prompts``), for ``encode(..., prompt_name=...)``.
        default_prompt_name: the prompt used where no instruction is given (``None``: none).
        config_version: :data:`CONFIG_VERSION` for new configs; older saved ones are migrated on loading.
    """

    model_type = "llm2clip_text"
    base_config_key = "text_config"
    sub_configs = {"llm_config": AutoConfig}

    def __init__(
        self,
        llm_config: PretrainedConfig | dict | None = None,
        pooling_mode: str = "mean",
        text_template: str | None = None,
        max_length: int = 512,
        bidirectional: bool = True,
        doc_max_length: int | None = None,
        eos_text: str | None = None,
        append_eos_token_id: bool = False,
        pooled_tokens: str = CAPTION_TAIL,
        normalize_embeddings: bool = False,
        padding_side: str = "left",
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        config_version: int = CONFIG_VERSION,
        **kwargs: Any,
    ) -> None:
        max_length = kwargs.pop("max_seq_length", max_length)
        if isinstance(llm_config, dict):
            llm_config = dict(llm_config)
            model_type = llm_config.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"llm_config has model_type {model_type!r}, which this transformers version does not know; "
                    "pass a transformers decoder config (llama, mistral, qwen2, ...)."
                )
            llm_config = CONFIG_MAPPING[model_type](**llm_config)
        self.llm_config = llm_config
        self.pooling_mode = check_pooling_mode(pooling_mode)
        self.text_template = resolve_text_template(text_template)
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2, got {max_length!r}.")
        self.max_seq_length = max_length
        self.bidirectional = bidirectional
        self.doc_max_length = check_doc_max_length(doc_max_length)
        self.eos_text = eos_text
        self.append_eos_token_id = bool(append_eos_token_id)
        self.pooled_tokens = check_pooled_tokens(pooled_tokens, self.text_template, self.doc_max_length,
                                                 self.pooling_mode)
        self.normalize_embeddings = bool(normalize_embeddings)
        self.padding_side = check_padding_side(padding_side)
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}; add it to prompts or pass None.")
        self.default_prompt_name = default_prompt_name
        self.config_version = config_version
        if llm_config is not None and is_encoder_config(llm_config):
            if not bidirectional:
                raise ValueError(f"A {llm_config.model_type} encoder is bidirectional by construction; "
                                 "bidirectional=False does not apply to it.")
        elif llm_config is not None:
            llm_config.is_causal = not bidirectional
        super().__init__(**kwargs)

    @property
    def default_prompt(self) -> str | None:
        """The text of ``default_prompt_name`` (``None`` when it is not set)."""
        return None if self.default_prompt_name is None else self.prompts[self.default_prompt_name]

    @property
    def appended_eos_text(self) -> str:
        """What tokenization appends to each input: ``eos_text`` (resolved) under ``eos_token`` pooling, else ``""``."""
        if self.pooling_mode != "eos_token" or self.append_eos_token_id:
            return ""
        if self.eos_text is not None:
            return self.eos_text
        llm = self.llm_config
        return llm2vec_eos_text(getattr(llm, "model_type", None), getattr(llm, "_name_or_path", None))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "LLM2CLIPTextConfig":
        """Build a config from its saved dict, migrated to the current :data:`CONFIG_VERSION` first."""
        return super().from_dict(migrate_text_config_dict(config_dict), **kwargs)

    @property
    def hidden_size(self) -> int:
        """Width of the sentence embeddings (the LLM's hidden size)."""
        if self.llm_config is None:
            raise ValueError("LLM2CLIPTextConfig has no llm_config; build it with LLM2CLIPTextModel.from_llm(...).")
        return self.llm_config.hidden_size


LLM2CLIPTextConfig.register_for_auto_class()
