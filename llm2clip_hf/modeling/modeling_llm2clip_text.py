"""LLM2Vec-style text encoder: a transformers decoder with bidirectional attention and caption pooling; also any
sentence-transformers model built of Transformer, Pooling and Normalize modules (encoders such as BERT, and decoder
embedders), with its own tokenization, attention and pooling."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.peft_utils import find_adapter_config_file
from transformers.utils import logging as hf_logging

from .caption_tokenization import TEXT_TEMPLATES, TokenizedText, collate_padded, prepare_tokenizer, tokenize_texts
from .configuration_llm2clip_text import LLM2CLIPTextConfig, is_encoder_config
from .hub_files import optional_file
from .llm2vec_naming import llm2vec_eos_text, llm2vec_model_name, llm2vec_text_template
from .pooling import pool

logger = hf_logging.get_logger(__name__)

# Arguments of from_pretrained that also locate the tokenizer and the config.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "gguf_file")
SENTENCE_TRANSFORMERS_FILE = "sentence_transformers_llm2clip.py"  # sentence-transformers' input module
OWN_SENTENCE_TRANSFORMERS_MODULE = f"{Path(SENTENCE_TRANSFORMERS_FILE).stem}.LLM2CLIPSentenceEncoder"
# Builds a text encoder from PEFT adapters (llm2vec's published encoders): llm2clip_hf.conversion registers it, so the
# remote code itself never imports peft. Called as ADAPTER_LOADER(cls, name_or_path, adapters, settings, kwargs).
ADAPTER_LOADER: Callable[..., Any] | None = None
# Builds a text encoder from a sentence-transformers model (a folder or Hub id with modules.json): registered by
# llm2clip_hf.conversion too. Called as SENTENCE_TRANSFORMERS_LOADER(cls, name_or_path, settings, kwargs).
SENTENCE_TRANSFORMERS_LOADER: Callable[..., Any] | None = None


@dataclass
class LLM2CLIPTextOutput(ModelOutput):
    """Output of :class:`LLM2CLIPTextModel`.

    Args:
        text_embeds: pooled sentence embeddings ``(batch, hidden_size)``.
        last_hidden_state: the LLM's last hidden states ``(batch, seq, hidden_size)``.
        hidden_states: all layers' hidden states when ``output_hidden_states=True``.
    """

    text_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class LLM2CLIPTextModel(PreTrainedModel):
    """A decoder LLM used as a bidirectional sentence encoder (LLM2Vec), as LLM2CLIP's text side.

    Build one around a plain LLM checkpoint with :meth:`from_llm`; reload a saved one with ``from_pretrained``
    (or ``AutoModel.from_pretrained(..., trust_remote_code=True)``). The tokenizer travels with the model
    (``model.tokenizer``), so :meth:`encode` works on raw strings.
    """

    config_class = LLM2CLIPTextConfig
    base_model_prefix = "text_model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: LLM2CLIPTextConfig) -> None:
        super().__init__(config)
        if config.llm_config is None:
            raise ValueError("LLM2CLIPTextConfig has no llm_config; build the model with LLM2CLIPTextModel.from_llm(...).")
        self.llm = AutoModel.from_config(config.llm_config)
        self._no_split_modules = list(getattr(self.llm, "_no_split_modules", None) or [])
        self.tokenizer = None
        self.post_init()

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_llm(
        cls,
        name_or_path: str | os.PathLike,
        pooling_mode: str | None = None,
        text_template: str | None = None,
        max_length: int | None = None,
        bidirectional: bool | None = None,
        doc_max_length: int | None = None,
        eos_text: str | None = None,
        peft_model_name_or_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> "LLM2CLIPTextModel":
        """Wrap a plain LLM checkpoint (a Hub id or a directory, e.g. an official LLM2CLIP ``*-CC-Finetuned``).

        The weights load into transformers' own class for the architecture (``LlamaModel`` for a
        ``LlamaBiModel`` checkpoint); no remote code of the checkpoint runs. ``from_pretrained_kwargs`` go to
        ``AutoModel.from_pretrained`` (``dtype``, ``attn_implementation``, ``gguf_file``, ``revision``, ...).
        ``doc_max_length`` (``None``: LLM2CLIP's behaviour; upstream llm2vec uses 400) cuts long captions to fewer
        words first; ``eos_text`` (``eos_token`` pooling; default: llm2vec's choice for this checkpoint) too.
        Defaults: mean pooling, ``max_length`` 512.

        Text encoders published as PEFT adapters load as llm2vec's ``LLM2Vec.from_pretrained`` loads them (needs
        the llm2clip-hf package, which brings peft): a folder or Hub id holding an adapter (``adapter_config.json``;
        base weights from its ``base_model_name_or_path``), and ``peft_model_name_or_path``, one adapter or a list
        (llm2vec's ``peft_model_name_or_path`` and LLM2CLIP's ``extra_model_name_or_path``), each merged in turn;
        settings then come from ``llm2vec_config.json`` and llm2vec's defaults where not given here. See
        :func:`llm2clip_hf.conversion.llm2vec_adapters.text_model_from_adapters`.

        A sentence-transformers model (a folder or Hub id with ``modules.json``: Transformer, Pooling, Normalize)
        loads with its own pooling, normalisation, prompts, padding side, attention and max length, so that
        :meth:`encode` equals its ``SentenceTransformer.encode`` (needs the llm2clip-hf package; see
        :mod:`llm2clip_hf.conversion.sentence_transformer_models`). A plain encoder (BERT, ...) without
        sentence-transformers files is refused: nothing says how it pools.
        """
        hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
        settings = dict(pooling_mode=pooling_mode, text_template=text_template, max_length=max_length,
                        bidirectional=bidirectional, doc_max_length=doc_max_length, eos_text=eos_text)
        adapters = [] if peft_model_name_or_path is None else [peft_model_name_or_path] \
            if isinstance(peft_model_name_or_path, (str, os.PathLike)) else list(peft_model_name_or_path)
        adapter_kwargs = {k: v for k, v in hub_kwargs.items() if k != "gguf_file"}
        if "gguf_file" not in hub_kwargs and is_sentence_transformers_model(name_or_path, adapter_kwargs):
            if SENTENCE_TRANSFORMERS_LOADER is None:
                raise ImportError(f"{name_or_path} is a sentence-transformers model; loading one needs the "
                                  "llm2clip-hf package (pip install llm2clip-hf).")
            if adapters:
                raise ValueError(f"{name_or_path} is a sentence-transformers model; peft_model_name_or_path applies "
                                 "to plain LLMs and llm2vec adapters only.")
            return SENTENCE_TRANSFORMERS_LOADER(cls, name_or_path, settings, from_pretrained_kwargs)
        if adapters or ("gguf_file" not in hub_kwargs
                        and find_adapter_config_file(str(name_or_path), **adapter_kwargs) is not None):
            if ADAPTER_LOADER is None:
                raise ImportError(f"{name_or_path} (or peft_model_name_or_path) is a PEFT adapter; loading adapters "
                                  "needs the llm2clip-hf package (pip install llm2clip-hf), which brings peft.")
            return ADAPTER_LOADER(cls, name_or_path, adapters, settings, from_pretrained_kwargs)
        llm_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
        if getattr(llm_config, "model_type", None) == cls.config_class.model_type:
            raise ValueError(
                f"{name_or_path} is a saved LLM2CLIPTextModel, not a plain LLM; load it with "
                "LLM2CLIPTextModel.from_pretrained(...) instead of from_llm(...)."
            )
        if is_encoder_config(llm_config):
            raise ValueError(
                f"{name_or_path} is a {llm_config.model_type} encoder, not a decoder LLM: LLM2Vec's form (caption-tail "
                "pooling, left padding) does not fit it, and nothing in it says how it pools. Load it from a "
                "sentence-transformers folder or Hub id (with modules.json, e.g. sentence-transformers/"
                "all-MiniLM-L6-v2), which says so."
            )
        llm_config.is_causal = bidirectional is False
        llm = AutoModel.from_pretrained(name_or_path, config=llm_config, trust_remote_code=False,
                                        **from_pretrained_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        return cls.wrap_llm(llm, tokenizer, name_or_path, hub_kwargs=adapter_kwargs,
                            **{k: v for k, v in settings.items() if v is not None})

    @classmethod
    def wrap_llm(cls, llm: PreTrainedModel, tokenizer: Any, name_or_path: str | os.PathLike,
                 hub_kwargs: dict[str, Any] | None = None, **settings: Any) -> "LLM2CLIPTextModel":
        """A text encoder around a loaded transformers base model (``AutoModel``) and its tokenizer. ``settings`` are
        :class:`LLM2CLIPTextConfig`'s (pooling, template, length, ...); ``name_or_path`` names the source.

        Where ``text_template`` is not given (``"none"``: no wrapper), the chat wrapper is chosen as llm2vec chooses
        it, by the name llm2vec sees for ``name_or_path`` (a folder's ``config.json`` name, an adapter's base, the
        Hub id; LLM2CLIP's published encoders get their official usage's): see :mod:`.llm2vec_naming`. The same
        name chooses ``eos_text`` under ``eos_token`` pooling. The choice is logged and stored in the config."""
        settings["bidirectional"] = settings.get("bidirectional") is not False
        if not is_encoder_config(llm.config):  # an encoder is bidirectional by construction
            llm.config.is_causal = not settings["bidirectional"]
        name, source = llm2vec_model_name(name_or_path, **(hub_kwargs or {}))
        if settings.get("text_template") is None:
            settings["text_template"] = llm2vec_text_template(name)
            if settings["text_template"]:  # shown by default: the wrapper changes every embedding
                logger.warning(f"Text encoder from {name_or_path}: captions wrapped in the {settings['text_template']} "
                               f"chat template, llm2vec's choice for the name {name!r} (from {source}); pass "
                               "text_template to choose another, or 'none'.")
            else:
                logger.info(f"Text encoder from {name_or_path}: no chat wrapper (llm2vec has none for the name "
                            f"{name!r}, from {source}); pass text_template (one of {sorted(TEXT_TEMPLATES)}) to wrap.")
        if settings.get("pooling_mode") == "eos_token" and settings.get("eos_text") is None:
            settings["eos_text"] = llm2vec_eos_text(llm.config.model_type, name)
        config = cls.config_class(llm_config=llm.config, **settings)
        config.llm_config = llm.config
        config.name_or_path = str(name_or_path)
        with torch.device("meta"):
            model = cls(config)
        model.llm = llm
        model.tokenizer = prepare_tokenizer(tokenizer, config.padding_side)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that also loads the tokenizer saved beside the weights."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if pretrained_model_name_or_path is not None:
            model.tokenizer = load_tokenizer_if_saved(pretrained_model_name_or_path, kwargs, model.config)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save weights, config, remote code, the tokenizer, and the files with which sentence-transformers loads
        the folder (``modules.json`` and its input module, see ``sentence_transformers_llm2clip.py``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        else:
            logger.warning(f"Saved a text encoder without a tokenizer to {save_directory}: encode() on the folder needs "
                           "one. Set model.tokenizer = AutoTokenizer.from_pretrained(<the LLM>) and save again.")
        module_file = Path(__file__).with_name(SENTENCE_TRANSFORMERS_FILE)
        if module_file.is_file():  # absent only in a copy of the remote code made without it
            shutil.copyfile(module_file, Path(save_directory) / SENTENCE_TRANSFORMERS_FILE)
            modules = [{"idx": 0, "name": "0", "path": "", "type": OWN_SENTENCE_TRANSFORMERS_MODULE}]
            (Path(save_directory) / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
            if self.config.prompts:  # sentence-transformers' prompt_name=... and default prompt
                prompts = {"prompts": self.config.prompts, "default_prompt_name": self.config.default_prompt_name}
                (Path(save_directory) / "config_sentence_transformers.json").write_text(
                    json.dumps(prompts, indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------- compute
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        pooling_mask: torch.LongTensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> LLM2CLIPTextOutput | tuple:
        """Sentence embeddings of tokenized inputs.

        ``pooling_mask`` marks the tokens to pool; :meth:`tokenize` and ``LLM2CLIPProcessor`` produce it. Without
        it, the inputs are taken as plain tokenizer output (a pipeline's): they are decoded and tokenized again
        with this model's template, so the result equals :meth:`encode` of the same text.
        """
        if pooling_mask is None:
            batch = self.retokenize(input_ids, attention_mask)
            input_ids, attention_mask, pooling_mask = batch["input_ids"], batch["attention_mask"], batch["pooling_mask"]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.llm(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states,
            return_dict=True, use_cache=False,
        )
        embeds = pool(outputs.last_hidden_state, pooling_mask, self.config.pooling_mode)
        if self.config.normalize_embeddings:
            embeds = torch.nn.functional.normalize(embeds, p=2, dim=-1)
        result = LLM2CLIPTextOutput(
            text_embeds=embeds, last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )
        return result if return_dict else result.to_tuple()

    def tokenize(
        self,
        texts: Sequence[str],
        instruction: str | Sequence[str | None] | None = None,
        instruction_separator: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs (``input_ids``, ``attention_mask``, ``pooling_mask``) for captions, padded as the model
        expects (:meth:`collate`)."""
        return self.collate(self.tokenize_items(texts, instruction, instruction_separator), self.device)

    def collate(self, items: Sequence[TokenizedText], device: torch.device | str | None = None,
                width: int | None = None) -> dict[str, torch.Tensor]:
        """Pad tokenized texts into a batch on this model's ``padding_side`` (left, llm2vec's, unless configured)."""
        return collate_padded(items, self.require_tokenizer().pad_token_id, device, width, self.config.padding_side)

    def tokenize_items(
        self,
        texts: Sequence[str],
        instruction: str | Sequence[str | None] | None = None,
        instruction_separator: str | None = None,
        caption_spans: bool = False,
    ) -> list[TokenizedText]:
        """Per-text token ids and pooled-token counts under this model's template, length and pooling mode.

        A ``None`` instruction is the config's default prompt (``default_prompt_name``), if any; ``""`` is none.
        ``instruction_separator`` ``None`` is the model's own (see :func:`.caption_tokenization.tokenize_texts`).
        Inputs longer than ``max_seq_length`` tokens are truncated; their items say so (``truncated``).
        ``caption_spans`` also locates each caption's own tokens (``TokenizedText.caption_span``).
        """
        default = self.config.default_prompt
        if default is not None:
            instruction = default if instruction is None else instruction if isinstance(instruction, str) else \
                [default if one is None else one for one in instruction]
        items = tokenize_texts(
            self.require_tokenizer(), texts, instruction, text_template=self.config.text_template,
            max_length=self.config.max_seq_length, instruction_separator=instruction_separator,
            eos_text=self.config.appended_eos_text, append_eos_token_id=self.config.append_eos_token_id,
            doc_max_length=self.config.doc_max_length, caption_spans=caption_spans,
            pooled_tokens=self.config.pooled_tokens,
        )
        return items

    def warn_truncation(self, truncated: int, total: int) -> None:
        """Log one warning saying how many of ``total`` captions were cut to ``max_seq_length`` tokens."""
        if truncated:
            logger.warning(
                f"{truncated} of {total} captions are longer than max_length={self.config.max_seq_length} tokens and "
                "were truncated. Raise max_length when building the text model if their ends matter."
            )

    @torch.no_grad()
    def encode(
        self,
        texts: str | Sequence[str],
        instruction: str | Sequence[str | None] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        prompt_name: str | None = None,
    ) -> torch.FloatTensor:
        """Embed captions: float32 CPU tensor ``(len(texts), hidden_size)`` in input order.

        Equals llm2vec's ``LLM2Vec.encode`` with the same weights and settings (``instruction`` goes where
        llm2vec takes ``[instruction, text]`` pairs); for an encoder loaded from a sentence-transformers model, its
        ``SentenceTransformer.encode`` (``instruction`` is its ``prompt``, ``prompt_name`` names one of the config's
        ``prompts``; neither: its default prompt, if any). Texts are sorted by token length so that each batch pads
        little; ``show_progress_bar=None`` follows transformers' progress-bar setting.
        """
        if isinstance(texts, str):
            texts = [texts]
        if prompt_name is not None:
            if instruction is not None:
                raise ValueError("Pass instruction or prompt_name, not both.")
            if prompt_name not in self.config.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                                 f"{sorted(self.config.prompts)}.")
            instruction = self.config.prompts[prompt_name]
        items = self.tokenize_items(texts, instruction)
        self.warn_truncation(sum(item.truncated for item in items), len(items))
        if show_progress_bar is None:
            show_progress_bar = hf_logging.is_progress_bar_enabled() and len(items) > batch_size
        with hf_logging.tqdm(total=len(items), desc="Encoding", unit="texts", disable=not show_progress_bar) as bar:
            return self.embed_items(items, batch_size, progress=bar.update)

    @torch.no_grad()
    def embed_items(
        self,
        items: Sequence[TokenizedText],
        batch_size: int = 32,
        progress: Callable[[int], Any] | None = None,
    ) -> torch.FloatTensor:
        """Embeddings of tokenized texts (:meth:`tokenize_items`): float32 CPU tensor in input order.

        Items are sorted by length so that each batch pads little; ``progress`` is called with the size of each
        finished batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        was_training = self.training
        self.eval()
        embeddings = torch.empty((len(items), self.config.hidden_size), dtype=torch.float32)
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = self.collate([items[i] for i in rows], self.device)
                embeddings[rows] = self(**batch).text_embeds.float().cpu()
                if progress is not None:
                    progress(len(rows))
        finally:
            self.train(was_training)
        return embeddings

    def retokenize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Decode plain tokenizer output and tokenize it again with this model's template and pooling rule."""
        tokenizer = self.require_tokenizer()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenize(texts)

    def require_tokenizer(self):
        """The attached tokenizer, or a ``ValueError`` that says how to attach one."""
        if self.tokenizer is None:
            raise ValueError(
                "This LLM2CLIPTextModel has no tokenizer. Load it with from_llm(...) or from a directory that holds "
                "tokenizer files, or set model.tokenizer = AutoTokenizer.from_pretrained(...)."
            )
        return prepare_tokenizer(self.tokenizer, self.config.padding_side)


def is_sentence_transformers_model(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> bool:
    """Whether ``name_or_path`` holds a sentence-transformers model (``modules.json``) other than a saved
    LLM2CLIPTextModel (whose ``modules.json`` names this package's own input module)."""
    found = optional_file(name_or_path, "modules.json", **hub_kwargs)
    if found is None:
        return False
    with open(found, encoding="utf-8") as handle:
        modules = json.load(handle)
    return not any(module.get("type") == OWN_SENTENCE_TRANSFORMERS_MODULE for module in modules)


def load_tokenizer_if_saved(name_or_path: str | os.PathLike, from_pretrained_kwargs: dict[str, Any], text_config):
    """The tokenizer stored with a checkpoint (padded on the text config's side, pad token set), or ``None`` if it
    has none. ``text_config.llm_config`` tells AutoTokenizer the LLM's architecture, which the checkpoint's own
    config does not."""
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs and k != "gguf_file"}
    if optional_file(name_or_path, "tokenizer_config.json", **hub_kwargs) is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, config=text_config.llm_config, trust_remote_code=False,
                                              **hub_kwargs)
    return prepare_tokenizer(tokenizer, text_config.padding_side)


LLM2CLIPTextModel.register_for_auto_class("AutoModel")
