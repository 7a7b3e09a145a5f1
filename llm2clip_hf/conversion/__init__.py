"""Conversion of the official LLM2CLIP checkpoints (every published layout) to :class:`LLM2CLIPModel`.

``convert_checkpoint(path_or_id)`` reads a file, a folder or a Hub id and detects the layout; the layouts and their
key maps are in :mod:`.layouts`, safe reading in :mod:`.io`."""

from .core import (
    ConversionReport,
    build_config,
    convert_checkpoint,
    convert_checkpoint_with_report,
    convert_eva_clip_checkpoint,
    convert_hf_checkpoint,
    convert_state_dict,
    infer_config,
    model_from_state_dict,
    resize_grid,
)
from .io import CheckpointConversionError, load_checkpoint_source, load_official_state_dict
from .layouts import ADAPTER_LAYOUTS, LAYOUTS, default_heads, detect_layout

__all__ = [
    "ADAPTER_LAYOUTS", "LAYOUTS", "CheckpointConversionError", "ConversionReport", "build_config",
    "convert_checkpoint", "convert_checkpoint_with_report", "convert_eva_clip_checkpoint", "convert_hf_checkpoint",
    "convert_state_dict", "default_heads", "detect_layout", "infer_config", "load_checkpoint_source",
    "load_official_state_dict", "model_from_state_dict", "resize_grid",
]
