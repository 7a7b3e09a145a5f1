"""Everything that starts from weights made elsewhere: the official LLM2CLIP checkpoints (every published layout,
detected from the keys: :mod:`.layouts`, read safely by :mod:`.io`, converted by :mod:`.core`), pretrained vision
towers to post-train and the assembly of published parts (:mod:`.pretrained_vision`, which embeds text encoders
and renews adapters with :mod:`.text_attachment`), plain LLMs and saved models (:mod:`.model_loading`, offline assets
in :mod:`.assets`; text encoders published as PEFT adapters, llm2vec's: :mod:`.llm2vec_adapters`; sentence-transformers
models: :mod:`.sentence_transformer_models`), LoRA merging
(:mod:`.lora_merge`), the vision tower alone for multimodal LLMs (:mod:`.vision_export`) and the fingerprint that identifies a text encoder's
computation (:mod:`.fingerprint`)."""

from .core import (
    ConversionReport,
    convert_checkpoint,
    convert_checkpoint_with_report,
    convert_eva_clip_checkpoint,
    convert_hf_checkpoint,
    convert_state_dict,
    infer_config,
    model_from_state_dict,
    resize_grid,
)
from .fingerprint import text_model_fingerprint
from .io import CheckpointConversionError, load_checkpoint_source, load_official_state_dict
from .adapter_layouts import ADAPTER_LAYOUTS
from .layouts import LAYOUTS, default_heads, detect_layout
from .lora_merge import merge_lora_state_dict, merged_state_dict, unwrap_peft
from .llm2vec_adapters import text_model_from_adapters  # also lets LLM2CLIPTextModel.from_llm load adapters
from .model_loading import DEFAULT_TEXT_MODEL, hub_is_offline, load_clip_model, load_lm_head, load_text_model
from .sentence_transformer_models import text_model_from_sentence_transformer  # also lets from_llm load them
from .pretrained_vision import assemble, llm2clip_from_pretrained_vision
from .text_attachment import attach_text_model
from .vision_export import export_vision_tower

__all__ = [
    "ADAPTER_LAYOUTS", "DEFAULT_TEXT_MODEL", "LAYOUTS", "CheckpointConversionError", "ConversionReport", "assemble",
    "attach_text_model", "convert_checkpoint", "convert_checkpoint_with_report",
    "convert_eva_clip_checkpoint", "convert_hf_checkpoint", "convert_state_dict", "default_heads", "detect_layout",
    "export_vision_tower",
    "hub_is_offline", "infer_config", "llm2clip_from_pretrained_vision", "load_checkpoint_source", "load_clip_model",
    "load_lm_head", "load_official_state_dict", "load_text_model", "merge_lora_state_dict", "merged_state_dict",
    "model_from_state_dict", "resize_grid", "text_model_fingerprint", "unwrap_peft",
]
