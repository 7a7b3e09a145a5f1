"""Processor pairing the LLM tokenizer (with LLM2CLIP's caption template and pooling mask) and CLIP image preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import BatchFeature, CLIPImageProcessorPil, ProcessorMixin, SiglipImageProcessorPil

from .caption_tokenization import (
    CAPTION_TAIL, check_doc_max_length, check_padding_side, check_pooled_tokens, collate_padded, prepare_tokenizer,
    resolve_text_template, tokenize_texts,
)
from .configuration_llm2clip_text import CONFIG_VERSION, migrate_text_config_dict
from .pooling import check_pooling_mode

# Text keywords of CLIPProcessor's call that mean something here; the rest go to the image processor.
_PADDING_LONGEST = (True, "longest")

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
    (``LLM2CLIPTextConfig.appended_eos_text``), ``append_eos_token_id`` the older rule of encoders saved before it
    (set by migration); ``pooled_tokens``, ``padding_side`` and ``default_prompt`` (used where no instruction is given)
    are the text config's, for encoders loaded from sentence-transformers models. All are saved with the processor,
    with ``config_version`` (as the text config's: processors saved without it are migrated on loading).

    CLIPProcessor's text keywords are accepted: ``padding`` (``True`` / ``"longest"``, the default, or
    ``"max_length"``), ``truncation`` (inputs are always cut at ``max_length``) and ``max_length`` (this call's
    limit); other keywords go to the image processor.

    Example:
        ```python
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained("my-llm2clip", trust_remote_code=True)
        inputs = processor(text=["a red square"], images=[Image.open("cat.png")])
        print(sorted(inputs))  # attention_mask, input_ids, pixel_values, pooling_mask
        ```
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
        append_eos_token_id: bool = False,
        pooled_tokens: str = CAPTION_TAIL,
        padding_side: str = "left",
        default_prompt: str | None = None,
        config_version: int = CONFIG_VERSION,
        **kwargs: Any,
    ) -> None:
        self.text_template = resolve_text_template(text_template)
        self.max_length = max_length
        self.pooling_mode = check_pooling_mode(pooling_mode)
        self.doc_max_length = check_doc_max_length(doc_max_length)
        self.eos_text = eos_text
        self.append_eos_token_id = bool(append_eos_token_id) and self.pooling_mode == "eos_token"
        self.pooled_tokens = check_pooled_tokens(pooled_tokens, self.text_template, self.doc_max_length)
        self.padding_side = check_padding_side(padding_side)
        self.default_prompt = default_prompt
        self.config_version = config_version
        if tokenizer is not None:
            prepare_tokenizer(tokenizer, self.padding_side)
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
        padding = kwargs.pop("padding", True)
        truncation = kwargs.pop("truncation", True)
        max_length = kwargs.pop("max_length", None) or self.max_length
        if padding not in (*_PADDING_LONGEST, "max_length"):
            raise ValueError(f"padding={padding!r}: the text inputs are always padded (on the {self.padding_side}, "
                             "where the encoder expects them); pass padding=True, 'longest' or 'max_length'.")
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation={truncation!r}: inputs are always cut at max_length={max_length} tokens, "
                             "as the encoder was trained; raise max_length instead.")
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if instruction is None:
                instruction = self.default_prompt
            items = tokenize_texts(
                self.tokenizer, texts, instruction, text_template=self.text_template, max_length=max_length,
                eos_text=self.eos_text, doc_max_length=self.doc_max_length,
                append_eos_token_id=self.append_eos_token_id, pooled_tokens=self.pooled_tokens,
            )
            width = max_length if padding == "max_length" else None
            data.update(collate_padded(items, self.tokenizer.pad_token_id, width=width, padding_side=self.padding_side))
        if images is not None:
            data.update(self.image_processor(images, return_tensors="pt", **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @classmethod
    def from_dict(cls, processor_dict: dict[str, Any], **kwargs: Any) -> "LLM2CLIPProcessor":
        """Build a processor from its saved dict, migrated as the text config is (``migrate_text_config_dict``)."""
        return super().from_dict(migrate_text_config_dict(processor_dict), **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pooling_mask", "pixel_values"]


LLM2CLIPProcessor.register_for_auto_class("AutoProcessor")
