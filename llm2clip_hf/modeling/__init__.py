"""LLM2CLIP model classes. This folder is the remote code saved with every checkpoint: it imports only torch,
transformers and its own files, so checkpoints load with ``trust_remote_code=True`` where ``llm2clip_hf`` is absent."""

from .caption_tokenization import TEXT_TEMPLATES, tokenize_texts
from .configuration_eva02 import EVA02_PRESETS, EVA02VisionConfig
from .configuration_llm2clip import LLM2CLIPConfig
from .configuration_llm2clip_text import LLM2CLIPTextConfig
from .contrastive import local_clip_loss
from .modeling_eva02 import EVA02VisionModel
from .modeling_llm2clip import LLM2CLIPModel, LLM2CLIPOutput
from .modeling_llm2clip_text import LLM2CLIPTextModel, LLM2CLIPTextOutput
from .pooling import POOLING_MODES, pool
from .processing_llm2clip import LLM2CLIPProcessor, clip_image_processor
from .text_adapter import TextAdapter

__all__ = [
    "EVA02_PRESETS", "EVA02VisionConfig", "EVA02VisionModel", "LLM2CLIPConfig", "LLM2CLIPModel", "LLM2CLIPOutput",
    "LLM2CLIPProcessor", "LLM2CLIPTextConfig", "LLM2CLIPTextModel", "LLM2CLIPTextOutput", "POOLING_MODES",
    "TEXT_TEMPLATES", "TextAdapter", "clip_image_processor", "local_clip_loss", "pool", "tokenize_texts",
]
