"""Configuration of the LLM2Vec-style text encoder: a decoder LLM made bidirectional, plus pooling settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .caption_tokenization import check_doc_max_length, resolve_text_template
from .pooling import check_pooling_mode


class LLM2CLIPTextConfig(PretrainedConfig):
    """Configuration of :class:`LLM2CLIPTextModel`.

    Args:
        llm_config: configuration of the wrapped transformers decoder (Llama, Mistral, Qwen2, ...), as a config
            object or its dict.
        pooling_mode: ``"mean"`` (official), ``"weighted_mean"``, ``"eos_token"`` or ``"last_token"``.
        text_template: ``None``, a string holding ``{text}`` once (e.g. a chat wrapper), or a preset name from
            ``TEXT_TEMPLATES``. Stored as the resolved string.
        max_length: token budget per text, special tokens and template included (stored as ``max_seq_length``,
            since ``max_length`` is a generation setting in transformers configs).
        bidirectional: drop the causal mask (``llm_config.is_causal = False``), as LLM2Vec does.
        doc_max_length: ``None`` (default, LLM2CLIP's behaviour: captions are only truncated at ``max_length``)
            or a positive token count. When set, a caption whose own token count (counted alone, without
            special tokens, instruction or template, truncated at ``max_length``) exceeds it is first cut to
            fewer words, ``int(len(words) * doc_max_length / count)``, until it fits, as upstream llm2vec's
            ``LLM2Vec(doc_max_length=400)`` does. LLM2CLIP passes ``doc_max_length=512 = max_length``, where the
            rule never triggers, which is what ``None`` reproduces.
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
        if llm_config is not None:
            llm_config.is_causal = not bidirectional
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        """Width of the sentence embeddings (the LLM's hidden size)."""
        if self.llm_config is None:
            raise ValueError("LLM2CLIPTextConfig has no llm_config; build it with LLM2CLIPTextModel.from_llm(...).")
        return self.llm_config.hidden_size


LLM2CLIPTextConfig.register_for_auto_class()
