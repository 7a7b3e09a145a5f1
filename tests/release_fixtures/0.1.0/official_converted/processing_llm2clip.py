"""Processor pairing the LLM tokenizer (with LLM2CLIP's caption template and pooling mask) and CLIP image preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import BatchFeature, CLIPImageProcessorPil, ProcessorMixin, SiglipImageProcessorPil

from .caption_tokenization import (
    check_doc_max_length, collate_left_padded, prepare_tokenizer, resolve_text_template, tokenize_texts,
)
from .pooling import check_pooling_mode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """Evaluation preprocessing of LLM2CLIP: bicubic resize of the short side, center crop, OpenAI mean/std."""
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
    )


def siglip_image_processor(image_size: int) -> SiglipImageProcessorPil:
    """SigLIP preprocessing: bicubic resize of the whole image to a square (no crop), mean = std = 0.5."""
    return SiglipImageProcessorPil(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=3, do_rescale=True,
        do_normalize=True, image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD), do_convert_rgb=True,
    )


def image_processor_for(vision_config: Any) -> CLIPImageProcessorPil | SiglipImageProcessorPil:
    """The evaluation preprocessing of a tower's family: OpenAI CLIP's for EVA02 and CLIP towers (both were
    trained with it), SigLIP's for SigLIP towers."""
    if getattr(vision_config, "model_type", None) == "siglip_vision_model":
        return siglip_image_processor(vision_config.image_size)
    return clip_image_processor(vision_config.image_size)


class LLM2CLIPProcessor(ProcessorMixin):
    """Tokenizes captions for an LLM2CLIP text encoder and preprocesses images for its EVA02 tower.

    ``processor(text=..., images=..., instruction=None)`` returns ``input_ids``, ``attention_mask`` and
    ``pooling_mask`` (left-padded, template applied, instruction excluded from pooling) and ``pixel_values``.
    ``doc_max_length`` (``None``: off) cuts long captions to fewer words first, as the text model's setting of
    the same name does; ``eos_text`` is what the text model appends under ``eos_token`` pooling
    (``LLM2CLIPTextConfig.appended_eos_text``). Both are saved with the processor.
    """

    def __init__(
        self,
        image_processor: CLIPImageProcessorPil | None = None,
        tokenizer: Any = None,
        text_template: str | None = None,
        max_length: int = 512,
        pooling_mode: str = "mean",
        doc_max_length: int | None = None,
        eos_text: str = "",
        **kwargs: Any,
    ) -> None:
        self.text_template = resolve_text_template(text_template)
        self.max_length = max_length
        self.pooling_mode = check_pooling_mode(pooling_mode)
        self.doc_max_length = check_doc_max_length(doc_max_length)
        self.eos_text = eos_text
        if tokenizer is not None:
            prepare_tokenizer(tokenizer)
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        instruction: str | Sequence[str | None] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("LLM2CLIPProcessor needs `text`, `images` or both.")
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            items = tokenize_texts(
                self.tokenizer, texts, instruction, text_template=self.text_template, max_length=self.max_length,
                eos_text=self.eos_text, doc_max_length=self.doc_max_length,
            )
            data.update(collate_left_padded(items, self.tokenizer.pad_token_id))
        if images is not None:
            data.update(self.image_processor(images, return_tensors="pt", **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pooling_mask", "pixel_values"]


LLM2CLIPProcessor.register_for_auto_class("AutoProcessor")
