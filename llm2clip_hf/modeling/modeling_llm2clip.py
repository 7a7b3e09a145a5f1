"""LLM2CLIP: a vision tower (EVA02, OpenAI CLIP or SigLIP) and an LLM text side (embedded, or as precomputed
embeddings) in one space."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_eva02 import EVA02VisionConfig
from .configuration_llm2clip import LLM2CLIPConfig, vision_family
from .contrastive import local_clip_loss, local_sigmoid_loss
from .modeling_eva02 import EVA02VisionModel, init_linear_and_layer_norm
from .modeling_llm2clip_text import LLM2CLIPTextModel, LLM2CLIPTextOutput, load_tokenizer_if_saved
from .processing_llm2clip import LLM2CLIPProcessor, image_processor_for
from .text_adapter import TextAdapter

# Auto classes written into every saved config besides AutoConfig/AutoModel, so pipelines find the model.
EXTRA_AUTO_CLASSES = ("AutoModelForZeroShotImageClassification",)


@dataclass
class LLM2CLIPOutput(ModelOutput):
    """Output of :class:`LLM2CLIPModel`, laid out as transformers' ``CLIPOutput``.

    Args:
        loss: symmetric contrastive loss, when ``return_loss=True``.
        logits_per_image: ``(images, texts)`` scaled cosine similarities.
        logits_per_text: its transpose.
        text_embeds / image_embeds: L2-normalised joint-space embeddings.
        text_model_output: output of the embedded text encoder, when it ran.
        vision_model_output: output of the vision tower, when it ran.
        logit_scale: the model's ``logit_scale`` (log of the scale) as this forward used it.
        logit_bias: SigLIP's ``logit_bias`` as this forward used it, or ``None``.

    ``logit_scale`` / ``logit_bias`` are copies taken inside ``forward`` that keep the gradient to the parameters:
    a loss computed outside the model should take them from here, as a sharding wrapper (FSDP, DeepSpeed ZeRO-3)
    frees the parameters' gathered values once ``forward`` returns.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: LLM2CLIPTextOutput | None = None
    vision_model_output: Any = None
    logit_scale: torch.FloatTensor | None = None
    logit_bias: torch.FloatTensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


class LLM2CLIPPreTrainedModel(PreTrainedModel):
    """Weight initialisation shared by the LLM2CLIP classes."""

    config_class = LLM2CLIPConfig
    base_model_prefix = "llm2clip"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        # The vision tower is a PreTrainedModel of its own: transformers initialises it with its own _init_weights.
        if module is getattr(self, "visual_projection", None):
            vision = self.config.vision_config
            if vision_family(vision) == "eva02":
                # eva_clip's head: trunc_normal_(std=.02), then weight and (zero) bias multiplied by init_scale.
                init.trunc_normal_(module.weight, std=vision.initializer_range)
                init.copy_(module.weight, module.weight * vision.head_init_scale)
            else:  # open_clip / OpenAI CLIP: proj = width ** -0.5 * randn (transformers' CLIPModel likewise)
                init.normal_(module.weight, std=vision.hidden_size**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        if init_linear_and_layer_norm(module, self.config.initializer_range):
            return
        if isinstance(module, LLM2CLIPModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)


def build_vision_tower(vision_config) -> nn.Module:
    """The tower a vision config describes: our EVA02, or transformers' own ``CLIPVisionModel`` /
    ``SiglipVisionModel`` (so their weights keep transformers' names: ``vision_model.embeddings...``)."""
    family = vision_family(vision_config)
    if family == "eva02":
        return EVA02VisionModel(vision_config)
    tower_class = CLIPVisionModel if family == "clip" else SiglipVisionModel
    return tower_class._from_config(vision_config)


def present_no_split_modules(model: nn.Module) -> set[str]:
    """The ``_no_split_modules`` of ``model``'s sub-models (the LLM's decoder layer, the vision tower's block, ...)
    that name a class ``model`` contains: accelerate's FSDP auto-wrap fails on a listed class it cannot find (a
    ``CLIPVisionModel`` lists ``CLIPTextEmbeddings``), and ``device_map="auto"`` keeps each such module whole."""
    present = {type(module).__name__ for module in model.modules()}
    listed = {name for module in model.modules() if module is not model and isinstance(module, PreTrainedModel)
              for name in getattr(module, "_no_split_modules", None) or ()}
    return listed & present


class LLM2CLIPModel(LLM2CLIPPreTrainedModel):
    """CLIP whose text side is an LLM: a vision tower (+ ``visual_projection``, unless the family has none) for
    images, ``text_adapter`` for texts.

    The tower is EVA02 (ours), or transformers' ``CLIPVisionModel`` / ``SiglipVisionModel``, chosen by the type of
    ``config.vision_config``. With ``config.logit_bias_init_value`` set, the model has SigLIP's learnable
    ``logit_bias``, added to the logits, and ``return_loss`` gives the sigmoid loss.

    Texts enter either as LLM sentence embeddings (``get_text_features(llm_embeddings)``, as the official model
    card calls it, and as stage 2 trains on cached embeddings) or, when ``config.text_config`` embeds a text
    encoder, as tokens (``input_ids`` / ``attention_mask`` / ``pooling_mask``).

    Example:
        ```python
        import torch
        from transformers import AutoModel, AutoProcessor

        # a saved model with its text encoder embedded; its remote code needs no llm2clip-hf
        model = AutoModel.from_pretrained("my-llm2clip", trust_remote_code=True)
        processor = AutoProcessor.from_pretrained("my-llm2clip", trust_remote_code=True)
        with torch.no_grad():
            text_features = model.get_text_features(**processor(text=["a red square", "a blue circle"]))
        ```
    """

    def __init__(self, config: LLM2CLIPConfig) -> None:
        super().__init__(config)
        vision = config.vision_config
        self.vision_model = build_vision_tower(vision)
        self.visual_projection = None if config.vision_projection == "none" else nn.Linear(
            vision.hidden_size, config.projection_dim, bias=config.vision_projection == "linear_bias")
        self.text_adapter = TextAdapter(
            config.text_embedding_dim, config.projection_dim, config.adapter_num_blocks, config.adapter_expansion,
            l2_normalize=config.adapter_l2_normalize, input_normalization=config.adapter_input_normalization,
        )
        self.text_model = LLM2CLIPTextModel(config.text_config) if config.text_config is not None else None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.logit_bias = None if config.logit_bias_init_value is None else nn.Parameter(
            torch.tensor(float(config.logit_bias_init_value)))
        self.post_init()
        self._no_split_modules = present_no_split_modules(self)

    @classmethod
    def from_text_model(
        cls,
        text_model: LLM2CLIPTextModel,
        vision_config: EVA02VisionConfig | dict | None = None,
        embed_text_model: bool = True,
        **config_kwargs: Any,
    ) -> "LLM2CLIPModel":
        """A new model (random vision tower and adapter) for ``text_model``'s embeddings.

        With ``embed_text_model`` the text encoder (weights and tokenizer) becomes part of the model, so it can
        read raw text and ships with a processor; otherwise only its embedding width and fingerprint are kept and
        the model reads precomputed embeddings.
        """
        if embed_text_model:
            config = LLM2CLIPConfig(vision_config=vision_config, text_config=text_model.config.to_dict(), **config_kwargs)
        else:
            config = LLM2CLIPConfig(vision_config=vision_config, text_embedding_dim=text_model.config.hidden_size,
                                    **config_kwargs)
        config.text_model_name_or_path = text_model.name_or_path
        model = cls(config)
        if embed_text_model:
            model.text_model.load_state_dict(text_model.state_dict())
            model.text_model.tokenizer = text_model.tokenizer
        return model.to(next(text_model.parameters()).device)

    def train(self, mode: bool = True) -> "LLM2CLIPModel":
        """``nn.Module.train``, except that an embedded text encoder with no trainable parameter (the frozen LLM of
        stage 2) stays in eval mode: no dropout acts on a frozen LLM."""
        super().train(mode)
        if mode and self.text_model is not None and not any(p.requires_grad for p in self.text_model.parameters()):
            self.text_model.eval()
        return self

    def get_input_embeddings(self) -> nn.Module | None:
        """The embedded LLM's token embedding, or ``None`` without one (accelerate's FSDP2 asks for it)."""
        return self.text_model.get_input_embeddings() if self.text_model is not None else None

    # ------------------------------------------------------------------------------------------- features
    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Joint-space image features ``(batch, projection_dim)``, not normalised (eva_clip ``encode_image``)."""
        return self._image_features(self._vision_output(pixel_values, interpolate_pos_encoding))

    def _vision_output(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool):
        dtype = next(self.vision_model.parameters()).dtype
        return self.vision_model(pixel_values=pixel_values.to(dtype), interpolate_pos_encoding=interpolate_pos_encoding)

    def _image_features(self, vision_output) -> torch.Tensor:
        pooled = vision_output.pooler_output
        return pooled if self.visual_projection is None else self.visual_projection(pooled)

    def get_text_features(
        self,
        llm_embeddings: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooling_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Joint-space text features ``(batch, projection_dim)``, not normalised.

        Pass LLM sentence embeddings (``text_model.encode(...)`` or cached ones) positionally, as the official
        model card does, or token inputs when a text encoder is embedded.
        """
        return self.text_adapter(self.llm_embeddings(llm_embeddings, input_ids, attention_mask, pooling_mask)[0])

    def llm_embeddings(
        self,
        llm_embeddings: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooling_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LLM2CLIPTextOutput | None]:
        """LLM sentence embeddings in the adapter's dtype, from either input form, and the encoder output."""
        if (llm_embeddings is None) == (input_ids is None):
            raise ValueError("Pass exactly one of `llm_embeddings` (precomputed LLM embeddings) or `input_ids`.")
        text_output = None
        if input_ids is not None:
            if self.text_model is None:
                raise ValueError(
                    "This LLM2CLIPModel has no embedded text encoder (config.text_config is None), so it cannot "
                    "read input_ids. Embed the texts with LLM2CLIPTextModel.encode(...) and pass the embeddings as "
                    "llm_embeddings, or build the model with a text_config."
                )
            text_output = self.text_model(input_ids=input_ids, attention_mask=attention_mask, pooling_mask=pooling_mask)
            llm_embeddings = text_output.text_embeds
        if llm_embeddings.dim() != 2 or llm_embeddings.shape[-1] != self.config.text_embedding_dim:
            raise ValueError(
                f"llm_embeddings must have shape (batch, {self.config.text_embedding_dim}) for this adapter; got "
                f"{tuple(llm_embeddings.shape)}. Were they made by a different LLM than the one this model was "
                "trained with?"
            )
        return llm_embeddings.to(self.logit_scale.dtype), text_output

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pooling_mask: torch.LongTensor | None = None,
        llm_embeddings: torch.FloatTensor | None = None,
        return_loss: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool = True,
    ) -> LLM2CLIPOutput | tuple:
        """Image-text logits (CLIP layout), and the symmetric contrastive loss with ``return_loss=True``."""
        if pixel_values is None:
            raise ValueError("LLM2CLIPModel.forward needs pixel_values; use get_text_features for texts alone.")
        vision_output = self._vision_output(pixel_values, interpolate_pos_encoding)
        image_embeds = F.normalize(self._image_features(vision_output), dim=-1)
        embeddings, text_output = self.llm_embeddings(llm_embeddings, input_ids, attention_mask, pooling_mask)
        text_embeds = F.normalize(self.text_adapter(embeddings), dim=-1)
        scale = self.logit_scale.exp()
        logits_per_image = scale * image_embeds @ text_embeds.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        loss = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError("return_loss=True needs one text per image (paired batches).")
            if self.logit_bias is None:
                loss = local_clip_loss(image_embeds, text_embeds, image_embeds, text_embeds, scale)
            else:
                loss = local_sigmoid_loss(image_embeds, text_embeds, scale, self.logit_bias)
        output = LLM2CLIPOutput(
            loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_image.t(),
            text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_output,
            vision_model_output=vision_output, logit_scale=self.logit_scale.clone(),
            logit_bias=None if self.logit_bias is None else self.logit_bias.clone(),
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------------------- saving
    def build_processor(self) -> LLM2CLIPProcessor | None:
        """The processor matching this model (its tokenizer, template, length and image size)."""
        tokenizer = self.text_model.tokenizer if self.text_model is not None else None
        if tokenizer is None:
            return None
        text = self.config.text_config
        return LLM2CLIPProcessor(
            image_processor=image_processor_for(self.config.vision_config), tokenizer=tokenizer,
            text_template=text.text_template, max_length=text.max_seq_length, pooling_mode=text.pooling_mode,
            doc_max_length=text.doc_max_length, eos_text=text.appended_eos_text,
            append_eos_token_id=text.append_eos_token_id, pooled_tokens=text.pooled_tokens,
            padding_side=text.padding_side, default_prompt=text.default_prompt,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save weights, config and remote code, plus the processor (or the image processor alone).

        Refuses, before writing anything, an embedded text encoder without a tokenizer: its folder could not embed
        text (no tokenizer, no processor; the zero-shot pipeline would fail on it)."""
        if self.text_model is not None and self.text_model.tokenizer is None:
            raise ValueError(
                "This LLM2CLIPModel embeds a text encoder that has no tokenizer, so the saved folder could not embed "
                "text. Attach it (model.text_model.tokenizer = AutoTokenizer.from_pretrained(<the LLM>)), or build "
                "the model with LLM2CLIPModel.from_text_model(..., embed_text_model=True) or `llm2clip-hf assemble`, "
                "which attach it. Nothing was written."
            )
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update({name: f"{module}.{type(self).__name__}" for name in EXTRA_AUTO_CLASSES})
            self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        processor = self.build_processor()
        if processor is not None:
            processor.save_pretrained(save_directory)
        else:
            image_processor_for(self.config.vision_config).save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that also attaches the saved tokenizer to the text encoder."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model.text_model is not None and pretrained_model_name_or_path is not None:
            model.text_model.tokenizer = load_tokenizer_if_saved(
                pretrained_model_name_or_path, kwargs, model.config.text_config
            )
        return model


LLM2CLIPModel.register_for_auto_class("AutoModel")
