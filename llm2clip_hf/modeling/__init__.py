"""LLM2CLIP model classes. This folder is the remote code saved with every checkpoint: it imports only torch,
transformers and its own files, so checkpoints load with ``trust_remote_code=True`` where ``llm2clip_hf`` is absent."""

from .caption_tokenization import TEXT_TEMPLATES, tokenize_texts
from .configuration_eva02 import EVA02_PRESETS, EVA02VisionConfig
from .configuration_llm2clip import VISION_CONFIG_CLASSES, LLM2CLIPConfig, vision_family
from .configuration_llm2clip_text import LLM2CLIPTextConfig
from .contrastive import local_clip_loss, local_sigmoid_loss
from .modeling_eva02 import EVA02VisionModel
from .modeling_llm2clip import LLM2CLIPModel, LLM2CLIPOutput, build_vision_tower
from .modeling_llm2clip_text import LLM2CLIPTextModel, LLM2CLIPTextOutput
from .pooling import POOLING_MODES, pool
from .processing_llm2clip import LLM2CLIPProcessor, clip_image_processor, image_processor_for, siglip_image_processor
from .text_adapter import TextAdapter

__all__ = [
    "EVA02_PRESETS", "EVA02VisionConfig", "EVA02VisionModel", "LLM2CLIPConfig", "LLM2CLIPModel", "LLM2CLIPOutput",
    "LLM2CLIPProcessor", "LLM2CLIPTextConfig", "LLM2CLIPTextModel", "LLM2CLIPTextOutput", "POOLING_MODES",
    "TEXT_TEMPLATES", "TextAdapter", "VISION_CONFIG_CLASSES", "build_vision_tower", "clip_image_processor",
    "image_processor_for", "local_clip_loss", "local_sigmoid_loss", "pool", "siglip_image_processor", "tokenize_texts",
    "vision_family",
]
