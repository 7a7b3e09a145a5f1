"""Stage "mntp": llm2vec's masked next-token prediction, which adapts a causal LLM to bidirectional attention
before caption contrastive training. This file holds its data (one text per caption cell) and its collator."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling

from .captions import flatten_captions
from .loading import ROW_INDEX, require_columns
from ..modeling import LLM2CLIPTextModel
from ..modeling.caption_tokenization import TokenizedText, collate_left_padded
from .data_statistics import BATCH_STATISTICS, batch_statistics

TEXT, LABELS = "text", "labels"


def build_mntp_texts(dataset: Dataset, text_columns: Sequence[str]) -> Dataset:
    """One row per text of the given columns (a cell may hold one string or a list), each with the ``ROW_INDEX``
    of the row it came from. Bad cells are expected to be dropped before (``drop_bad_caption_rows``)."""
    require_columns(dataset, text_columns, "MNTP training")
    if ROW_INDEX not in dataset.column_names:
        raise ValueError(f"build_mntp_texts needs a {ROW_INDEX!r} column (data.with_row_index).")

    def flatten(batch: dict[str, list]) -> dict[str, list]:
        texts: list[str] = []
        rows: list[int] = []
        for column in text_columns:
            column_texts, owners = flatten_captions(batch[column], column)
            texts += column_texts
            rows += [batch[ROW_INDEX][i] for i in owners]
        return {TEXT: texts, ROW_INDEX: rows}

    return dataset.map(flatten, batched=True, remove_columns=dataset.column_names, desc="Collecting MNTP texts")


def scorable_caption_tokens(items: Sequence[TokenizedText], attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, width]`` bool, True at the caption's own tokens (not template, instruction, special or padding) of
    a left-padded batch whose previous position holds a real token: MNTP predicts the token at ``i`` from the output
    at ``i - 1``, so a row's first token (no BOS) has nothing real to be predicted from."""
    width = attention_mask.shape[1]
    caption = torch.zeros(attention_mask.shape, dtype=torch.bool)
    for row, item in enumerate(items):
        start, end = item.caption_span
        offset = width - len(item.input_ids)
        caption[row, offset + start:offset + end] = True
    previous_is_real = torch.zeros_like(caption)
    previous_is_real[:, 1:] = attention_mask[:, :-1].bool()
    return caption & previous_is_real


class MaskedTextCollator:
    """Tokenizes texts with the encoder's template and length, left-padded, and masks them as llm2vec's MNTP does:
    a ``mlm_probability`` share of the caption's own tokens (``scorable_caption_tokens``: never template, special or
    padding tokens, nor a token right after padding) is chosen by transformers' ``DataCollatorForLanguageModeling``
    (80 % replaced by the mask token, 10 % by a random token, 10 % kept) and becomes a label; every other label is
    -100. A tokenizer without a mask token uses ``mask_token`` (llm2vec's "blank" choice, ``_``)."""

    def __init__(self, text_model: LLM2CLIPTextModel, mlm_probability: float = 0.2, mask_token: str = "_") -> None:
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}.")
        self.text_model = text_model
        tokenizer = text_model.require_tokenizer()
        if tokenizer.mask_token is None:
            tokenizer = copy.deepcopy(tokenizer)  # the encoder's own tokenizer (saved with it) stays unchanged
            token_id = tokenizer.convert_tokens_to_ids(mask_token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"mask_token {mask_token!r} is not one token of this tokenizer's vocabulary; pass "
                                 "one that is (llm2vec uses '_').")
            tokenizer.mask_token = mask_token
        self.mask_token_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        items = self.text_model.tokenize_items([row[TEXT] for row in rows], caption_spans=True)
        batch = collate_left_padded(items, self.text_model.require_tokenizer().pad_token_id)
        scorable = scorable_caption_tokens(items, batch["attention_mask"])
        input_ids, labels = self.masker.torch_mask_tokens(batch["input_ids"].clone(), special_tokens_mask=~scorable)
        collated: dict[str, Any] = {**batch, "input_ids": input_ids, LABELS: labels}
        if ROW_INDEX in rows[0]:
            collated[ROW_INDEX] = torch.tensor([int(row[ROW_INDEX]) for row in rows])
        collated[BATCH_STATISTICS] = batch_statistics(truncated_captions=sum(item.truncated for item in items))
        return collated
