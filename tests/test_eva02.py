import math

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


def test_gradient_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = EVA02VisionModel(tiny_vision_config()).train()
    pixels = torch.randn(2, 3, 32, 32)
    model(pixels).pooler_output.square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(pixels).pooler_output.square().sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad)


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
