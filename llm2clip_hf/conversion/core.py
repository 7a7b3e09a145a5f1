"""Building an :class:`LLM2CLIPModel` from a checkpoint of any official layout (see :mod:`.layouts`)."""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, SiglipVisionConfig
from transformers.initialization import no_init_weights

from ..modeling import EVA02VisionConfig, LLM2CLIPConfig, LLM2CLIPModel
from .io import CheckpointConversionError, LoadedCheckpoint, load_checkpoint_source, load_official_state_dict
from .adapter_layouts import AdapterLayout, dropped_category, find_adapter, infer_adapter, map_adapter_key
from .layouts import VisionLayout, default_heads, detect_layout

logger = logging.getLogger("llm2clip_hf.conversion")

VISION_CONFIG_BY_FAMILY = {"eva02": EVA02VisionConfig, "clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
# Generic PretrainedConfig arguments that are no tower settings.
_GENERIC = {"self", "kwargs", "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
            "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type"}
_TOP_ONLY = {"projection_dim"}  # also a CLIPVisionConfig argument, but the joint width is meant
_SCALARS = ("logit_scale", "logit_bias")


@dataclass
class ConversionReport:
    """What the converter found and did (``llm2clip-hf convert`` prints it)."""

    source: str
    source_kind: str  # "file", "folder", "hub" or "state_dict"
    files: list[str]
    layout: str
    layout_description: str
    family: str
    adapter: str  # "checkpoint" or "new"
    adapter_origin: str | None
    adapter_l2_normalize: bool
    logit_bias: bool
    source_dtypes: list[str]
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict (JSON-serialisable), as ``llm2clip-hf convert`` prints it."""
        return asdict(self)


def _config_keys(config_class) -> set[str]:
    return set(inspect.signature(config_class.__init__).parameters) - _GENERIC


def build_config(layout: VisionLayout, state: Mapping[str, torch.Tensor], adapter: AdapterLayout | None, *,
                 vision_num_heads: int | None, text_embedding_dim: int | None, hf_config: dict[str, Any] | None,
                 overrides: dict[str, Any], notes: list[str]) -> LLM2CLIPConfig:
    """The model config: every size from tensor shapes, the family's computation settings, then ``overrides``."""
    hf_vision = dict((hf_config or {}).get("vision_config") or {})
    vision, top = layout.infer(state, hf_vision)
    if adapter is not None:
        sizes = infer_adapter(state, adapter)
        if text_embedding_dim is not None and text_embedding_dim != sizes["text_embedding_dim"]:
            notes.append(f"text_embedding_dim={text_embedding_dim} ignored: the checkpoint's adapter takes "
                         f"{sizes['text_embedding_dim']}-d LLM embeddings (replace the adapter to use another LLM)")
            logger.warning("The checkpoint's text adapter takes %d-d LLM embeddings; text_embedding_dim=%d is "
                           "ignored (the adapter is kept as trained).", sizes["text_embedding_dim"], text_embedding_dim)
        top.update(sizes, adapter_l2_normalize=adapter.l2_normalize)
    else:
        if text_embedding_dim is None:
            raise CheckpointConversionError(
                f"This {layout.name} checkpoint has no text adapter (none of its keys starts with text.text_adaptor., "
                "text.text_proj.text_adaptor. or text_adapter.adaptor.), so a new, untrained one is created: pass "
                "text_embedding_dim=<hidden size of the LLM whose embeddings it will read> (--text_embedding_dim; "
                "4096 for Llama-3-8B, 2048 for Llama-3.2-1B)."
            )
        top["text_embedding_dim"] = text_embedding_dim
    if "logit_bias" in state:
        top["logit_bias_init_value"] = float(state["logit_bias"].float().reshape(()))

    vision_class = VISION_CONFIG_BY_FAMILY[layout.family]
    vision_keys = _config_keys(vision_class) - _TOP_ONLY
    top_keys = set(inspect.signature(LLM2CLIPConfig.__init__).parameters) - {"self", "kwargs", "vision_config",
                                                                             "text_config"}
    for key, value in overrides.items():
        if key in top_keys:
            top[key] = value
        elif key in vision_keys:
            vision[key] = value
        else:
            raise TypeError(f"Unknown config override {key!r}; vision settings: {sorted(vision_keys)}, "
                            f"model settings: {sorted(top_keys)}.")
    width = vision["hidden_size"]
    heads = vision_num_heads if vision_num_heads is not None else vision.get("num_attention_heads",
                                                                             default_heads(width))
    if heads < 1 or width % heads:
        raise CheckpointConversionError(
            f"vision_num_heads={heads} does not divide the vision width {width}; official towers use head width 64 "
            f"({default_heads(width)} heads for this checkpoint)."
        )
    vision["num_attention_heads"] = heads
    try:
        vision_config = vision_class(**vision)
        return LLM2CLIPConfig(vision_config=vision_config, **top)
    except ValueError as error:
        raise CheckpointConversionError(str(error)) from error


def resize_grid(pos: torch.Tensor, grid: int, prefix_tokens: int) -> torch.Tensor:
    """Bicubically resize a ``(..., prefix + g*g, dim)`` position embedding to ``grid x grid`` patches (the prefix
    tokens kept), as eva_clip / timm resize them."""
    squeeze = pos.dim() == 2
    pos = pos.unsqueeze(0) if squeeze else pos
    old = round((pos.shape[1] - prefix_tokens) ** 0.5)
    if old == grid:
        return pos.squeeze(0) if squeeze else pos
    prefix, patches = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    out = torch.cat((prefix, patches), dim=1)
    return out.squeeze(0) if squeeze else out


def convert_state_dict(state: Mapping[str, torch.Tensor], model: LLM2CLIPModel, layout: VisionLayout | None = None,
                       adapter: AdapterLayout | None = None,
                       dropped: dict[str, list[str]] | None = None,
                       new: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rename ``state`` for ``model`` (float32), resize the position embedding to its grid, and check completeness:
    the error lists the missing (our names), unexpected (the checkpoint's) and shape-mismatched keys. ``new``:
    tensors that do not come from the checkpoint (a new text adapter)."""
    layout = layout or detect_layout(state)
    adapter = adapter if adapter is not None else find_adapter(state)
    dropped = dropped if dropped is not None else defaultdict(list)
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    prepared = layout.prepare(dict(state)) if layout.prepare else state
    for key, tensor in prepared.items():
        if layout.is_ignored(key):
            continue
        if key in _SCALARS or key == "text.logit_scale":
            target = key.replace("text.", "")
            if target in expected:
                converted[target] = tensor.to(torch.float32, copy=True).reshape(())
            elif target == "logit_bias":  # a SigLIP bias the config has no room for (vision_projection override)
                unexpected.append(key)
            continue
        mapped = layout.map_key(key, tensor)
        if mapped is None and adapter is not None:
            target = map_adapter_key(key, adapter)
            mapped = None if target is None else [(target, tensor)]
        if mapped is None:
            category = dropped_category(key)
            if category is not None:
                dropped[category].append(key)
            else:
                unexpected.append(key)
            continue
        if any(target not in expected for target, _ in mapped):
            unexpected.append(key)
            continue
        for target, value in mapped:
            converted[target] = value.to(torch.float32, copy=True).contiguous()  # own memory, not the mmap
    position = layout.position_key
    if position in converted and position in expected:
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        converted[position] = resize_grid(converted[position], grid, layout.prefix_tokens)
    # Scalars the checkpoint lacks keep the config's value (a vision-only export has no logit_scale; a logit_bias
    # appears only when asked for with logit_bias_init_value).
    for name in _SCALARS:
        if name in expected and name not in converted:
            converted[name] = torch.tensor(float(getattr(model.config, f"{name}_init_value")))
    converted.update(new or {})
    missing = sorted(set(expected) - set(converted))
    mismatched = [f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in sorted(converted) if key in expected and converted[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        raise CheckpointConversionError(
            f"The checkpoint does not match the LLM2CLIP layout ({layout.name}).\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {sorted(unexpected)}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}"
        )
    return converted


def _key_groups(keys: list[str]) -> list[str]:
    """Keys with layer indices folded (``resblocks.N.ln_1.weight``), so a log line names every dropped key."""
    groups: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        groups[re.sub(r"\.\d+\.", ".N.", key)].add(key)
    return [f"{group} (x{len(members)})" if len(members) > 1 else group for group, members in sorted(groups.items())]


def model_from_state_dict(state: Mapping[str, torch.Tensor], *, source: str = "<state dict>",
                          source_kind: str = "state_dict", files: list[str] | None = None,
                          hf_config: dict[str, Any] | None = None, vision_num_heads: int | None = None,
                          text_embedding_dim: int | None = None,
                          **config_overrides: Any) -> tuple[LLM2CLIPModel, ConversionReport]:
    """Convert an already loaded state dict (any layout of :mod:`.layouts`); returns the model and a report."""
    layout = detect_layout(state)
    adapter = find_adapter(state)
    notes: list[str] = []
    config = build_config(layout, state, adapter, vision_num_heads=vision_num_heads,
                          text_embedding_dim=text_embedding_dim, hf_config=hf_config, overrides=config_overrides,
                          notes=notes)
    with no_init_weights():  # every weight is loaded next (or, for a new adapter, initialised just below)
        model = LLM2CLIPModel(config)
    if adapter is None:
        model.text_adapter.apply(model._init_weights)  # new and untrained: eva_clip's Linear / LayerNorm init
    dropped: dict[str, list[str]] = defaultdict(list)
    new = None if adapter is not None else {f"text_adapter.{k}": v for k, v in model.text_adapter.state_dict().items()}
    converted = convert_state_dict(state, model, layout, adapter, dropped, new)
    model.load_state_dict(converted, strict=True, assign=True)
    for category, keys in dropped.items():
        logger.info("%s: dropped %d keys of the %s, which LLM2CLIPModel does not use: %s.", source, len(keys),
                    category, ", ".join(_key_groups(keys)))
    if adapter is None:
        logger.info("%s has no text adapter: a new, untrained adapter for %d-d LLM embeddings was created.", source,
                    config.text_embedding_dim)
    report = ConversionReport(
        source=source, source_kind=source_kind, files=list(files or []), layout=layout.name,
        layout_description=layout.description, family=layout.family,
        adapter="checkpoint" if adapter is not None else "new",
        adapter_origin=adapter.origin if adapter is not None else None,
        adapter_l2_normalize=config.adapter_l2_normalize, logit_bias=model.logit_bias is not None,
        source_dtypes=sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
        dropped={category: len(keys) for category, keys in dropped.items()}, notes=notes,
    )
    return model.float().eval(), report


def convert_checkpoint_with_report(source: str | os.PathLike, *, vision_num_heads: int | None = None,
                                   text_embedding_dim: int | None = None, revision: str | None = None,
                                   token: str | bool | None = None, cache_dir: str | None = None,
                                   **config_overrides: Any) -> tuple[LLM2CLIPModel, ConversionReport]:
    """:func:`convert_checkpoint`, also returning a :class:`ConversionReport`."""
    loaded: LoadedCheckpoint = load_checkpoint_source(source, revision=revision, token=token, cache_dir=cache_dir)
    return model_from_state_dict(
        loaded.state, source=loaded.source, source_kind=loaded.kind, files=loaded.files, hf_config=loaded.config,
        vision_num_heads=vision_num_heads, text_embedding_dim=text_embedding_dim, **config_overrides)


def convert_checkpoint(source: str | os.PathLike, *, vision_num_heads: int | None = None,
                       text_embedding_dim: int | None = None, revision: str | None = None,
                       token: str | bool | None = None, cache_dir: str | None = None,
                       **config_overrides: Any) -> LLM2CLIPModel:
    """An :class:`LLM2CLIPModel` (float32, eval) from any official LLM2CLIP checkpoint.

    ``source`` is a checkpoint file (``.pt`` / ``.pth`` / ``.bin`` read with ``torch.load(weights_only=True)``,
    ``.safetensors``), a folder (an eva_clip ``.pt`` in it when there is one, else ``model.safetensors`` /
    ``pytorch_model.bin``, sharded or not, with its ``config.json``), or a Hub id (``snapshot_download``; from the
    cache only under ``HF_HUB_OFFLINE=1``). The layout (EVA02, OpenAI CLIP or timm SigLIP tower in eva_clip format;
    the Hugging Face LLM2CLIP-Openai / -EVA02 exports) is detected from the keys, every size from tensor shapes,
    heads default to width // 64 (16 for the 1152-wide So400m). ``text_embedding_dim`` sizes a new, untrained adapter
    when the checkpoint has none (open_clip / EVA-CLIP pretrained files); a checkpoint's own adapter is kept.
    ``config_overrides`` go to the vision or the model config (``image_size=`` resizes the position embedding
    bicubically). Every key must map, or be a known text-tower / LLM key (dropped, logged): otherwise the error
    lists the missing, unexpected and shape-mismatched keys.

    Example:
        ```python
        from llm2clip_hf.conversion import convert_checkpoint

        model = convert_checkpoint("microsoft/LLM2CLIP-EVA02-L-14-336")  # its eva_clip .pt; sizes from the shapes
        model.save_pretrained("llm2clip-eva02-image-side")
        ```
    """
    model, _ = convert_checkpoint_with_report(source, vision_num_heads=vision_num_heads,
                                              text_embedding_dim=text_embedding_dim, revision=revision, token=token,
                                              cache_dir=cache_dir, **config_overrides)
    return model


def convert_hf_checkpoint(folder_or_id: str | os.PathLike, **kwargs: Any) -> LLM2CLIPModel:
    """A published Hugging Face LLM2CLIP repo (folder or Hub id) as an :class:`LLM2CLIPModel`; its remote code is
    never run. Same keywords as :func:`convert_checkpoint`."""
    if os.path.isfile(folder_or_id):
        raise CheckpointConversionError(f"{folder_or_id} is a file; convert_hf_checkpoint takes a repo folder or Hub "
                                        "id (convert_checkpoint takes both).")
    return convert_checkpoint(folder_or_id, **kwargs)


def convert_eva_clip_checkpoint(path: str | os.PathLike, *, vision_num_heads: int | None = None,
                                text_embedding_dim: int | None = None, **config_overrides: Any) -> LLM2CLIPModel:
    """An :class:`LLM2CLIPModel` (float32, eval) from an eva_clip-format checkpoint file (``.pt``): an official
    LLM2CLIP model (EVA02, OpenAI CLIP or timm SigLIP tower with its text adapter) or an open_clip / EVA-CLIP
    pretrained file without adapter (then ``text_embedding_dim`` is required). See :func:`convert_checkpoint`."""
    state = load_official_state_dict(path)
    model, _ = model_from_state_dict(state, source=str(path), source_kind="file", files=[str(path)],
                                     vision_num_heads=vision_num_heads, text_embedding_dim=text_embedding_dim,
                                     **config_overrides)
    return model


def infer_config(state: Mapping[str, torch.Tensor], vision_num_heads: int | None = None,
                 text_embedding_dim: int | None = None, **config_overrides: Any) -> LLM2CLIPConfig:
    """The :class:`LLM2CLIPConfig` a state dict converts to (sizes from shapes; see :func:`convert_checkpoint`)."""
    return build_config(detect_layout(state), state, find_adapter(state), vision_num_heads=vision_num_heads,
                        text_embedding_dim=text_embedding_dim, hf_config=None, overrides=config_overrides, notes=[])
