"""Turning captions into LLM inputs the way llm2vec's ``encode`` does, plus the mask of the tokens to pool.

For each text the model sees ``template_prefix + instruction + separator + caption + template_suffix``.
Only the caption and the template suffix are pooled: their token count is found by tokenizing that tail on
its own (no special tokens), and the pooled positions are the last that many of the row, which is exactly
llm2vec's rule. Rows are padded on the left, so the pooled tail is always right-aligned.

With ``doc_max_length`` set, a caption longer than that many tokens is first cut to fewer words, as upstream
llm2vec's ``LLM2Vec._convert_to_str`` does (``shorten_to_doc_max_length``).

Encoders loaded from sentence-transformers models tokenize as its ``Transformer`` module does instead
(``pooled_tokens`` ``"all"`` / ``"all_but_prompt"``): ``prompt + text`` (no separator, nothing stripped), padded on
the tokenizer's side, every token pooled, or all but the prompt's (:data:`POOLED_TOKENS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .pooling import LLM2VEC_POOLING_MODES

TEXT_PLACEHOLDER = "{text}"
NO_TEMPLATE = "none"  # an explicit "no chat wrapper", where None means "choose as llm2vec does"
# Which tokens are pooled: llm2vec's caption tail (the default), or as sentence-transformers' Pooling pools: every
# token the attention mask covers (special tokens and prompt included), or all but the prompt ("include_prompt": false).
CAPTION_TAIL, ALL_TOKENS, ALL_BUT_PROMPT = "caption_tail", "all", "all_but_prompt"
POOLED_TOKENS = (CAPTION_TAIL, ALL_TOKENS, ALL_BUT_PROMPT)
PADDING_SIDES = ("left", "right")

# Chat wrappers llm2vec applies by model name; here they are named settings stored in the config.
TEXT_TEMPLATES: dict[str, str] = {
    "llama-3-instruct": "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
    "mistral-instruct": "[INST] {text} [/INST]",
    "qwen2-instruct": "<|im_start|>user\n{text}<|im_end|>",
    "gemma-2-instruct": "<bos><start_of_turn>user\n{text}<end_of_turn>",
    "phi-3.5-instruct": "<|user|>\n{text}<|end|>\n",
}


def resolve_text_template(template: str | None) -> str | None:
    """Return the template string for a preset name or a literal template (``None`` or ``"none"``: no wrapper);
    validate its placeholder."""
    if template is None or template == NO_TEMPLATE:
        return None
    template = TEXT_TEMPLATES.get(template, template)
    if template.count(TEXT_PLACEHOLDER) != 1:
        raise ValueError(
            f"text_template must contain the placeholder {TEXT_PLACEHOLDER!r} exactly once, or be one of the "
            f"presets {sorted(TEXT_TEMPLATES)}; got {template!r}."
        )
    return template


def check_pooled_tokens(pooled_tokens: str, text_template: str | None = None, doc_max_length: int | None = None,
                        pooling_mode: str | None = None) -> str:
    """Return ``pooled_tokens`` if it is one of :data:`POOLED_TOKENS` and the other settings fit it; raise a
    ``ValueError`` naming the setting otherwise. The caption tail takes llm2vec's pooling modes; the
    sentence-transformers ways have no chat wrapper, word cut or appended eos text: those are llm2vec's."""
    if pooled_tokens not in POOLED_TOKENS:
        raise ValueError(f"Unknown pooled_tokens {pooled_tokens!r}; choose one of {list(POOLED_TOKENS)}.")
    if pooled_tokens == CAPTION_TAIL and pooling_mode is not None and pooling_mode not in LLM2VEC_POOLING_MODES:
        raise ValueError(f"Unknown pooling_mode {pooling_mode!r} for the LLM2Vec form (caption-tail pooling); choose "
                         f"one of {list(LLM2VEC_POOLING_MODES)}. {pooling_mode!r} is sentence-transformers' and comes "
                         "with models loaded from it (pooled_tokens 'all' or 'all_but_prompt').")
    if pooled_tokens != CAPTION_TAIL:
        given = {"text_template": text_template, "doc_max_length": doc_max_length,
                 "pooling_mode": pooling_mode if pooling_mode == "eos_token" else None}
        given = {name: value for name, value in given.items() if value is not None}
        if given:
            raise ValueError(f"pooled_tokens={pooled_tokens!r} (sentence-transformers' tokenization) takes no "
                             f"llm2vec setting, got {given}: drop them, or use pooled_tokens={CAPTION_TAIL!r}.")
    return pooled_tokens


def check_padding_side(padding_side: str) -> str:
    """Return ``padding_side`` if it is ``"left"`` or ``"right"``, else raise a ``ValueError``."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {list(PADDING_SIDES)}, got {padding_side!r}.")
    return padding_side


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of one model input, how many of its last tokens are pooled, and (when asked for) the positions
    ``[start, end)`` of the caption's own tokens: no template, instruction or appended eos token."""

    input_ids: list[int]
    num_pooled: int
    truncated: bool = False
    caption_span: tuple[int, int] | None = None


def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    instructions: str | Sequence[str | None] | None = None,
    text_template: str | None = None,
    max_length: int = 512,
    instruction_separator: str | None = None,
    eos_text: str = "",
    doc_max_length: int | None = None,
    caption_spans: bool = False,
    append_eos_token_id: bool = False,
    pooled_tokens: str = CAPTION_TAIL,
) -> list[TokenizedText]:
    """Tokenize captions (with one instruction for all, one per text, or none) exactly as llm2vec's ``encode`` does,
    or as sentence-transformers does (``pooled_tokens``, see :func:`_pooled_counts`).

    ``instruction_separator`` joins the stripped instruction and the caption (``None``: a space, as llm2vec
    ``encode``; the official stage-1 training data uses ``"; "``); under sentence-transformers' tokenization the
    instruction is its prompt, followed by the separator (``None``: nothing) and the text, nothing stripped.
    With a template, the joined text is stripped at both ends
    before wrapping, as llm2vec does. ``eos_text`` (``eos_token`` pooling, see :func:`.llm2vec_naming.llm2vec_eos_text`) is
    appended to the right-stripped input as llm2vec appends it: a part of the pooled tail, truncated with the rest.
    ``doc_max_length`` (``None``: off, LLM2CLIP's behaviour) first cuts each caption to fewer words until it has at
    most that many tokens, as upstream llm2vec does; see :func:`shorten_to_doc_max_length`.
    ``caption_spans`` also finds each caption's own tokens (from the fast tokenizer's character offsets: the tokens
    that overlap the caption's characters). ``append_eos_token_id`` appends the tokenizer's eos token *id* after
    truncating to ``max_length - 1`` instead (encoders saved before ``eos_text`` existed; pooled with the tail).
    """
    eos_id = None
    if append_eos_token_id:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("This encoder appends the tokenizer's eos token under eos_token pooling, but the "
                             "tokenizer has none; set tokenizer.eos_token.")
        if eos_text:
            raise ValueError("Pass eos_text or append_eos_token_id, not both.")
    limit = max_length - 1 if eos_id is not None else max_length
    if caption_spans and not getattr(tokenizer, "is_fast", False):
        raise ValueError("Finding the caption's tokens needs a fast tokenizer (character offsets); load the "
                         "tokenizer with use_fast=True.")
    template = resolve_text_template(text_template)
    check_pooled_tokens(pooled_tokens, template, doc_max_length)
    prefix, suffix = template.split(TEXT_PLACEHOLDER) if template else ("", "")
    if instructions is None or isinstance(instructions, str):
        instructions = [instructions] * len(texts)
    if len(instructions) != len(texts):
        raise ValueError(f"Got {len(instructions)} instructions for {len(texts)} texts; pass one per text or one for all.")
    validate_texts(texts)
    texts = shorten_to_doc_max_length(tokenizer, texts, doc_max_length, max_length)

    full_texts, tails, caption_chars = [], [], []
    for text, instruction in zip(texts, instructions):
        if pooled_tokens != CAPTION_TAIL:  # sentence-transformers: prompt + text
            tails.append(f"{instruction}{instruction_separator or ''}" if instruction else "")
            full_texts.append(tails[-1] + text)
            caption_chars.append((len(tails[-1]), len(full_texts[-1])))
            continue
        head = f"{instruction.strip()}{' ' if instruction_separator is None else instruction_separator}" \
            if instruction else ""
        body = text
        if template:
            # llm2vec strips "instruction + separator + caption" before wrapping it in the template.
            head, body = head.lstrip(), body.rstrip()
        if eos_text:
            full_texts.append((prefix + head + body + suffix).rstrip() + eos_text)
            tails.append((body + suffix).rstrip() + eos_text)
        else:
            full_texts.append(prefix + head + body + suffix)
            tails.append(body + suffix)
        caption_chars.append((len(prefix + head), len(prefix + head + body)))

    tokenized = tokenizer(full_texts, truncation=True, max_length=limit, return_offsets_mapping=caption_spans)
    full = tokenized["input_ids"]
    pooled = _pooled_counts(tokenizer, full, tails, limit, pooled_tokens)
    # Only inputs that reach the limit can have been cut; tokenize those again without truncation to know.
    at_limit = [i for i, ids in enumerate(full) if len(ids) >= limit]
    untruncated = tokenizer([full_texts[i] for i in at_limit])["input_ids"] if at_limit else []
    cut = {i for i, ids in zip(at_limit, untruncated) if len(ids) > limit}
    encoded = []
    for index, (ids, count) in enumerate(zip(full, pooled)):
        if count <= 0:
            raise ValueError(
                f"Text at index {index} ({texts[index]!r}) has no tokens to pool; remove empty captions first (or "
                f"shorten the prompt: it fills max_length={max_length})."
            )
        span = _caption_span(tokenized["offset_mapping"][index], *caption_chars[index]) if caption_spans else None
        ids = list(ids) + ([eos_id] if eos_id is not None else [])
        encoded.append(TokenizedText(ids, min(count + int(eos_id is not None), len(ids)), index in cut, span))
    return encoded


def _pooled_counts(tokenizer, full: Sequence[Sequence[int]], tails: Sequence[str], limit: int,
                   pooled_tokens: str) -> list[int]:
    """How many of each input's last tokens are pooled. ``caption_tail``: the tail (caption and template suffix)
    tokenized alone, llm2vec's rule. ``all``: every token. ``all_but_prompt``: all but the prompt's, counted as
    sentence-transformers counts them: the prompt tokenized alone (special tokens included, a trailing special token
    not counted); here ``tails`` hold the prompts."""
    if pooled_tokens == CAPTION_TAIL:
        return [len(ids) for ids in tokenizer(list(tails), truncation=True, max_length=limit,
                                              add_special_tokens=False)["input_ids"]]
    if pooled_tokens == ALL_TOKENS:
        return [len(ids) for ids in full]
    prompt_lengths: dict[str, int] = {"": 0}
    special = set(tokenizer.all_special_ids)
    for prompt in set(tails) - {""}:
        ids = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
        prompt_lengths[prompt] = len(ids) - int(bool(ids) and ids[-1] in special)
    return [len(ids) - prompt_lengths[prompt] for ids, prompt in zip(full, tails)]


def _caption_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token positions ``[first, last + 1)`` whose characters overlap ``[start, end)`` (special tokens have none)."""
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def check_doc_max_length(doc_max_length: int | None) -> int | None:
    """Return ``doc_max_length`` if it is ``None`` or a positive integer, else raise a ``ValueError``."""
    if doc_max_length is not None and (
        isinstance(doc_max_length, bool) or not isinstance(doc_max_length, int) or doc_max_length < 1
    ):
        raise ValueError(
            f"doc_max_length must be None (no word cut, LLM2CLIP's setting) or a positive integer number of tokens "
            f"(upstream llm2vec uses 400), got {doc_max_length!r}."
        )
    return doc_max_length


def shorten_to_doc_max_length(
    tokenizer, texts: Sequence[str], doc_max_length: int | None, max_length: int
) -> list[str]:
    """Cut captions to fewer words the way upstream llm2vec's ``LLM2Vec._convert_to_str`` does.

    A caption is counted alone (no instruction, no template, ``add_special_tokens=False``), tokenized with
    ``truncation=True, max_length=max_length``, so the count never exceeds ``max_length``. While the count
    exceeds ``doc_max_length`` the caption becomes ``" ".join(text.split()[:int(len(text.split()) * ratio)])``
    with ``ratio = doc_max_length / count``, and is counted again. Captions within the limit are returned
    unchanged (whitespace included). With ``doc_max_length`` ``None`` or ``>= max_length`` nothing can change.
    """
    check_doc_max_length(doc_max_length)
    texts = list(texts)
    if doc_max_length is None or doc_max_length >= max_length:
        return texts

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"])

    counts = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(counts):
        text, length = texts[index], len(ids)
        while length > doc_max_length:
            words = text.split()
            text = " ".join(words[:int(len(words) * (doc_max_length / length))])
            length = count(text)
        if not text:
            raise ValueError(
                f"Text at index {index} was cut to no words by doc_max_length={doc_max_length}: its first word alone "
                f"has more than {doc_max_length} tokens. Raise doc_max_length or set it to None."
            )
        texts[index] = text
    return texts


def validate_texts(texts: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the first entry that is not a non-empty string."""
    if isinstance(texts, str):
        raise TypeError("Expected a list of strings, got a single string; wrap it in a list.")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text at index {index} is {type(text).__name__} ({text!r}), not a string.")
        if not text.strip():
            raise ValueError(f"Text at index {index} is empty or whitespace only; drop it or give it a caption.")


def collate_padded(
    items: Sequence[TokenizedText], pad_token_id: int, device: torch.device | str | None = None,
    width: int | None = None, padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Pad a batch on ``padding_side`` into ``input_ids``, ``attention_mask`` and ``pooling_mask`` (each item's last
    ``num_pooled`` tokens), to the longest item or to ``width`` when given (at least the longest)."""
    check_padding_side(padding_side)
    width = max([len(item.input_ids) for item in items] + [width or 0])
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    pooling_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        length = len(item.input_ids)
        end = width if padding_side == "left" else length
        input_ids[row, end - length:end] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, end - length:end] = 1
        pooling_mask[row, end - item.num_pooled:end] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pooling_mask": pooling_mask}
    return {key: value.to(device) for key, value in batch.items()} if device is not None else batch


def collate_left_padded(
    items: Sequence[TokenizedText], pad_token_id: int, device: torch.device | str | None = None,
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`collate_padded` on the left, llm2vec's side."""
    return collate_padded(items, pad_token_id, device, width)


def prepare_tokenizer(tokenizer, padding_side: str = "left"):
    """Padding on ``padding_side`` (llm2vec's left by default) and a pad token (the eos token when none is set), as
    llm2vec configures its tokenizer."""
    tokenizer.padding_side = check_padding_side(padding_side)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
