import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from llm2clip_hf import EVA02_PRESETS, EVA02VisionConfig, EVA02VisionModel
from llm2clip_hf.modeling.rotary_embedding_2d import RotaryEmbedding2D, apply_rotary_2d, rotate_pairs
from llm2clip_hf.testing import tiny_vision_config
from reference_impl import eva02_image_features, rope_rotate


def test_rope_matches_explicit_pair_rotations():
    grid, head_dim = 3, 16
    cos, sin = RotaryEmbedding2D(head_dim, pretrain_grid=16)(grid, torch.device("cpu"))
    x = torch.randn(grid * grid, head_dim, dtype=torch.float64)
    got = apply_rotary_2d(x, cos.double(), sin.double())
    torch.testing.assert_close(got, rope_rotate(x, grid), rtol=0, atol=1e-6)


def test_rope_interpolates_positions_onto_the_pretraining_grid():
    # Patch row 1 of a 2x2 grid sits at position 1/2*16 = 8 of the 16x16 pretraining grid.
    cos, _ = RotaryEmbedding2D(head_dim=8, pretrain_grid=16)(2, torch.device("cpu"))
    row1_first_channel = cos[2, 0]  # token (row 1, col 0), channel 0 has frequency 1
    assert row1_first_channel.item() == pytest.approx(math.cos(8.0), abs=1e-6)


def test_rotate_pairs_is_interleaved():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_pairs(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def _official_names(model: EVA02VisionModel, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    sd = {f"visual.{k}": v for k, v in model.state_dict().items()}
    sd["visual.head.weight"], sd["visual.head.bias"] = head.weight.detach(), head.bias.detach()
    return sd


@pytest.mark.parametrize("image_size,patch_size,heads", [(32, 8, 2), (28, 14, 1)])
def test_forward_matches_reference_computation(image_size, patch_size, heads):
    torch.manual_seed(0)
    config = tiny_vision_config(image_size=image_size, patch_size=patch_size, num_attention_heads=heads)
    model = EVA02VisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    head = torch.nn.Linear(config.hidden_size, 16)
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        got = head(model(pixels).pooler_output)
    expected = eva02_image_features(_official_names(model, head), pixels, num_heads=heads)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_image_size_mismatch_is_refused_with_a_fix():
    model = EVA02VisionModel(tiny_vision_config(image_size=32))
    with pytest.raises(ValueError, match=r"Image size mismatch.*32x32.*interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 36, 36))


def test_interpolated_position_embedding_is_bicubic_resize():
    torch.manual_seed(0)
    model = EVA02VisionModel(tiny_vision_config(image_size=32, patch_size=8)).eval()
    resized = model.position_embedding_for(6)
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(resized[:, 1:], expected)
    torch.testing.assert_close(resized[:, :1], model.pos_embed[:, :1])
    assert model(torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True).pooler_output.shape == (1, 64)


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(enable):
    torch.manual_seed(0)
    model = EVA02VisionModel(tiny_vision_config(num_hidden_layers=3)).train()
    pixels = torch.randn(2, 3, 32, 32)
    calls = [0] * len(model.blocks)

    def count(index):
        def hook(module, args):
            calls[index] += 1
        return hook

    # A pre-hook on each block's first submodule: a recomputation always replays it (hooks on the block itself stay
    # outside the checkpoint, and a recomputation may stop early, before the block's last submodule).
    for index, block in enumerate(model.blocks):
        block.norm1.register_forward_pre_hook(count(index))

    model(pixels).pooler_output.square().sum().backward()
    assert calls == [1] * len(model.blocks)
    plain = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is a deprecated alias
        getattr(model, enable)()
    calls[:] = [0] * len(model.blocks)
    model(pixels).pooler_output.square().sum().backward()
    # Once in the forward, once more when the backward recomputes the block's activations.
    assert calls == [2] * len(model.blocks)
    for (name, p), expected in zip(model.named_parameters(), plain):
        torch.testing.assert_close(p.grad, expected, msg=lambda m, name=name: f"{name}: {m}")


def _truncated_normal_std(std: float, bound: float = 2.0) -> float:
    """Standard deviation of ``trunc_normal_(std=std)``: a normal of that std cut at the absolute bounds ``+-bound``."""
    beta = bound / std
    density = math.exp(-beta * beta / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(beta / math.sqrt(2))
    return std * math.sqrt(1 - 2 * beta * density / mass)


def _wide_tower_config(**overrides) -> EVA02VisionConfig:
    settings = dict(image_size=32, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=int(256 * 2.6667))
    return EVA02VisionConfig(**{**settings, **overrides})


def _assert_std(tensor: torch.Tensor, expected: float, rel: float = 0.03, what: str = "") -> None:
    got = tensor.detach().double().std().item()
    assert got == pytest.approx(expected, rel=rel), f"{what}: std {got:.6g}, expected {expected:.6g}"


def _assert_eva_clip_tower_init(model: EVA02VisionModel) -> None:
    std = model.config.initializer_range
    for index, block in enumerate(model.blocks):
        layer_id = index + 1  # eva_clip's fix_init_weight counts blocks from 1
        residual_std = _truncated_normal_std(std) / math.sqrt(2.0 * layer_id)
        _assert_std(block.attn.proj.weight, residual_std, what=f"blocks.{index}.attn.proj.weight")
        _assert_std(block.mlp.w3.weight, residual_std, what=f"blocks.{index}.mlp.w3.weight")
        for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.w1, block.mlp.w2):
            _assert_std(linear.weight, _truncated_normal_std(std), what=f"blocks.{index} {linear}")
        for linear in (block.attn.q_proj, block.attn.v_proj, block.attn.proj, block.mlp.w1, block.mlp.w2, block.mlp.w3):
            assert torch.count_nonzero(linear.bias) == 0
        for norm in (block.norm1, block.norm2, block.attn.inner_attn_ln, block.mlp.ffn_ln):
            assert torch.all(norm.weight == 1) and torch.count_nonzero(norm.bias) == 0
    # Depth scaling between layers, free of sampling error in the common 0.02: std ratio layer 1 / layer 4 = 2.
    ratio = model.blocks[0].attn.proj.weight.std() / model.blocks[3].attn.proj.weight.std()
    assert ratio.item() == pytest.approx(2.0, rel=0.03)
    assert torch.all(model.norm.weight == 1) and torch.count_nonzero(model.norm.bias) == 0
    _assert_std(model.pos_embed, _truncated_normal_std(std), what="pos_embed")
    _assert_std(model.cls_token, _truncated_normal_std(std), rel=0.2, what="cls_token")
    # eva_clip's _init_weights skips the Conv2d patch embedding: it keeps PyTorch's default
    # kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias.
    conv = model.patch_embed.proj
    bound = 1 / math.sqrt(conv.weight[0].numel())
    assert conv.weight.abs().max().item() <= bound and conv.bias.abs().max().item() <= bound
    _assert_std(conv.weight, bound / math.sqrt(3), what="patch_embed.proj.weight")
    assert torch.count_nonzero(conv.bias) == conv.bias.numel()


def test_new_tower_is_initialised_like_eva_clip():
    torch.manual_seed(0)
    _assert_eva_clip_tower_init(EVA02VisionModel(_wide_tower_config()))


def test_new_llm2clip_model_initialises_tower_and_head_like_eva_clip():
    from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel

    assert EVA02VisionConfig().head_init_scale == 0.001  # EVAVisionTransformer's init_scale, as EVA02-CLIP builds it
    for head_init_scale in (None, 0.5):
        torch.manual_seed(0)
        vision = _wide_tower_config() if head_init_scale is None else _wide_tower_config(head_init_scale=head_init_scale)
        model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=vision, projection_dim=256, text_embedding_dim=32))
        _assert_eva_clip_tower_init(model.vision_model)
        scale = model.config.vision_config.head_init_scale
        _assert_std(model.visual_projection.weight, _truncated_normal_std(0.02) * scale, what="visual_projection")
        assert torch.count_nonzero(model.visual_projection.bias) == 0


def test_from_pretrained_keeps_saved_weights_and_initialises_missing_ones_like_eva_clip(tmp_path):
    from safetensors.torch import load_file, save_file

    from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel

    torch.manual_seed(0)
    model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=_wide_tower_config(), projection_dim=256, text_embedding_dim=32))
    with torch.no_grad():  # weights unlike any initialisation, so a re-initialisation or rescale would show
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    reloaded = LLM2CLIPModel.from_pretrained(tmp_path)
    assert saved.keys() == reloaded.state_dict().keys()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)

    # A checkpoint lacking a residual output projection: that weight gets eva_clip's depth-scaled init, once.
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    missing = "vision_model.blocks.3.mlp.w3.weight"
    del tensors[missing]
    save_file(tensors, weights, metadata={"format": "pt"})
    partial = LLM2CLIPModel.from_pretrained(tmp_path)
    for name, value in partial.state_dict().items():
        if name != missing:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
    _assert_std(partial.vision_model.blocks[3].mlp.w3.weight, _truncated_normal_std(0.02) / math.sqrt(8), what=missing)


@pytest.mark.parametrize("preset,tokens", [("B/16", 197), ("L/14", 257), ("L/14-336", 577)])
def test_presets_have_official_shapes(preset, tokens):
    config = EVA02VisionConfig.from_preset(preset)
    with torch.device("meta"):
        model = EVA02VisionModel(config)
    assert model.pos_embed.shape[1] == tokens
    width, mlp = config.hidden_size, config.intermediate_size
    per_block = 4 * width * width + 10 * width + 3 * width * mlp + 4 * mlp
    expected = (width * 3 * config.patch_size**2 + width) + width + tokens * width + 2 * width + config.num_hidden_layers * per_block
    assert sum(p.numel() for p in model.parameters()) == expected
    assert config.num_attention_heads == width // 64 and mlp == int(width * 2.6667)
    assert set(EVA02_PRESETS) == {"B/16", "L/14", "L/14-336"}


def test_head_count_that_does_not_divide_width_is_named():
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        EVA02VisionConfig(hidden_size=64, num_attention_heads=5)
