"""Load the models the CLI and the demo name: a plain LLM or a saved text encoder, and saved LLM2CLIP models.

Loading errors say how to provide the model, and with ``HF_HUB_OFFLINE=1`` nothing tries the network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig
from transformers.utils.peft_utils import find_adapter_config_file

from .assets import MINILM_HUB_ID, SMOLLM2_HUB_ID, all_minilm_l6_v2, smollm2_gguf
from ..modeling import LLM2CLIPConfig, LLM2CLIPModel, LLM2CLIPTextConfig, LLM2CLIPTextModel
from ..modeling.caption_tokenization import resolve_text_template
from ..modeling.modeling_llm2clip_text import is_sentence_transformers_model

DEFAULT_TEXT_MODEL = "smollm2"  # SmolLM2-135M-Instruct: the offline GGUF asset if installed, else the Hub id


def hub_is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network calls in this process."""
    return bool(hub_constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _missing_model_error(name: str, what: str, error: Exception) -> ValueError | FileNotFoundError:
    """The user's error for a model that cannot be loaded: a folder that is not such a model (``ValueError``), or
    a name that is neither a folder nor reachable on the Hub (``FileNotFoundError``, saying how to provide it)."""
    if Path(name).expanduser().exists():
        return ValueError(f"{name} exists but is not a loadable {what}: {error}")
    where = ("HF_HUB_OFFLINE=1 is set, so only local folders and models already in the Hugging Face cache can be "
             "used: download it where the Hub is reachable (huggingface-cli download " f"{name}) or pass a local "
             "folder.") if hub_is_offline() else "Check the Hub id, your network and token, or pass a local folder."
    return FileNotFoundError(f"Cannot load the {what} {name!r}: it is not a local folder, and {where} (cause: {error})")


def load_text_model(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    pooling_mode: str | None = None,
    text_template: str | None = None,
    max_length: int | None = None,
    peft_model_name_or_path: str | Sequence[str] | None = None,
    **from_pretrained_kwargs: Any,
) -> LLM2CLIPTextModel:
    """A text encoder from a saved :class:`LLM2CLIPTextModel`, from a plain LLM (made bidirectional), from an
    LLM published as PEFT adapters (llm2vec's encoders: an adapter folder, ``peft_model_name_or_path`` adapters
    merged on top), or from a sentence-transformers model (its own pooling, prompts and attention); see
    :meth:`LLM2CLIPTextModel.from_llm`.

    ``None`` / ``"smollm2"`` selects SmolLM2-135M-Instruct (the offline GGUF asset when installed);
    ``sentence-transformers/all-MiniLM-L6-v2`` is the offline asset's folder when installed. The pooling,
    template and length options apply when wrapping a plain LLM; a saved text encoder keeps its own, and giving a
    different value is an error rather than a silent change of its embeddings.

    Example:
        ```python
        from llm2clip_hf import load_text_model

        text_model = load_text_model(
            "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
            peft_model_name_or_path="McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised")
        saved = load_text_model("my-text-encoder")  # a saved encoder keeps its own settings
        ```
    """
    if name_or_path in (None, DEFAULT_TEXT_MODEL):
        try:
            directory, default_gguf = smollm2_gguf()
            name_or_path, gguf_file = str(directory), gguf_file or default_gguf
        except FileNotFoundError:
            if hub_is_offline():
                raise
            name_or_path = SMOLLM2_HUB_ID
    if name_or_path == MINILM_HUB_ID and from_pretrained_kwargs.get("revision") in (None, "main"):
        try:
            name_or_path = str(all_minilm_l6_v2())
        except FileNotFoundError:
            if hub_is_offline():
                raise
    if gguf_file is not None:
        from_pretrained_kwargs["gguf_file"] = gguf_file
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("gguf_file", "revision", "token")}
    wrap = dict(pooling_mode=pooling_mode, text_template=text_template, max_length=max_length,
                peft_model_name_or_path=peft_model_name_or_path)
    try:
        not_plain = gguf_file is None and (find_adapter_config_file(str(name_or_path), **hub_kwargs) is not None
                                           or is_sentence_transformers_model(name_or_path, hub_kwargs))
        config = None if not_plain else AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    except (OSError, ValueError) as error:
        raise _missing_model_error(str(name_or_path), "text model", error) from error
    if not_plain:  # PEFT adapters or a sentence-transformers model
        return LLM2CLIPTextModel.from_llm(name_or_path, **wrap, **from_pretrained_kwargs)
    if isinstance(config, LLM2CLIPTextConfig):
        requested = {"pooling_mode": pooling_mode, "text_template": resolve_text_template(text_template),
                     "max_seq_length": max_length}  # a preset name is compared as the template it stands for
        if peft_model_name_or_path:
            raise ValueError(f"{name_or_path} is a saved LLM2CLIP text encoder, whose adapters (if any) are merged; "
                             "PEFT adapters go on top of a plain LLM or of an llm2vec adapter folder.")
        conflicts = {k: (v, getattr(config, k)) for k, v in requested.items() if v is not None and v != getattr(config, k)}
        if conflicts:
            details = ", ".join(f"{k}={v[0]!r} (saved: {v[1]!r})" for k, v in conflicts.items())
            raise ValueError(
                f"{name_or_path} is a saved LLM2CLIP text encoder trained with its own settings; {details} would "
                "change its embeddings. Drop these options, or wrap the base LLM instead."
            )
        return LLM2CLIPTextModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
    if isinstance(config, LLM2CLIPConfig):
        raise ValueError(f"{name_or_path} is a full LLM2CLIP model; pass it as --model, and its text model (if "
                         "any) as --text-model.")
    return LLM2CLIPTextModel.from_llm(name_or_path, **wrap, **from_pretrained_kwargs)


def load_clip_model(name_or_path: str, **from_pretrained_kwargs: Any) -> LLM2CLIPModel:
    """A saved :class:`LLM2CLIPModel` (a folder or Hub id written by ``save_pretrained`` or ``llm2clip-hf convert``).

    Example:
        ```python
        from llm2clip_hf.conversion import load_clip_model

        model = load_clip_model("my-llm2clip", dtype="bfloat16")
        ```
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise _missing_model_error(name_or_path, "LLM2CLIP model", error) from error
    if not isinstance(config, LLM2CLIPConfig):
        raise ValueError(
            f"{name_or_path} holds a {type(config).__name__}, not an LLM2CLIP model. Convert official checkpoints "
            "with `llm2clip-hf convert`, or train one with `llm2clip-hf train --stage clip`."
        )
    return LLM2CLIPModel.from_pretrained(name_or_path, **from_pretrained_kwargs)


def _no_lm_head_error(name_or_path: str, tied: bool) -> ValueError:
    """Why a checkpoint gives no separate next-token head: tied to the input embeddings, or absent."""
    if tied:
        return ValueError(f"{name_or_path} has no separate lm_head (its output layer is its input embeddings); "
                          "stage 'mntp' uses those without load_lm_head.")
    return ValueError(f"{name_or_path} holds no lm_head weights (a base model saved without its next-token head), "
                      "and its config does not tie them to the input embeddings: the head would be random. Give "
                      "the causal LM's checkpoint (with lm_head.weight), or an lm_head of your own to the trainer.")


def load_lm_head(name_or_path: str | None = None, **from_pretrained_kwargs: Any) -> torch.nn.Linear:
    """The next-token output layer (``lm_head``) of a causal LLM checkpoint, for ``stage="mntp"`` with an LLM that
    does not tie it to its input embeddings. From safetensors only that tensor is read (an 8B model's other 15 GB
    stay on disk); a GGUF or ``.bin`` checkpoint is loaded with ``AutoModelForCausalLM`` to take it."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from ..modeling.hub_files import optional_file

    if name_or_path in (None, DEFAULT_TEXT_MODEL):
        directory, gguf_file = smollm2_gguf()
        name_or_path = str(directory)
        from_pretrained_kwargs.setdefault("gguf_file", gguf_file)
    dtype = from_pretrained_kwargs.get("dtype", torch.float32)
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("revision", "token")}
    if "gguf_file" not in from_pretrained_kwargs:
        index = optional_file(name_or_path, "model.safetensors.index.json", **hub_kwargs)
        shard = json.loads(Path(index).read_text())["weight_map"].get("lm_head.weight") if index else \
            "model.safetensors"
        path = optional_file(name_or_path, shard, **hub_kwargs) if shard else None
        if path is not None:
            with safe_open(path, framework="pt") as weights:
                if "lm_head.weight" in weights.keys():
                    weight = weights.get_tensor("lm_head.weight").to(dtype)
                    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
                    head.weight = torch.nn.Parameter(weight, requires_grad=False)
                    return head
        if index or path is not None:  # safetensors without the head: its config tells why, no weights loaded
            tied = getattr(AutoConfig.from_pretrained(name_or_path, **hub_kwargs), "tie_word_embeddings", False)
            raise _no_lm_head_error(name_or_path, tied)
    causal_lm, loading = AutoModelForCausalLM.from_pretrained(name_or_path, output_loading_info=True,
                                                              **from_pretrained_kwargs)
    head = causal_lm.get_output_embeddings()
    tied = head is None or getattr(causal_lm.config, "tie_word_embeddings", False)
    if tied or any(key.endswith("lm_head.weight") for key in loading.get("missing_keys", ())):
        raise _no_lm_head_error(name_or_path, tied)
    return head.requires_grad_(False)
