"""llm2clip-hf: LLM2CLIP (CLIP with a large language model as its text encoder) for the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .modeling import (
    EVA02_PRESETS,
    POOLING_MODES,
    TEXT_TEMPLATES,
    EVA02VisionConfig,
    EVA02VisionModel,
    LLM2CLIPConfig,
    LLM2CLIPModel,
    LLM2CLIPOutput,
    LLM2CLIPProcessor,
    LLM2CLIPTextConfig,
    LLM2CLIPTextModel,
    LLM2CLIPTextOutput,
    TextAdapter,
)

from ._moved import install as _install_moved_paths  # noqa: E402
from .conversion import attach_text_model, llm2clip_from_pretrained_vision, load_lm_head, load_text_model  # noqa: E402

__version__ = "0.2.0.dev0"

for _config, _model in ((EVA02VisionConfig, EVA02VisionModel), (LLM2CLIPTextConfig, LLM2CLIPTextModel),
                        (LLM2CLIPConfig, LLM2CLIPModel)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
AutoProcessor.register(LLM2CLIPConfig, LLM2CLIPProcessor, exist_ok=True)
_install_moved_paths()

__all__ = [
    "EVA02_PRESETS", "EVA02VisionConfig", "EVA02VisionModel", "LLM2CLIPConfig", "LLM2CLIPModel", "LLM2CLIPOutput",
    "LLM2CLIPProcessor", "LLM2CLIPTextConfig", "LLM2CLIPTextModel", "LLM2CLIPTextOutput", "POOLING_MODES",
    "TEXT_TEMPLATES", "TextAdapter", "__version__", "attach_text_model", "llm2clip_from_pretrained_vision",
    "load_lm_head", "load_text_model",
]
