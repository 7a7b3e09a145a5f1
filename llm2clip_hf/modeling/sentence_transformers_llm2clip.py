"""A sentence-transformers (v6) input module for a saved :class:`LLM2CLIPTextModel`.

``LLM2CLIPTextModel.save_pretrained`` writes this file and a ``modules.json`` naming it beside the weights, so that
``SentenceTransformer(folder, trust_remote_code=True)`` loads the encoder: ``encode(texts)`` equals the model's
own ``encode``, and ``encode(texts, prompt=instruction)`` equals ``encode(texts, instruction=instruction)`` (for an
LLM2Vec-style encoder the instruction is attended to and excluded from pooling; an encoder loaded from a
sentence-transformers model keeps that model's prompts and pooling, and its folder saves the prompts in
``config_sentence_transformers.json``), so sentence-transformers' evaluators and MTEB run on it.
Only sentence-transformers imports this file (the model itself needs torch and transformers alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers.base.modules.input_module import InputModule

from .modeling_llm2clip_text import LLM2CLIPTextModel


class LLM2CLIPSentenceEncoder(InputModule):
    """Tokenizes with the encoder's template, padding side and pooling rule; returns its pooled embeddings."""

    config_keys: list[str] = []
    save_in_root = True

    def __init__(self, text_model: LLM2CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_model
        self.tokenizer = text_model.require_tokenizer()

    @property
    def modalities(self) -> list[str]:
        return ["text"]

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        texts = list(inputs)
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("LLM2CLIPSentenceEncoder embeds texts (str); pairs and other modalities are not supported.")
        return self.text_model.collate(self.text_model.tokenize_items(texts, prompt))

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        outputs = self.text_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                                  pooling_mask=features["pooling_mask"])
        features.update(token_embeddings=outputs.last_hidden_state, sentence_embedding=outputs.text_embeds)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.text_model.config.hidden_size

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.text_model.save_pretrained(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> "LLM2CLIPSentenceEncoder":
        hub = {"token": token, "cache_dir": cache_folder, "revision": revision, "local_files_only": local_files_only}
        if subfolder:
            hub["subfolder"] = subfolder
        return cls(LLM2CLIPTextModel.from_pretrained(model_name_or_path, **hub, **(model_kwargs or {})))
