"""EVA02 vision transformer, computed as eva_clip's ``EVAVisionTransformer`` does for EVA02-CLIP.

Pre-norm blocks with a CLS token and a learned absolute position embedding; 2-D RoPE on the queries and
keys of the patch tokens; separate q/k/v projections (k without bias); a sub-LayerNorm before the attention
output projection; a SwiGLU MLP with a LayerNorm on its hidden layer. Attention runs through PyTorch's SDPA.
Parameter names follow eva_clip so official checkpoints map one to one.
"""

from __future__ import annotations

from typing import Any

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_eva02 import EVA02VisionConfig
from .rotary_embedding_2d import RotaryEmbedding2D, apply_rotary_2d


class EVA02PatchEmbedding(nn.Module):
    """Non-overlapping patches projected by a strided convolution."""

    def __init__(self, config: EVA02VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class EVA02Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on patch tokens and a sub-LayerNorm before the output."""

    def __init__(self, config: EVA02VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        # RoPE on patch tokens only; the CLS token (position 0) keeps its raw query and key.
        q = torch.cat((q[:, :, :1], apply_rotary_2d(q[:, :, 1:], *rope)), dim=2)
        k = torch.cat((k[:, :, :1], apply_rotary_2d(k[:, :, 1:], *rope)), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(self.inner_attn_ln(out))


class EVA02SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``."""

    def __init__(self, config: EVA02VisionConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(hidden_states)) * self.w2(hidden_states)))


class EVA02Block(GradientCheckpointingLayer):
    """Pre-norm transformer block; ``layer_id`` is its 1-based depth (eva_clip's ``fix_init_weight`` numbering)."""

    def __init__(self, config: EVA02VisionConfig, layer_id: int = 1) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EVA02Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EVA02SwiGLU(config)
        # The two projections that write into the residual stream start scaled by 1/sqrt(2 * layer_id). The mark sits
        # on the Linear layers themselves because transformers passes a module of custom code to _init_weights only
        # when it holds parameters of its own, which this block does not (see EVA02PreTrainedModel._init_weights).
        for projection in (self.attn.proj, self.mlp.w3):
            projection.residual_layer_id = layer_id

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rope)
        return hidden_states + self.mlp(self.norm2(hidden_states))


def init_linear_and_layer_norm(module: nn.Module, std: float) -> bool:
    """eva_clip's ``_init_weights``: a Linear gets a truncated normal weight and a zero bias, a LayerNorm 1 and 0.

    Returns whether ``module`` was one of those. ``trunc_normal_`` cuts at the absolute values +-2 (as timm's does),
    i.e. at +-100 std for ``std=0.02``: in effect a plain normal.
    """
    if isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
        return True
    if isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        return True
    return False


def init_conv_like_pytorch(module: nn.Conv2d) -> None:
    """PyTorch's own ``Conv2d.reset_parameters``, through the load-aware ``transformers.initialization`` functions."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(module.bias, -bound, bound)


class EVA02PreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the EVA02 classes.

    A new tower starts as eva_clip's ``EVAVisionTransformer`` does: Linear weights truncated normal (std
    ``initializer_range``) with zero biases, LayerNorms 1 and 0, ``cls_token`` and ``pos_embed`` truncated normal,
    the patch-embedding convolution at PyTorch's default (eva_clip's ``_init_weights`` does not touch it), and
    ``fix_init_weight``: ``attn.proj`` and ``mlp.w3`` of block ``layer_id`` (1-based) divided by
    ``sqrt(2 * layer_id)``. Weights loaded by ``from_pretrained`` are never re-initialised or rescaled.
    """

    config_class = EVA02VisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["EVA02Block"]

    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this once per module, children before parents, and for custom code (any class outside
        # transformers) skips a module whose own parameters are all loaded, vacuously so a module with none: it
        # never reaches EVA02Block, EVA02Attention or EVA02SwiGLU, not even in a new model. Hence the depth
        # rescale is done here, on the Linear itself, right after its own init: every initialisation of a residual
        # output projection is depth-scaled exactly once, also when from_pretrained fills in a missing weight, and
        # the guarded ``init`` functions leave loaded tensors (flagged ``_is_hf_initialized``) untouched.
        std = self.config.initializer_range
        if isinstance(module, nn.Conv2d):
            init_conv_like_pytorch(module)
            return
        if init_linear_and_layer_norm(module, std):
            layer_id = getattr(module, "residual_layer_id", None)
            if layer_id is not None:
                init.copy_(module.weight, module.weight / math.sqrt(2.0 * layer_id))
            return
        if isinstance(module, EVA02VisionModel):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)


class EVA02VisionModel(EVA02PreTrainedModel):
    """EVA02 vision tower. ``pooler_output`` is the final LayerNorm of the CLS token (eva_clip's ``norm(x)[:, 0]``).

    The projection head to the joint space lives in :class:`LLM2CLIPModel` (``visual_projection``), as in CLIP.
    """

    def __init__(self, config: EVA02VisionConfig) -> None:
        super().__init__(config)
        dim = config.hidden_size
        self.patch_embed = EVA02PatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, dim))
        self.rope = RotaryEmbedding2D(dim // config.num_attention_heads, config.rope_pretrain_grid, config.rope_theta)
        self.blocks = nn.ModuleList([EVA02Block(config, layer_id=i + 1) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def position_embedding_for(self, grid: int) -> torch.Tensor:
        """The position embedding resized (bicubic, as eva_clip resizes checkpoints) to a ``grid x grid`` image."""
        return resize_position_embedding(self.pos_embed, grid)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """Patch tokens after a class token through the blocks; ``pooler_output`` is the class token's final norm.
        Other keyword arguments (what callers such as transformers' Llava pass every tower, e.g. the Trainer's
        ``num_items_in_batch``) are accepted and unused."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"EVA02VisionModel expects pixel_values of shape (batch, {self.config.num_channels}, height, width); "
                f"got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        size, patch = self.config.image_size, self.config.patch_size
        if height != width or height % patch:
            raise ValueError(
                f"EVA02VisionModel needs square images whose side is a multiple of the patch size {patch}; "
                f"got {height}x{width}. Resize and center-crop them with the model's image processor."
            )
        if height != size and not interpolate_pos_encoding:
            raise ValueError(
                f"Image size mismatch: the model was built for {size}x{size} pixels but got {height}x{width}. "
                f"Preprocess with the model's image processor (it resizes to {size}), or pass "
                "interpolate_pos_encoding=True to resize the position embedding to this size."
            )
        grid = height // patch
        weight_dtype = self.patch_embed.proj.weight.dtype
        hidden_states = self.patch_embed(pixel_values.to(weight_dtype))
        cls = self.cls_token.expand(hidden_states.shape[0], -1, -1)
        hidden_states = torch.cat((cls, hidden_states), dim=1)
        pos = self.pos_embed if grid == self.config.grid_size else self.position_embedding_for(grid)
        hidden_states = hidden_states + pos

        rope = self.rope(grid, hidden_states.device)
        all_hidden_states: tuple[torch.Tensor, ...] = ()
        for block in self.blocks:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = block(hidden_states, rope)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        pooled = self.norm(hidden_states[:, 0])
        if not return_dict:
            return (hidden_states, pooled) + ((all_hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=all_hidden_states if output_hidden_states else None,
        )


def resize_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubically resize a ``(1, 1 + g*g, dim)`` CLS-first position embedding to ``grid x grid`` patches."""
    old_grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if old_grid**2 + 1 != pos_embed.shape[1]:
        raise ValueError(f"Position embedding of {pos_embed.shape[1]} tokens is not 1 + a square number of patches.")
    if old_grid == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


EVA02VisionModel.register_for_auto_class("AutoModel")
