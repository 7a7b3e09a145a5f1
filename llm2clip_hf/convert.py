"""Convert official LLM2CLIP checkpoints to :class:`LLM2CLIPModel` (kept as the public entry point; the code lives
in :mod:`llm2clip_hf.conversion`).

* ``convert_checkpoint(path_or_id, **kw)``: a ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file, a folder or a
  Hub id, any official layout (detected from the keys).
* ``convert_eva_clip_checkpoint(path, *, vision_num_heads=None, text_embedding_dim=None, **overrides)``: an
  eva_clip-format file (EVA02, OpenAI CLIP or timm SigLIP tower; with its adapter, or without one given
  ``text_embedding_dim``).
* ``convert_hf_checkpoint(folder_or_id, **kw)``: a published Hugging Face LLM2CLIP repo.
"""

from .conversion import (
    CheckpointConversionError,
    ConversionReport,
    convert_checkpoint,
    convert_checkpoint_with_report,
    convert_eva_clip_checkpoint,
    convert_hf_checkpoint,
    convert_state_dict,
    detect_layout,
    infer_config,
    load_official_state_dict,
)
from .conversion.io import strip_module_prefix as _strip_module_prefix  # noqa: F401  (kept for old imports)

__all__ = [
    "CheckpointConversionError", "ConversionReport", "convert_checkpoint", "convert_checkpoint_with_report",
    "convert_eva_clip_checkpoint", "convert_hf_checkpoint", "convert_state_dict", "detect_layout", "infer_config",
    "load_official_state_dict",
]
