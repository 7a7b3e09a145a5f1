"""Which chat wrapper and end-of-sequence text a text encoder gets, chosen by name as llm2vec 0.2.3 chooses them.

llm2vec's ``LLM2Vec.prepare_for_tokenization`` tests ``model.config._name_or_path`` against a table of Hub ids.
``LLM2Vec.from_pretrained`` sets that name from a local folder's ``config.json`` (the published ``-mntp`` folders
carry their base's Hub id there), and transformers' adapter integration sets it to an adapter repo's
``base_model_name_or_path``; a plain Hub id is its own name. :func:`llm2vec_model_name` reproduces this, so a
downloaded copy gets the wrapper its Hub id gets.

LLM2CLIP's own published text encoders are not in llm2vec's table; their official usage gives llm2vec the name
``meta-llama/Meta-Llama-3-8B-Instruct`` (mteb's LLM2CLIP loader: "Workaround for LLM2VEC"; the official
``LLM2VecWrapper`` hard-codes the same Llama-3 wrapper), which :data:`LLM2CLIP_NAMES` reproduces.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .hub_files import optional_file

# llm2vec 0.2.3's table: the name it sees -> the preset of caption_tokenization.TEXT_TEMPLATES it wraps texts in.
LLM2VEC_WRAPPERS: dict[str, str] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-instruct",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral-instruct",
    "meta-llama/Llama-2-7b-chat-hf": "mistral-instruct",
    "google/gemma-2-9b-it": "gemma-2-instruct",
    "Qwen/Qwen2-1.5B-Instruct": "qwen2-instruct",
    "Qwen/Qwen2-7B-Instruct": "qwen2-instruct",
}
# LLM2CLIP's published text encoders (repository name) -> the name their official usage gives llm2vec.
LLM2CLIP_NAMES: dict[str, str] = {
    "LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned": "meta-llama/Meta-Llama-3-8B-Instruct",
    "LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned": "meta-llama/Meta-Llama-3-8B-Instruct",
}
# eos_token pooling: what llm2vec appends, by config class (its isinstance tests) after the one name it tests.
_EOS_BY_MODEL_TYPE = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}


def llm2vec_eos_text(model_type: str | None, name: str | None) -> str:
    """The text llm2vec's ``prepare_for_tokenization`` appends to each stripped input under ``eos_token`` pooling:
    ``"<|end_of_text|>"`` for ``meta-llama/Meta-Llama-3-8B``, nothing for ``meta-llama/Meta-Llama-3-8B-Instruct``
    (its wrapper returns first), else by config: the *text* ``" </s>"`` for Llama and Mistral, ``"<eos>"`` for
    Gemma, ``"<|endoftext|>"`` for Qwen2, nothing for other architectures (pooling then takes the text's last
    token). ``name`` is the one llm2vec tests (:func:`llm2vec_model_name`)."""
    if name == "meta-llama/Meta-Llama-3-8B":
        return "<|end_of_text|>"
    if name == "meta-llama/Meta-Llama-3-8B-Instruct":
        return ""
    return _EOS_BY_MODEL_TYPE.get(model_type or "", "")


def llm2vec_model_name(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> tuple[str, str]:
    """The name llm2vec's wrapper rules test for a model loaded from ``name_or_path``, and where it came from.

    LLM2CLIP's published encoders map to the name their official usage sets (:data:`LLM2CLIP_NAMES`), found by the
    id, the folder's name, a Hub-cache folder ``models--<org>--<name>`` or the ``_name_or_path`` of its config.
    """
    path = str(name_or_path)
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                name, source = json.load(handle).get("_name_or_path", ""), f"{config_file} (_name_or_path)"
        else:
            name, source = path, "the folder's path (it has no config.json)"
    else:
        adapter_config = optional_file(path, "adapter_config.json", **hub_kwargs)
        if adapter_config is not None:
            with open(adapter_config, encoding="utf-8") as handle:
                name = json.load(handle).get("base_model_name_or_path") or path
            source = f"the base_model_name_or_path of {path}'s adapter"
        else:
            name, source = path, "the Hub id"
    for candidate in (path, name):
        published = _published_llm2clip_name(candidate)
        if published is not None:
            llm2vec_name, repo = published
            return llm2vec_name, f"the name the official usage of LLM2CLIP's {repo} gives llm2vec"
    return name, source


def _published_llm2clip_name(path_or_name: str) -> tuple[str, str] | None:
    parts = [part for part in re.split(r"[/\\]", path_or_name.rstrip("/\\")) if part]
    for part in reversed(parts[-4:]):  # the repo name, or a Hub-cache folder above snapshots/<commit>
        repo = part.split("--")[-1] if part.startswith("models--") else part
        if repo in LLM2CLIP_NAMES:
            return LLM2CLIP_NAMES[repo], repo
    return None


def llm2vec_text_template(name: str) -> str | None:
    """The chat wrapper preset llm2vec applies for a model it knows by ``name``, or ``None``."""
    return LLM2VEC_WRAPPERS.get(name)
