"""The vision-tower layouts of the official LLM2CLIP checkpoints, and how each maps onto :class:`LLM2CLIPModel`
(the text side: :mod:`.adapter_layouts`).

A layout is recognised from its keys, reads every size from tensor shapes, and renames (and where the two sides
store a weight differently, splits, merges or transposes) each key. Sources, per layout:

* ``eva_clip-eva02``: microsoft/LLM2CLIP ``llm2clip/eva_clip/eva_vit_model.py`` (``EVAVisionTransformer``) as
  ``CustomCLIP.visual`` in ``llm2clip/eva_clip/model.py``; also BAAI's EVA02-CLIP ``.pt`` files (same module).
* ``eva_clip-openai-clip``: ``VisionTransformer`` of ``llm2clip/eva_clip/transformer.py`` (``model_configs/
  OpenaiCLIP-*.json``): ``conv1`` (no bias), ``class_embedding``, ``positional_embedding``, ``ln_pre``,
  ``transformer.resblocks.N`` (``nn.MultiheadAttention`` ``in_proj_weight`` = rows q, k, v), ``ln_post`` on the
  class token, ``x @ proj``.
* ``eva_clip-timm-siglip``: ``TimmModel`` of ``llm2clip/eva_clip/timm_model.py`` (``trunk`` = timm
  ``vision_transformer.VisionTransformer``, ``model_configs/Llama3.1-8B-Siglip2-So-L-14-224.json``: pool ``map``,
  proj ``none``, so ``visual.head`` is empty): timm ``Attention.qkv`` rows q, k, v; final ``norm`` before the
  pool = transformers' ``post_layernorm``; ``AttentionPoolLatent`` (``latent``, ``q``, ``kv`` rows k then v,
  ``proj``, then ``x + mlp(norm(x))``) = transformers' ``SiglipMultiheadAttentionPoolingHead`` (``probe``,
  ``nn.MultiheadAttention`` ``in_proj`` = cat(q, kv), ``out_proj``, ``layernorm``, ``mlp``).
* ``hf-openai-clip``: the ``LLM2CLIP-Openai-*`` Hub repos (a modified transformers-4.40 ``CLIPModel``): transformers'
  CLIP vision naming under ``vision_model.``, ``visual_projection`` without bias.
* ``hf-eva02``: the ``LLM2CLIP-EVA02-*`` Hub repos' ``pytorch_model.bin`` (``modeling_evaclip.py``). Names inferred
  from the EVA-CLIP ``convert_evaclip_pytorch_to_hf.py`` renaming (``cls_token`` -> ``embeddings.class_embedding``,
  ``norm1`` -> ``layer_norm1``, ``attn`` -> ``self_attn``, ``attn.proj`` -> ``out_proj``, ``norm`` ->
  ``post_layernorm``, ``head`` -> ``visual_projection``); keys that do not map are listed in the error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .io import CheckpointConversionError

# Heads of the towers whose head width is not 64 (SigLIP So400m: 1152 = 16 x 72).
KNOWN_HEADS = {1152: 16}


def default_heads(width: int) -> int:
    """Attention heads of a tower of this width when nothing names them: the published towers' known counts (1152
    -> 16 for So400m), else ``width // 64``."""
    return KNOWN_HEADS.get(width, max(1, width // 64))


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a full match of the source key) -> ``target`` (``re`` template; ``{qkv}`` for ``split3``)."""

    pattern: str
    target: str
    transform: str | None = None  # None, "split3", "T", "squeeze0", "unsqueeze0", "token"

    def apply(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return None
        target = match.expand(self.target)
        if self.transform == "split3":
            if tensor.shape[0] % 3:
                return [(target.replace("{qkv}", "qkv"), tensor)]  # reported as unexpected by the caller
            return [(target.replace("{qkv}", name), part) for name, part in zip("qkv", tensor.chunk(3, dim=0))]
        if self.transform == "T":
            tensor = tensor.t()
        elif self.transform == "squeeze0":
            tensor = tensor.squeeze(0) if tensor.dim() == 3 and tensor.shape[0] == 1 else tensor
        elif self.transform == "unsqueeze0":
            tensor = tensor.unsqueeze(0)
        elif self.transform == "token":
            tensor = tensor.reshape(1, 1, -1)
        return [(target, tensor)]


@dataclass(frozen=True)
class VisionLayout:
    """One vision-tower layout: how it is recognised, sized and renamed."""

    name: str
    family: str  # the LLM2CLIPConfig tower family: "eva02", "clip" or "siglip"
    description: str
    signature: tuple[str, ...]  # all present -> this layout
    rules: tuple[Rule, ...]
    infer: Callable[[Mapping[str, torch.Tensor], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
    position_key: str  # our name of the position embedding (resized on an image_size override)
    prefix_tokens: int  # tokens before the patch grid in it (class token)
    ignored: str | None = None  # buffers recomputed by the model, never loaded
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def map_key(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        for rule in self.rules:
            mapped = rule.apply(key, tensor)
            if mapped is not None:
                return mapped
        return None

    def is_ignored(self, key: str) -> bool:
        return self.ignored is not None and re.fullmatch(self.ignored, key) is not None


# ------------------------------------------------------------------------------------------------ helpers
def count_indices(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _require(state: Mapping[str, torch.Tensor], layout: str, keys: tuple[str, ...]) -> None:
    absent = [k for k in keys if k not in state]
    if absent:
        raise CheckpointConversionError(
            f"The checkpoint looks like the {layout} layout but lacks {absent}, needed to read the model's sizes."
        )


def _grid(tokens: int, prefix: int, key: str) -> int:
    grid = math.isqrt(tokens - prefix)
    if grid * grid + prefix != tokens:
        raise CheckpointConversionError(
            f"{key} has {tokens} positions, not {'1 + ' if prefix else ''}a square number of patches."
        )
    return grid


def _tower_sizes(state: Mapping[str, torch.Tensor], patch_key: str, position_key: str, class_tokens: int,
                 block_pattern: str, mlp_key: str) -> dict[str, int]:
    """Image size, patch size, width, depth and MLP width of a ViT from its tensor shapes: the patch convolution
    ``[width, 3, patch, patch]``, the position table (positions on axis -2: class tokens + grid^2), the numbered
    blocks, and the first MLP input projection ``[mlp, width]``."""
    conv = state[patch_key]
    grid = _grid(state[position_key].shape[-2], class_tokens, position_key)
    return dict(image_size=grid * conv.shape[-1], patch_size=conv.shape[-1], hidden_size=conv.shape[0],
                num_hidden_layers=count_indices(state, block_pattern), intermediate_size=state[mlp_key].shape[0])


# ------------------------------------------------------------------------------------------------ eva_clip EVA02
def _infer_eva02(state, hf_vision):
    _require(state, "eva_clip EVA02", ("visual.cls_token", "visual.pos_embed", "visual.patch_embed.proj.weight",
                                       "visual.blocks.0.mlp.w1.weight", "visual.head.weight"))
    vision = dict(
        **_tower_sizes(state, "visual.patch_embed.proj.weight", "visual.pos_embed", 1, r"visual\.blocks\.(\d+)\.",
                       "visual.blocks.0.mlp.w1.weight"),
        qkv_bias="visual.blocks.0.attn.q_proj.bias" in state or "visual.blocks.0.attn.q_bias" in state,
    )
    top = dict(projection_dim=state["visual.head.weight"].shape[0],
               vision_projection="linear_bias" if "visual.head.bias" in state else "linear")
    return vision, top


EVA_CLIP_EVA02 = VisionLayout(
    name="eva_clip-eva02", family="eva02",
    description="eva_clip .pt, EVA02 tower (EVAVisionTransformer: RoPE, SwiGLU, sub-LN; head with bias)",
    signature=("visual.patch_embed.proj.weight", "visual.blocks.0.mlp.w1.weight"),
    rules=(
        Rule(r"visual\.head\.(weight|bias)", r"visual_projection.\1"),
        Rule(r"visual\.blocks\.(\d+)\.attn\.q_bias", r"vision_model.blocks.\1.attn.q_proj.bias"),
        Rule(r"visual\.blocks\.(\d+)\.attn\.v_bias", r"vision_model.blocks.\1.attn.v_proj.bias"),
        Rule(r"visual\.(.+)", r"vision_model.\1"),
    ),
    infer=_infer_eva02, position_key="vision_model.pos_embed", prefix_tokens=1,
    ignored=r"visual\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)",
)


# ------------------------------------------------------------------------------------------------ eva_clip OpenAI CLIP
def _infer_openai(state, hf_vision):
    _require(state, "eva_clip OpenAI-CLIP", ("visual.conv1.weight", "visual.positional_embedding",
                                             "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.proj"))
    vision = dict(
        **_tower_sizes(state, "visual.conv1.weight", "visual.positional_embedding", 1,
                       r"visual\.transformer\.resblocks\.(\d+)\.", "visual.transformer.resblocks.0.mlp.c_fc.weight"),
        # The OpenAI-pretrained path (pretrained='openai': build_model_from_openai_state_dict(quick_gelu=True)).
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    return vision, dict(projection_dim=state["visual.proj"].shape[1], vision_projection="linear")


_RESBLOCK = r"visual\.transformer\.resblocks\.(\d+)\."
_LAYER = r"vision_model.encoder.layers.\1."
EVA_CLIP_OPENAI = VisionLayout(
    name="eva_clip-openai-clip", family="clip",
    description="eva_clip .pt, OpenAI CLIP tower (open_clip VisionTransformer: in_proj attention, QuickGELU, "
                "ln_post on the class token, x @ proj)",
    signature=("visual.conv1.weight", "visual.class_embedding"),
    rules=(
        Rule(r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
        Rule(r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
        Rule(r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        Rule(r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
        Rule(_RESBLOCK + r"ln_1\.(weight|bias)", _LAYER + r"layer_norm1.\2"),
        Rule(_RESBLOCK + r"ln_2\.(weight|bias)", _LAYER + r"layer_norm2.\2"),
        Rule(_RESBLOCK + r"attn\.in_proj_(weight|bias)", _LAYER + r"self_attn.{qkv}_proj.\2", "split3"),
        Rule(_RESBLOCK + r"attn\.out_proj\.(weight|bias)", _LAYER + r"self_attn.out_proj.\2"),
        Rule(_RESBLOCK + r"mlp\.c_fc\.(weight|bias)", _LAYER + r"mlp.fc1.\2"),
        Rule(_RESBLOCK + r"mlp\.c_proj\.(weight|bias)", _LAYER + r"mlp.fc2.\2"),
        Rule(r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
        Rule(r"visual\.proj", "visual_projection.weight", "T"),  # used as x @ proj: [width, projection]
    ),
    infer=_infer_openai, position_key="vision_model.embeddings.position_embedding.weight", prefix_tokens=1,
)


# ------------------------------------------------------------------------------------------------ eva_clip timm SigLIP
_POOL = "visual.trunk.attn_pool."


def _merge_pool_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's separate latent-query ``q`` and ``kv`` Linear -> one ``in_proj`` (rows q, k, v) as
    ``nn.MultiheadAttention`` stores it. Left alone (and so reported) when either half is absent."""
    state = dict(state)
    for name in ("weight", "bias"):
        q, kv = _POOL + f"q.{name}", _POOL + f"kv.{name}"
        if q in state and kv in state:
            state[_POOL + f"in_proj_{name}"] = torch.cat([state.pop(q), state.pop(kv)], dim=0)
    return state


def _infer_siglip(state, hf_vision):
    _require(state, "eva_clip timm SigLIP", ("visual.trunk.patch_embed.proj.weight", "visual.trunk.pos_embed",
                                             "visual.trunk.blocks.0.mlp.fc1.weight"))
    vision = dict(
        **_tower_sizes(state, "visual.trunk.patch_embed.proj.weight", "visual.trunk.pos_embed", 0,
                       r"visual\.trunk\.blocks\.(\d+)\.", "visual.trunk.blocks.0.mlp.fc1.weight"),
        # timm's ViT: nn.GELU (exact) and LayerNorm eps 1e-6 (vit_so400m_patch14_siglip_224 sets neither).
        hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=True,
    )
    return vision, dict(vision_projection="none")


_BLOCK = r"visual\.trunk\.blocks\.(\d+)\."
EVA_CLIP_TIMM_SIGLIP = VisionLayout(
    name="eva_clip-timm-siglip", family="siglip",
    description="eva_clip .pt, timm SigLIP tower (TimmModel trunk: fused qkv, exact GELU, MAP pooling, no "
                "projection)",
    signature=("visual.trunk.patch_embed.proj.weight",),
    rules=(
        Rule(r"visual\.trunk\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
        Rule(r"visual\.trunk\.pos_embed", "vision_model.embeddings.position_embedding.weight", "squeeze0"),
        Rule(_BLOCK + r"norm1\.(weight|bias)", _LAYER + r"layer_norm1.\2"),
        Rule(_BLOCK + r"norm2\.(weight|bias)", _LAYER + r"layer_norm2.\2"),
        Rule(_BLOCK + r"attn\.qkv\.(weight|bias)", _LAYER + r"self_attn.{qkv}_proj.\2", "split3"),
        Rule(_BLOCK + r"attn\.proj\.(weight|bias)", _LAYER + r"self_attn.out_proj.\2"),
        Rule(_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", _LAYER + r"mlp.\2.\3"),
        Rule(r"visual\.trunk\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
        Rule(r"visual\.trunk\.attn_pool\.latent", "vision_model.head.probe"),
        Rule(r"visual\.trunk\.attn_pool\.in_proj_(weight|bias)", r"vision_model.head.attention.in_proj_\1"),
        Rule(r"visual\.trunk\.attn_pool\.proj\.(weight|bias)", r"vision_model.head.attention.out_proj.\1"),
        Rule(r"visual\.trunk\.attn_pool\.norm\.(weight|bias)", r"vision_model.head.layernorm.\1"),
        Rule(r"visual\.trunk\.attn_pool\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.head.mlp.\1.\2"),
    ),
    infer=_infer_siglip, position_key="vision_model.embeddings.position_embedding.weight", prefix_tokens=0,
    prepare=_merge_pool_qkv,
)


# ------------------------------------------------------------------------------------------------ HF OpenAI CLIP
def _hf_tower_sizes(state: Mapping[str, torch.Tensor], mlp_key: str) -> dict[str, int]:
    """:func:`_tower_sizes` of a transformers-named tower (both Hugging Face LLM2CLIP exports)."""
    return _tower_sizes(state, "vision_model.embeddings.patch_embedding.weight",
                        "vision_model.embeddings.position_embedding.weight", 1,
                        r"vision_model\.encoder\.layers\.(\d+)\.", mlp_key)


def _infer_hf_clip(state, hf_vision):
    _require(state, "Hugging Face LLM2CLIP-Openai", (
        "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight"))
    vision = dict(
        **_hf_tower_sizes(state, "vision_model.encoder.layers.0.mlp.fc1.weight"),
        # transformers' CLIPVisionConfig defaults, which the repos' config.json leave implicit.
        hidden_act=hf_vision.get("hidden_act", "quick_gelu"), layer_norm_eps=hf_vision.get("layer_norm_eps", 1e-5),
    )
    if "num_attention_heads" in hf_vision:
        vision["num_attention_heads"] = hf_vision["num_attention_heads"]
    return vision, dict(projection_dim=state["visual_projection.weight"].shape[0], vision_projection="linear")


HF_OPENAI_CLIP = VisionLayout(
    name="hf-openai-clip", family="clip",
    description="Hugging Face LLM2CLIP-Openai repo (transformers-4.40 CLIP vision naming, visual_projection "
                "without bias)",
    signature=("vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.fc1.weight"),
    rules=(
        Rule(r"vision_model\.(embeddings\.(?:class_embedding|patch_embedding\.weight|position_embedding\.weight)"
             r"|pre_layrnorm\.(?:weight|bias)|post_layernorm\.(?:weight|bias)"
             r"|encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)"
             r"\.(?:weight|bias))", r"vision_model.\1"),
        Rule(r"visual_projection\.weight", "visual_projection.weight"),
    ),
    infer=_infer_hf_clip, position_key="vision_model.embeddings.position_embedding.weight", prefix_tokens=1,
    ignored=r"vision_model\.embeddings\.position_ids",
)


# ------------------------------------------------------------------------------------------------ HF EVA02 (inferred)
def _infer_hf_eva02(state, hf_vision):
    _require(state, "Hugging Face LLM2CLIP-EVA02", (
        "vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight",
        "vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.mlp.w1.weight",
        "visual_projection.weight"))
    prefix = "vision_model.encoder.layers.0.self_attn."
    vision = dict(
        **_hf_tower_sizes(state, "vision_model.encoder.layers.0.mlp.w1.weight"),
        qkv_bias=any(prefix + name in state for name in ("q_bias", "q_proj.bias")),
    )
    if "num_attention_heads" in hf_vision:
        vision["num_attention_heads"] = hf_vision["num_attention_heads"]
    top = dict(projection_dim=state["visual_projection.weight"].shape[0],
               vision_projection="linear_bias" if "visual_projection.bias" in state else "linear")
    return vision, top


_HF_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
_EVA_BLOCK = r"vision_model.blocks.\1."
HF_EVA02 = VisionLayout(
    name="hf-eva02", family="eva02",
    description="Hugging Face LLM2CLIP-EVA02 repo (modeling_evaclip.py export; names inferred from EVA-CLIP's "
                "convert_evaclip_pytorch_to_hf.py)",
    signature=("vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.w1.weight"),
    rules=(
        Rule(r"vision_model\.embeddings\.class_embedding", "vision_model.cls_token", "token"),
        Rule(r"vision_model\.embeddings\.position_embedding\.weight", "vision_model.pos_embed", "unsqueeze0"),
        Rule(r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"vision_model.patch_embed.proj.\1"),
        Rule(_HF_LAYER + r"layer_norm1\.(weight|bias)", _EVA_BLOCK + r"norm1.\2"),
        Rule(_HF_LAYER + r"layer_norm2\.(weight|bias)", _EVA_BLOCK + r"norm2.\2"),
        Rule(_HF_LAYER + r"self_attn\.(q|k|v)_proj\.(weight|bias)", _EVA_BLOCK + r"attn.\2_proj.\3"),
        Rule(_HF_LAYER + r"self_attn\.(q|v)_bias", _EVA_BLOCK + r"attn.\2_proj.bias"),
        Rule(_HF_LAYER + r"self_attn\.out_proj\.(weight|bias)", _EVA_BLOCK + r"attn.proj.\2"),
        Rule(_HF_LAYER + r"self_attn\.inner_(?:self_)?attn_ln\.(weight|bias)", _EVA_BLOCK + r"attn.inner_attn_ln.\2"),
        Rule(_HF_LAYER + r"mlp\.(w1|w2|w3|ffn_ln)\.(weight|bias)", _EVA_BLOCK + r"mlp.\2.\3"),
        Rule(r"vision_model\.post_layernorm\.(weight|bias)", r"vision_model.norm.\1"),
        Rule(r"visual_projection\.(weight|bias)", r"visual_projection.\1"),
    ),
    infer=_infer_hf_eva02, position_key="vision_model.pos_embed", prefix_tokens=1,
    ignored=r"vision_model\.(encoder\.layers\.\d+\.self_attn\.)?rope\.freqs_(cos|sin)|vision_model\.embeddings\."
            r"position_ids",
)

LAYOUTS = (EVA_CLIP_EVA02, EVA_CLIP_OPENAI, EVA_CLIP_TIMM_SIGLIP, HF_EVA02, HF_OPENAI_CLIP)


def detect_layout(state: Mapping[str, torch.Tensor]) -> VisionLayout:
    """The first of :data:`LAYOUTS` whose signature keys are all in ``state``; a ``CheckpointConversionError``
    listing some of the keys when none is."""
    for layout in LAYOUTS:
        if all(key in state for key in layout.signature):
            return layout
    examples = sorted(state)[:12]
    expected = "; ".join(f"{layout.name}: {', '.join(layout.signature)}" for layout in LAYOUTS)
    raise CheckpointConversionError(
        "Not an LLM2CLIP eva_clip checkpoint nor a Hugging Face LLM2CLIP export: no vision tower layout recognised "
        f"(keys that identify each: {expected}). Found keys such as {examples}."
    )
