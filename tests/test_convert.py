import pickle

import pytest
import torch
import torch.nn.functional as F

from llm2clip_hf.cli import main as cli_main
from llm2clip_hf.convert import CheckpointConversionError, convert_eva_clip_checkpoint
from llm2clip_hf import LLM2CLIPModel
from reference_impl import eva02_image_features, official_state_dict, text_adapter_features

SIZES = dict(width=64, depth=2, patch=8, grid=4, mlp=170, proj=24, llm_dim=40)


def _save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("variant", ["plain", "q_bias", "fp16", "wrapped"])
def test_official_layout_converts_and_computes_like_eva_clip(variant, tmp_path):
    state = official_state_dict(**SIZES, q_bias_naming=variant == "q_bias")
    saved = state
    if variant == "fp16":
        saved = state = {k: v.half() for k, v in state.items()}
    if variant == "wrapped":
        saved = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    model = convert_eva_clip_checkpoint(_save(saved, tmp_path / "ck.pt"))
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size) == (64, 2, 1, 32)
    assert (model.config.projection_dim, model.config.text_embedding_dim) == (24, 40)
    reference = {k.replace("attn.q_bias", "attn.q_proj.bias").replace("attn.v_bias", "attn.v_proj.bias"): v
                 for k, v in state.items()}
    pixels, embeddings = torch.randn(2, 3, 32, 32), torch.randn(3, 40)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(embeddings)
    torch.testing.assert_close(image.double(), eva02_image_features(reference, pixels, num_heads=1), rtol=0, atol=1e-4)
    torch.testing.assert_close(text.double(), text_adapter_features(reference, embeddings), rtol=0, atol=1e-4)
    assert model.logit_scale.item() == pytest.approx(state["logit_scale"].float().item())


def test_heads_can_be_given(tmp_path):
    model = convert_eva_clip_checkpoint(_save(official_state_dict(**SIZES), tmp_path / "ck.pt"), vision_num_heads=2)
    assert model.config.vision_config.num_attention_heads == 2


def test_wrong_head_count_is_named(tmp_path):
    with pytest.raises(CheckpointConversionError, match=r"vision_num_heads=3 does not divide the vision width 64"):
        convert_eva_clip_checkpoint(_save(official_state_dict(**SIZES), tmp_path / "ck.pt"), vision_num_heads=3)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = official_state_dict(**SIZES)
    del state["visual.blocks.1.mlp.w3.bias"]
    state["visual.blocks.0.attn.extra_gate"] = torch.zeros(3)
    with pytest.raises(CheckpointConversionError) as error:
        convert_eva_clip_checkpoint(_save(state, tmp_path / "ck.pt"))
    message = str(error.value)
    assert "missing (1): ['vision_model.blocks.1.mlp.w3.bias']" in message
    assert "unexpected (1): ['visual.blocks.0.attn.extra_gate']" in message


def test_not_a_checkpoint_is_explained(tmp_path):
    with pytest.raises(CheckpointConversionError, match="Not an LLM2CLIP eva_clip checkpoint"):
        convert_eva_clip_checkpoint(_save({"weight": torch.zeros(2)}, tmp_path / "ck.pt"))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"visual.cls_token": Payload()}, handle)
    with pytest.raises(CheckpointConversionError, match="weights_only=True"):
        convert_eva_clip_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


def test_image_size_override_resizes_position_embedding(tmp_path):
    state = official_state_dict(**SIZES)
    model = convert_eva_clip_checkpoint(_save(state, tmp_path / "ck.pt"), image_size=48)
    assert model.config.vision_config.image_size == 48
    grid = state["visual.pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(model.vision_model.pos_embed[:, 1:], expected)
    assert model.get_image_features(torch.randn(1, 3, 48, 48)).shape == (1, 24)


def test_unknown_override_is_refused(tmp_path):
    with pytest.raises(TypeError, match="Unknown config override 'colour'"):
        convert_eva_clip_checkpoint(_save(official_state_dict(**SIZES), tmp_path / "ck.pt"), colour="red")


def test_cli_convert_writes_a_loadable_checkpoint(tmp_path, capsys):
    checkpoint = _save(official_state_dict(**SIZES), tmp_path / "ck.pt")
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out")]) == 0
    assert '"projection_dim": 24' in capsys.readouterr().out
    model = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(model.visual_projection.weight, official_state_dict(**SIZES)["visual.head.weight"])
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out2"), "--vision_num_heads", "3"]) == 1
    assert "does not divide" in capsys.readouterr().err
