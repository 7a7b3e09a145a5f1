"""The vision tower of an LLM2CLIP model as a standalone model folder, for multimodal LLMs (transformers' Llava reads
a tower's hidden states, not CLIP's joint space).

OpenAI-CLIP and SigLIP towers are transformers' own ``CLIPVisionModel`` / ``SiglipVisionModel`` inside an
:class:`~llm2clip_hf.modeling.LLM2CLIPModel`, so the folder is theirs: ``AutoModel.from_pretrained(folder)`` loads
it with no remote code and no llm2clip-hf, and ``LlavaConfig(vision_config=AutoConfig.from_pretrained(folder))``
rebuilds it anywhere. An EVA02 tower is this package's ``EVA02VisionModel``: the folder carries its remote code
(``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works without the package), but a Llava built on
it can only be rebuilt where ``EVA02VisionConfig`` is registered with transformers' Auto classes (``import
llm2clip_hf`` does that), because Llava builds its tower with ``AutoModel.from_config`` and reads no remote code
for a sub-config. The projection into CLIP's joint space is not part of the tower (Llava does not use it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..modeling import LLM2CLIPModel, image_processor_for
from ..modeling.configuration_llm2clip import vision_family
from .model_loading import load_clip_model


def export_vision_tower(model: LLM2CLIPModel | str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Save ``model``'s vision tower (an :class:`LLM2CLIPModel` or a folder / Hub id of one) with the image
    processor it was trained with to ``output_dir``; return a summary (family, class, whether it needs remote code,
    number of hidden-state layers, image size).

    Example:
        ```python
        from transformers import AutoConfig
        from llm2clip_hf.conversion import export_vision_tower

        export_vision_tower("my-llm2clip", "tower")
        vision_config = AutoConfig.from_pretrained("tower")  # for LlavaConfig(vision_config=..., text_config=...)
        ```
    """
    if not isinstance(model, LLM2CLIPModel):
        model = load_clip_model(str(model))
    tower, config = model.vision_model, model.config.vision_config
    family = vision_family(config)
    output_dir = Path(output_dir)
    tower.save_pretrained(output_dir)
    image_processor_for(config).save_pretrained(output_dir)
    return {"output_dir": str(output_dir), "family": family, "class": type(tower).__name__,
            "remote_code": family == "eva02", "hidden_states": config.num_hidden_layers + 1,
            "image_size": config.image_size, "patch_size": config.patch_size,
            "class_token": family != "siglip"}
