"""LLM2CLIP models from pretrained vision towers (post-training a CLIP with an LLM), and ``llm2clip-hf assemble``.

``llm2clip_from_pretrained_vision(source, text_model)`` starts stage 2 from a pretrained CLIP instead of a random
tower, as the paper does: the image side (tower, projection, temperature) is kept exactly and a text adapter maps
the LLM's embeddings into its space. ``assemble(source, text_model, output_dir)`` saves a source with its adapter
kept and the text encoder embedded (by :mod:`.text_attachment`), so the result takes raw text and works in
``pipeline("zero-shot-image-classification")``.

Nothing here runs a source's remote code: configs are read with ``trust_remote_code=False``, weights are loaded
into transformers' own classes or read by the converters with ``torch.load(weights_only=True)``, and with
``HF_HUB_OFFLINE=1`` no network call is made.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PretrainedConfig,
    SiglipModel,
    SiglipVisionModel,
)

from . import text_attachment
from .core import convert_checkpoint, convert_checkpoint_with_report
from .model_loading import _missing_model_error, hub_is_offline, load_clip_model
from ..modeling import LLM2CLIPConfig, LLM2CLIPModel, LLM2CLIPTextConfig, LLM2CLIPTextModel
from ..modeling.configuration_llm2clip import vision_family
from ..modeling.processing_llm2clip import image_processor_for
from .._moved import moved_names

logger = logging.getLogger(__name__)

SUPPORTED_SOURCES = (
    "a transformers CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipModel or SiglipVisionModel "
    "(folder or Hub id)",
    "an open_clip / EVA-CLIP / official LLM2CLIP eva_clip checkpoint file (.pt, .pth, .bin)",
    "an LLM2CLIP model (saved by this package: save_pretrained, `llm2clip-hf train --stage clip`, `llm2clip-hf "
    "convert`; or a published LLM2CLIP Hub repo)",
)
# model_type of the transformers checkpoints whose vision side is taken, and the class their weights load into.
_TRANSFORMERS_SOURCES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip",
                         "siglip_vision_model": "siglip"}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
ADAPTER_POLICIES = ("auto", "keep", "new")
# SigLIP's initial temperature and bias for the sigmoid loss (used when a SigLIP source has none of its own).
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def supported_sources_text() -> str:
    return "; ".join(SUPPORTED_SOURCES)


def llm2clip_from_pretrained_vision(
    source: str | os.PathLike,
    text_model: LLM2CLIPTextModel | None = None,
    *,
    text_embedding_dim: int | None = None,
    embed_text_model: bool = True,
    projection_dim: int | None = None,
    adapter: str = "auto",
    vision_num_heads: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **config_overrides: Any,
) -> LLM2CLIPModel:
    """An :class:`LLM2CLIPModel` whose image side comes from a pretrained model, for stage-2 training.

    ``source`` (see ``SUPPORTED_SOURCES``):

    - a transformers ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``SiglipModel`` /
      ``SiglipVisionModel`` folder or Hub id. The vision tower's weights and CLIP's ``visual_projection`` are kept
      exactly (image features equal the source's ``get_image_features``); the text tower is dropped. The source's
      ``logit_scale`` is kept when it has one (it is the temperature its image features were trained with), and a
      SigLIP source's ``logit_bias`` too; a SigLIP source without them gets SigLIP's sigmoid-loss initialisation
      (``logit_scale`` ln 10, ``logit_bias`` -10). Pass ``logit_scale_init_value=`` / ``logit_bias_init_value=`` to
      start them fresh instead. Training clamps ``logit_scale`` after every step to ``logit_scale_max``: by default
      ln 100, or the source's own value where that is larger (SigLIP checkpoints: ~ln 112), so the pair is kept.
      A ``projection_dim`` other than the source projection's width (or a source without projection:
      ``CLIPVisionModel``, whose projection width defaults to its config's ``projection_dim``) gives a new,
      randomly initialised projection (logged). SigLIP towers have no projection: the MAP head's output is the
      image feature (``vision_projection="linear"`` adds one).
    - an open_clip / EVA-CLIP / official LLM2CLIP ``.pt`` file, converted by :mod:`llm2clip_hf.conversion`.
    - an LLM2CLIP model (ours, or a published Hub repo through the converter): loaded as is, to continue training.

    The text adapter is new when the source has none or when its input width differs from the LLM's
    (``adapter="auto"``, logged); ``adapter="keep"`` makes a width difference an error instead, ``"new"`` always
    starts a new adapter. The LLM's width comes from ``text_model`` (or ``text_embedding_dim`` without one).
    With ``text_model`` and ``embed_text_model`` (default) the text encoder is embedded (see
    :func:`.text_attachment.attach_text_model`); otherwise the model reads precomputed LLM embeddings.

    ``config_overrides`` go to :class:`LLM2CLIPConfig` (``adapter_num_blocks``, ``vision_projection``, ...) for
    transformers sources and to the converter for checkpoint files. The image processor saved with the result
    follows the tower family; a transformers source's own ``preprocessor_config.json`` is compared with it and a
    difference is logged as a warning (never applied silently).

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPTextModel, llm2clip_from_pretrained_vision

        text_model = LLM2CLIPTextModel.from_pretrained("my-text-encoder")
        model = llm2clip_from_pretrained_vision("openai/clip-vit-base-patch16", text_model, embed_text_model=False)
        print(model.config.text_embedding_dim == text_model.config.hidden_size)  # a new adapter for this LLM
        ```
    """
    return build_from_pretrained_vision(
        source, text_model, text_embedding_dim=text_embedding_dim, embed_text_model=embed_text_model,
        projection_dim=projection_dim, adapter=adapter, vision_num_heads=vision_num_heads, revision=revision,
        token=token, **config_overrides)[0]


def build_from_pretrained_vision(source: str | os.PathLike, text_model: LLM2CLIPTextModel | None = None, *,
                                 text_embedding_dim: int | None = None, embed_text_model: bool = True,
                                 projection_dim: int | None = None, adapter: str = "auto",
                                 vision_num_heads: int | None = None, revision: str | None = None,
                                 token: str | bool | None = None, **config_overrides: Any,
                                 ) -> tuple[LLM2CLIPModel, dict[str, Any]]:
    """:func:`llm2clip_from_pretrained_vision` (same arguments), also returning what was done (for the CLI's
    report): ``{"source_kind", "family", "adapter": "checkpoint" | "new", "adapter_reason"}``."""
    if adapter not in ADAPTER_POLICIES:
        raise ValueError(f"adapter must be one of {ADAPTER_POLICIES}, got {adapter!r}.")
    width = _llm_width(text_model, text_embedding_dim)
    source = str(source)
    hub_kwargs = {k: v for k, v in {"revision": revision, "token": token}.items() if v is not None}
    path = Path(source).expanduser()
    if path.is_file():
        model, info = _from_checkpoint_file(path, width, vision_num_heads, projection_dim, config_overrides)
    else:
        if source.endswith(_CHECKPOINT_SUFFIXES) and not path.exists():
            raise FileNotFoundError(f"Checkpoint file {source} does not exist.")
        config_dict = _read_config_dict(source, hub_kwargs)
        kind = _source_kind(source, config_dict)
        if kind == "transformers":
            if vision_num_heads is not None:
                raise ValueError("vision_num_heads applies to .pt checkpoints only; a transformers config already "
                                 "names its heads.")
            model, info = _from_transformers(source, config_dict, text_model, width, embed_text_model,
                                             projection_dim, hub_kwargs, config_overrides)
        else:
            given = sorted(config_overrides) + [name for name, value in (
                ("projection_dim", projection_dim), ("vision_num_heads", vision_num_heads)) if value is not None]
            if given:
                raise ValueError(
                    f"{source} is an LLM2CLIP model, loaded as it was saved; {given} apply only to pretrained CLIP / "
                    "SigLIP sources and checkpoint files.")
            if kind == "llm2clip":
                model = load_clip_model(source, **hub_kwargs)
            else:  # a published LLM2CLIP repo with its own (never run) remote code
                model = convert_checkpoint(source, **hub_kwargs)
            info = {"source_kind": kind, "adapter": "checkpoint", "adapter_reason": "the checkpoint's adapter"}
    info["family"] = vision_family(model.config.vision_config)
    if info["adapter"] == "checkpoint" and (width is not None or adapter == "new"):
        width = model.config.text_embedding_dim if width is None else width
        if adapter == "new" or model.config.text_embedding_dim != width:
            if adapter == "keep":
                raise ValueError(text_attachment.adapter_width_error(
                    model.config.text_embedding_dim, width, getattr(text_model, "name_or_path", None), source))
            reason = ("adapter='new'" if adapter == "new" else
                      f"the checkpoint's adapter takes {model.config.text_embedding_dim}-d embeddings, the LLM "
                      f"gives {width}-d ones")
            text_attachment.replace_text_adapter(model, width)
            info.update(adapter="new", adapter_reason=reason)
    if text_model is not None:
        if embed_text_model:
            text_attachment.attach_text_model(model, text_model)
        elif info["adapter"] == "new":
            model.config.text_model_name_or_path = text_model.name_or_path
    if info["adapter"] == "new":
        logger.info("%s: new text adapter for %d-d LLM embeddings (%s).", source, model.config.text_embedding_dim,
                    info["adapter_reason"])
    else:
        logger.info("%s: text adapter taken from the checkpoint (%d-d LLM embeddings).", source,
                    model.config.text_embedding_dim)
    model.config._name_or_path = source  # the model card names it as the base model
    return model, info


def assemble(source: str | os.PathLike, text_model: LLM2CLIPTextModel, output_dir: str | os.PathLike,
             **kwargs: Any) -> dict[str, Any]:
    """``llm2clip-hf assemble``: the image side and adapter of ``source`` with ``text_model`` embedded, saved to
    ``output_dir`` (remote code, processor: ready for ``pipeline("zero-shot-image-classification")``).

    The source's adapter is kept: a width that differs from the LLM's is an error naming both. A source without an
    adapter (a plain CLIP / SigLIP) gets a new, untrained one, with a warning. Returns a summary.

    Example:
        ```python
        from llm2clip_hf import load_text_model
        from llm2clip_hf.conversion import assemble

        text_model = load_text_model("microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned")
        print(assemble("microsoft/LLM2CLIP-Openai-L-14-336", text_model, "llm2clip-openai-l14-336"))
        ```
    """
    model, info = build_from_pretrained_vision(source, text_model, adapter="keep", **kwargs)
    if info["adapter"] == "new":
        logger.warning("%s has no text adapter: the assembled model's adapter is new and untrained, so its text "
                       "features are random until trained (`llm2clip-hf train --stage clip --vision-model %s`).",
                       source, source)
    model.save_pretrained(output_dir)
    return {"output_dir": str(output_dir), "source": str(source), "source_kind": info["source_kind"],
            "vision_family": info["family"], "text_model": text_model.name_or_path, "adapter": info["adapter"],
            "text_embedding_dim": model.config.text_embedding_dim, "projection_dim": model.config.projection_dim}


def _llm_width(text_model: LLM2CLIPTextModel | None, text_embedding_dim: int | None) -> int | None:
    if text_model is None:
        return text_embedding_dim
    width = text_model.config.hidden_size
    if text_embedding_dim is not None and text_embedding_dim != width:
        raise ValueError(f"text_embedding_dim={text_embedding_dim} does not match the text model's hidden size "
                         f"{width}; leave text_embedding_dim unset when passing a text model.")
    return width


# ------------------------------------------------------------------------------------------------ sources
def _read_config_dict(source: str, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The source's raw config.json (no class instantiated, so no remote code), or a clear loading error."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{source} is a folder without config.json, so it is none of the supported vision sources: "
                         f"{supported_sources_text()}.")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, local_files_only=hub_is_offline(), **hub_kwargs)
    except (OSError, ValueError) as error:
        raise _missing_model_error(source, "vision model", error) from error
    return config_dict


def _source_kind(source: str, config_dict: dict[str, Any]) -> str:
    model_type = config_dict.get("model_type")
    if model_type == LLM2CLIPConfig.model_type:
        return "llm2clip"
    named = [*(config_dict.get("architectures") or []), *(config_dict.get("auto_map") or {}).values()]
    if any("llm2clip" in str(name).lower() for name in named) or model_type == "evaclip":
        return "published-llm2clip"  # the published EVA02 repos' config.json names an eva_clip model
    if model_type in _TRANSFORMERS_SOURCES:
        return "transformers"
    if model_type == LLM2CLIPTextConfig.model_type:
        raise ValueError(f"{source} is an LLM2CLIP text encoder, not a vision model: pass it as the text model "
                         f"(--text-model). Supported vision sources: {supported_sources_text()}.")
    architectures = ", ".join(config_dict.get("architectures") or []) or "no architectures listed"
    raise ValueError(
        f"{source} holds a {model_type!r} model ({architectures}), which is not a supported vision source. "
        f"Supported: {supported_sources_text()}. Other towers (SigLIP2 NaFlex, DINOv2, ...) are not supported.")


def _from_transformers(source: str, config_dict: dict[str, Any], text_model: LLM2CLIPTextModel | None,
                       width: int | None, embed_text_model: bool, projection_dim: int | None,
                       hub_kwargs: dict[str, Any], config_overrides: dict[str, Any]):
    if width is None:
        raise ValueError(f"{source} has no text adapter: pass text_model (or text_embedding_dim) so a new adapter "
                         "can be sized for the LLM's embeddings.")
    model_type = config_dict["model_type"]
    family = _TRANSFORMERS_SOURCES[model_type]
    architectures = config_dict.get("architectures") or []
    if model_type == "clip":
        source_class = CLIPModel
    elif model_type == "siglip":
        source_class = SiglipModel
    elif model_type == "clip_vision_model":
        source_class = (CLIPVisionModelWithProjection if "CLIPVisionModelWithProjection" in architectures
                        else CLIPVisionModel)
    else:
        source_class = SiglipVisionModel
    if config_dict.get("auto_map"):
        logger.warning("%s declares remote code (auto_map); it is not run: the weights are read into transformers' "
                       "own %s.", source, source_class.__name__)
    try:
        loaded, loading_info = source_class.from_pretrained(
            source, dtype=torch.float32, output_loading_info=True, trust_remote_code=False,
            local_files_only=hub_is_offline(), **hub_kwargs)
    except (OSError, ValueError) as error:
        raise _missing_model_error(source, f"{source_class.__name__}", error) from error
    except RuntimeError as error:  # transformers' report of mis-shaped weights
        raise ValueError(f"{source}: its weights do not fit its config as a {source_class.__name__}: "
                         f"{error}") from error
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{source} lacks weights of its {source_class.__name__}: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}. Is the checkpoint complete?")
    tower = loaded if source_class in (CLIPVisionModel, SiglipVisionModel) else loaded.vision_model
    source_projection = getattr(loaded, "visual_projection", None)
    vision_config = type(tower.config).from_dict(tower.config.to_dict())
    vision_config.architectures = None

    settings: dict[str, Any] = {}
    if family == "clip":
        source_width = source_projection.out_features if source_projection is not None else None
        default_width = source_width or getattr(tower.config, "projection_dim", None)
        settings["projection_dim"] = projection_dim if projection_dim is not None else default_width
    elif projection_dim is not None:
        settings["projection_dim"] = projection_dim
    scale = getattr(loaded, "logit_scale", None)
    bias = getattr(loaded, "logit_bias", None)
    if scale is not None:
        settings["logit_scale_init_value"] = float(scale.detach().reshape(()))
    elif family == "siglip":
        settings["logit_scale_init_value"] = SIGLIP_LOGIT_SCALE_INIT
    if bias is not None:
        settings["logit_bias_init_value"] = float(bias.detach().reshape(()))
    elif family == "siglip":
        settings["logit_bias_init_value"] = SIGLIP_LOGIT_BIAS_INIT
    settings.update(config_overrides)  # the caller's choices win (e.g. a fresh logit_scale_init_value)

    if text_model is not None:
        model = LLM2CLIPModel.from_text_model(text_model, vision_config, embed_text_model=False, **settings)
    else:
        model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=vision_config, text_embedding_dim=width, **settings))
    with torch.no_grad():
        model.vision_model.load_state_dict(tower.state_dict(), strict=True)
        projection_note = None
        if model.visual_projection is not None:
            if source_projection is None:
                projection_note = "the source has no image projection"
            elif source_projection.weight.shape != model.visual_projection.weight.shape:
                projection_note = (f"projection_dim {model.config.projection_dim} differs from the source's "
                                   f"{source_projection.out_features}")
            else:
                model.visual_projection.weight.copy_(source_projection.weight)
            if projection_note:
                logger.info("%s: new image projection %d -> %d (%s).", source, vision_config.hidden_size,
                            model.config.projection_dim, projection_note)
        if scale is not None and "logit_scale_init_value" not in config_overrides:
            model.logit_scale.copy_(scale.detach().reshape(()))
        if bias is not None and model.logit_bias is not None and "logit_bias_init_value" not in config_overrides:
            model.logit_bias.copy_(bias.detach().reshape(()))
    del loaded, tower
    _compare_image_processor(source, model.config.vision_config, hub_kwargs)
    image_projection = "none" if model.visual_projection is None else ("new" if projection_note else "source")
    return model, {"source_kind": f"transformers-{source_class.__name__}", "adapter": "new",
                   "adapter_reason": "the source has no text adapter", "image_projection": image_projection}


def _from_checkpoint_file(path: Path, width: int | None, vision_num_heads: int | None, projection_dim: int | None,
                          config_overrides: dict[str, Any]):
    if path.suffix not in _CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path} is a file of an unsupported kind; supported vision sources: "
                         f"{supported_sources_text()}.")
    overrides = dict(config_overrides)
    if vision_num_heads is not None:
        overrides["vision_num_heads"] = vision_num_heads
    if projection_dim is not None:
        overrides["projection_dim"] = projection_dim
    model, report = convert_checkpoint_with_report(str(path), text_embedding_dim=width, **overrides)
    reason = "the checkpoint's adapter" if report.adapter == "checkpoint" else "the checkpoint has no text adapter"
    return model, {"source_kind": "checkpoint-file", "adapter": report.adapter, "adapter_reason": reason}


def _compare_image_processor(source: str, vision_config: Any, hub_kwargs: dict[str, Any]) -> None:
    """Warn when the source's own preprocessing differs from the family preprocessing saved with the new model."""
    from ..modeling.hub_files import optional_file

    found = optional_file(source, "preprocessor_config.json", **hub_kwargs)
    if found is None:
        return
    import json

    theirs = json.loads(Path(found).read_text())
    ours = image_processor_for(vision_config)
    differences = []
    for key in ("image_mean", "image_std"):
        if key in theirs and not _close(theirs[key], getattr(ours, key)):
            differences.append(f"{key} {theirs[key]} (source) vs {list(getattr(ours, key))}")
    their_size = _output_size(theirs)
    our_size = _output_size(ours.to_dict())
    if their_size is not None and their_size != our_size:
        differences.append(f"image size {their_size} (source) vs {our_size}")
    if differences:
        logger.warning(
            "%s's preprocessor_config.json differs from the %s preprocessing saved with this model: %s. The model "
            "keeps its family's preprocessing (training and the saved processor use it); edit the saved "
            "preprocessor_config.json if the tower needs the source's.", source,
            vision_family(vision_config), "; ".join(differences))


def _close(a: Any, b: Any) -> bool:
    a, b = list(a) if isinstance(a, (list, tuple)) else [a] * 3, list(b)
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(a, b))


def _output_size(settings: dict[str, Any]) -> tuple[int, int] | None:
    """The (height, width) an image processor config produces: its crop when it crops, else its resize target."""
    def as_pair(value):
        if isinstance(value, int):
            return value, value
        if isinstance(value, dict):
            if "height" in value and "width" in value:
                return int(value["height"]), int(value["width"])
            if "shortest_edge" in value:
                return int(value["shortest_edge"]), int(value["shortest_edge"])
        return None

    if settings.get("do_center_crop") and settings.get("crop_size") is not None:
        return as_pair(settings["crop_size"])
    return as_pair(settings.get("size")) if settings.get("size") is not None else None

__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)


__all__ = ["SUPPORTED_SOURCES", "assemble", "build_from_pretrained_vision", "llm2clip_from_pretrained_vision"]
