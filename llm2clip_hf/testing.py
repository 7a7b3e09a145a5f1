"""Tiny, fully offline checkpoints for tests, smoke runs and benchmarks.

``make_tiny_llm`` writes a random Llama-architecture decoder with a real byte-level BPE tokenizer (trained on the
spot, BOS added like Llama's) to a directory, as a Hub checkpoint would look. ``tiny_llm2clip_config`` pairs it
with a small EVA02 tower.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

from .modeling import EVA02VisionConfig, LLM2CLIPConfig, LLM2CLIPTextConfig

CHAT_SPECIAL_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

_CORPUS = (
    "a photo of a cat sitting on a red sofa near the window. a dog runs across green grass in the park. "
    "a detailed close-up of a yellow flower with dew drops on its petals. two people walk along a sandy beach "
    "at sunset while waves roll in. a bowl of fresh fruit: apples, bananas and grapes on a wooden table. "
    "an emoji of a smiling face with heart eyes. given a sentence, retrieve a detailed relevant sentence; "
    "given a detailed sentence, retrieve a short relevant sentence. the quick brown fox jumps over the lazy dog."
)


def make_tiny_tokenizer(vocab_size: int = 400, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small caption corpus; adds ``<s>`` in front when ``add_bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", *CHAT_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", additional_special_tokens=CHAT_SPECIAL_TOKENS
    )


def make_tiny_llm(
    directory: str | os.PathLike,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    add_bos: bool = True,
    seed: int = 0,
    causal_lm: bool = False,
    tie_word_embeddings: bool = False,
) -> Path:
    """Save a random tiny Llama decoder and its tokenizer to ``directory``; return the path. ``causal_lm`` saves a
    ``LlamaForCausalLM`` (with its ``lm_head``, or tied to the input embeddings)."""
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(add_bos=add_bos)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=max(1, num_attention_heads // 2), max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    (LlamaForCausalLM if causal_lm else LlamaModel)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_vision_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                       num_hidden_layers: int = 2, num_attention_heads: int = 2) -> EVA02VisionConfig:
    """A small EVA02 tower (head width 32)."""
    return EVA02VisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=int(hidden_size * 2.6667),
    )


def tiny_llm2clip_config(text_config: LLM2CLIPTextConfig | None = None, text_embedding_dim: int | None = None,
                         projection_dim: int = 32, **vision_kwargs) -> LLM2CLIPConfig:
    """A small LLM2CLIP config, with or without an embedded text encoder."""
    return LLM2CLIPConfig(
        vision_config=tiny_vision_config(**vision_kwargs), text_config=text_config,
        text_embedding_dim=text_embedding_dim, projection_dim=projection_dim,
    )


_COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "black": (10, 10, 10), "white": (250, 250, 250), "purple": (130, 40, 150), "orange": (250, 140, 20),
}
_SHAPES = ("square", "circle", "triangle", "stripe")


def _draw(color: tuple[int, int, int], shape: str, size: int) -> Image.Image:
    background = (128, 128, 128)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    else:
        draw.rectangle((0, size // 3, size, 2 * size // 3), fill=color)
    return image


def tiny_image_caption_rows(image_size: int = 40) -> list[dict]:
    """32 synthetic images (8 colours x 4 shapes) with a short and a long caption each."""
    return [
        {
            "image": _draw(rgb, shape, image_size),
            "short_caption": f"a {color} {shape}",
            "long_caption": f"a photo of a {color} {shape} drawn on a plain grey background, nothing else",
        }
        for color, rgb in _COLORS.items()
        for shape in _SHAPES
    ]


_COLOR_PARAPHRASES = {
    "red": "the colour of ripe tomatoes", "green": "the colour of fresh grass", "blue": "the colour of a clear sky",
    "yellow": "the colour of lemons", "black": "the colour of coal", "white": "the colour of snow",
    "purple": "the colour of plums", "orange": "the colour of pumpkins",
}
_SHAPE_PARAPHRASES = {
    "square": "four equal sides and four corners", "circle": "a round outline without corners",
    "triangle": "three sides meeting at three points", "stripe": "a wide band running across",
}


def tiny_caption_pair_rows() -> list[dict]:
    """32 caption pairs whose long caption paraphrases the short one (few shared words), for stage-1 tests."""
    return [
        {"short_caption": f"a {color} {shape}",
         "long_caption": f"a drawing with {_SHAPE_PARAPHRASES[shape]}, painted in {_COLOR_PARAPHRASES[color]}"}
        for color in _COLORS for shape in _SHAPES
    ]
