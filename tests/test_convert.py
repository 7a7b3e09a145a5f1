import json
import logging
import pickle
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llm2clip_hf.cli import main as cli_main
from llm2clip_hf.conversion import (
    CheckpointConversionError,
    convert_checkpoint,
    convert_checkpoint_with_report,
    convert_eva_clip_checkpoint,
    convert_hf_checkpoint,
    infer_config,
)
from llm2clip_hf import LLM2CLIPModel
from reference_impl import (
    eva02_image_features,
    exact_gelu,
    hf_eva02_state_dict,
    hf_openai_config,
    hf_openai_state_dict,
    official_state_dict,
    open_clip_text_tower,
    openai_clip_image_features,
    openai_clip_state_dict,
    text_adapter_features,
    timm_siglip_image_features,
    timm_siglip_state_dict,
)

SIZES = dict(width=64, depth=2, patch=8, grid=4, mlp=170, proj=24, llm_dim=40)
# Width 128 so the default head count (width // 64) is 2: heads are split as the official code splits them.
OPENAI = dict(width=128, depth=2, patch=8, grid=4, mlp=256, proj=24, llm_dim=40)
SIGLIP = dict(width=128, depth=2, patch=8, grid=4, mlp=200, llm_dim=40)
SIGLIP_ADAPTER = "text.text_proj.text_adaptor."
TOL = dict(rtol=0, atol=1e-4)


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


# ================================================================================================ every official layout
def _pixels(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _embeddings(seed=1):
    return torch.randn(3, 40, generator=torch.Generator().manual_seed(seed))


def _eva02_reference_dict(state):
    return {k.replace("attn.q_bias", "attn.q_proj.bias").replace("attn.v_bias", "attn.v_proj.bias"): v
            for k, v in state.items()}


def _features(model, pixels, embeddings):
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).double(), model.get_text_features(embeddings).double()


def _wrap(state, variant):
    """The forms official files come in: plain, fp16, and training-script wrappers (module. prefixes inside
    state_dict, as torch.save({"state_dict": ddp_model.state_dict(), "epoch": ...}) writes them)."""
    if variant == "fp16":
        return {k: v.half() for k, v in state.items()}
    if variant == "wrapped":
        return {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    return state


def _as_saved(state, variant):
    """The values the model sees after saving (fp16 rounding included), for the reference."""
    return {k: v.half() for k, v in state.items()} if variant == "fp16" else state


@pytest.mark.parametrize("variant", ["plain", "fp16", "wrapped"])
def test_openai_clip_layout_computes_like_eva_clip_vision_transformer(variant, tmp_path):
    state = openai_clip_state_dict(**OPENAI)
    path = _save(_wrap(state, variant), tmp_path / "ck.pt")
    model, report = convert_checkpoint_with_report(path)
    assert (report.layout, report.family, report.adapter) == ("eva_clip-openai-clip", "clip", "checkpoint")
    config, vision = model.config, model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.patch_size, vision.intermediate_size) == (128, 2, 2, 32, 8, 256)
    assert (vision.hidden_act, vision.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert (config.vision_projection, config.projection_dim, config.adapter_l2_normalize) == ("linear", 24, True)
    reference = _as_saved(state, variant)
    image, text = _features(model, _pixels(), _embeddings())
    torch.testing.assert_close(image, openai_clip_image_features(reference, _pixels(), num_heads=2), **TOL)
    torch.testing.assert_close(text, text_adapter_features(reference, _embeddings()), **TOL)
    # The same file through the eva_clip entry point gives the same model.
    again = convert_eva_clip_checkpoint(path)
    torch.testing.assert_close(_features(again, _pixels(), _embeddings())[0], image, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["plain", "fp16", "wrapped", "no_logit_bias", "with_llm_weights"])
def test_timm_siglip_layout_computes_like_timm_with_attention_pool_latent(variant, tmp_path, caplog):
    state = timm_siglip_state_dict(**SIGLIP, logit_bias=variant != "no_logit_bias")
    saved = dict(state)
    if variant == "with_llm_weights":  # LLM2VecTextTransformer keeps the LLM under text.text.*
        saved.update({"text.text.model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
                      "text.text.model.embed_tokens.weight": torch.zeros(10, 8)})
    path = _save(_wrap(saved, variant), tmp_path / "ck.pt")
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion"):
        model, report = convert_checkpoint_with_report(path)
    assert (report.layout, report.family, report.adapter) == ("eva_clip-timm-siglip", "siglip", "checkpoint")
    config, vision = model.config, model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.intermediate_size) == (128, 2, 2, 32, 200)
    assert (vision.hidden_act, vision.layer_norm_eps) == ("gelu", 1e-6)
    assert (config.vision_projection, config.projection_dim, config.adapter_l2_normalize) == ("none", 128, False)
    assert model.visual_projection is None
    if variant == "no_logit_bias":
        assert model.logit_bias is None and config.logit_bias_init_value is None
    else:
        assert model.logit_bias.item() == -10.0 and config.logit_bias_init_value == -10.0
    if variant == "with_llm_weights":
        assert report.dropped == {"LLM weights of LLM2VecTextTransformer (text.text.*)": 2}
        assert "dropped 2 keys of the LLM weights" in caplog.text
    reference = _as_saved(state, variant)
    image, text = _features(model, _pixels(), _embeddings())
    torch.testing.assert_close(image, timm_siglip_image_features(reference, _pixels(), num_heads=2), **TOL)
    torch.testing.assert_close(text, text_adapter_features(reference, _embeddings(), prefix=SIGLIP_ADAPTER,
                                                           l2_normalize=False), **TOL)


def test_the_references_tell_the_activations_apart(tmp_path):
    """Evidence the comparisons can fail: the same weights with another activation (or the adapter with the other
    normalisation) differ from the converted model by far more than the tolerance."""
    openai = openai_clip_state_dict(**OPENAI)
    siglip = timm_siglip_state_dict(**SIGLIP)
    clip_model = convert_checkpoint(_save(openai, tmp_path / "o.pt"))
    siglip_model = convert_checkpoint(_save(siglip, tmp_path / "s.pt"))
    clip_image, clip_text = _features(clip_model, _pixels(), _embeddings())
    siglip_image, siglip_text = _features(siglip_model, _pixels(), _embeddings())
    tanh_gelu = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731  transformers' SigLIP default
    assert (clip_image - openai_clip_image_features(openai, _pixels(), 2, activation=exact_gelu)).abs().max() > 1e-2
    assert (clip_image - openai_clip_image_features(openai, _pixels(), 1)).abs().max() > 1e-2  # head count
    assert (siglip_image - timm_siglip_image_features(siglip, _pixels(), 2, activation=tanh_gelu)).abs().max() > 1e-3
    # (LayerNorm eps 1e-5 vs 1e-6 moves these features by ~1e-4 only, so the tests assert the eps in the config.)
    assert (clip_text - text_adapter_features(openai, _embeddings(), l2_normalize=False)).abs().max() > 1e-2
    assert (siglip_text - text_adapter_features(siglip, _embeddings(), prefix=SIGLIP_ADAPTER)).abs().max() > 1e-2


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "sharded", "with_text_tower"])
def test_hf_openai_repo_folder_converts_like_the_official_tower(weights, tmp_path, caplog):
    official = openai_clip_state_dict(**OPENAI)
    hf = hf_openai_state_dict(official, text_tower=weights == "with_text_tower")
    folder = tmp_path / "LLM2CLIP-Openai-B-16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_openai_config(official, num_heads=2)))
    (folder / "modeling_clip.py").write_text("raise RuntimeError('remote code must never run')\n")
    if weights == "sharded":
        keys = sorted(hf)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, names in shards.items():
            save_file({k: hf[k].contiguous() for k in names}, str(folder / name))
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    elif weights == "pytorch_model.bin":
        torch.save(hf, folder / weights)
    else:
        save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion"):
        model, report = convert_checkpoint_with_report(folder)
    assert (report.layout, report.source_kind, report.family) == ("hf-openai-clip", "folder", "clip")
    assert model.config.vision_config.hidden_act == "quick_gelu"  # the config.json leaves it at CLIP's default
    if weights == "with_text_tower":
        assert report.dropped == {"transformers CLIP text tower (text_model.*)": 5}
        assert "text_model.embeddings.token_embedding.weight" in caplog.text
    image, text = _features(model, _pixels(), _embeddings())
    torch.testing.assert_close(image, openai_clip_image_features(official, _pixels(), num_heads=2), **TOL)
    torch.testing.assert_close(text, text_adapter_features(official, _embeddings()), **TOL)
    torch.testing.assert_close(_features(convert_hf_checkpoint(folder), _pixels(), _embeddings())[0], image,
                               rtol=0, atol=0)


@pytest.mark.parametrize("naming", ["q_bias+inner_self_attn_ln", "q_proj.bias+inner_attn_ln"])
def test_hf_eva02_repo_folder_converts_like_eva_clip(naming, tmp_path):
    official = official_state_dict(**SIZES)
    hf = hf_eva02_state_dict(official, q_bias_naming=naming.startswith("q_bias"),
                             inner_ln_name=naming.split("+")[1])
    folder = tmp_path / "LLM2CLIP-EVA02-B-16"
    folder.mkdir()
    torch.save(hf, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architectures": ["EvaCLIPModel"], "model_type": "evaclip"}))
    with pytest.raises(CheckpointConversionError, match="has no text adapter.*text_embedding_dim"):
        convert_checkpoint(folder)
    model, report = convert_checkpoint_with_report(folder, text_embedding_dim=40)
    assert (report.layout, report.family, report.adapter) == ("hf-eva02", "eva02", "new")
    image, _ = _features(model, _pixels(), _embeddings())
    torch.testing.assert_close(image, eva02_image_features(_eva02_reference_dict(official), _pixels(), 1), **TOL)


def test_a_folder_with_the_eva_clip_pt_and_the_hf_export_reads_the_pt(tmp_path):
    official = official_state_dict(**SIZES)
    torch.save(official, tmp_path / "LLM2CLIP-EVA02-B-16.pt")
    torch.save(hf_eva02_state_dict(official), tmp_path / "pytorch_model.bin")
    model, report = convert_checkpoint_with_report(tmp_path)
    assert report.layout == "eva_clip-eva02" and report.files == [str(tmp_path / "LLM2CLIP-EVA02-B-16.pt")]
    assert report.adapter == "checkpoint" and model.config.text_embedding_dim == 40


# ------------------------------------------------------------------------------------------------ no adapter (item d)
@pytest.mark.parametrize("text_tower", ["text.", ""])
def test_eva_clip_pretrained_without_adapter_gets_a_new_one_and_drops_the_text_tower(text_tower, tmp_path, caplog):
    """BAAI EVA02-CLIP .pt: visual.* and an open_clip text tower (CustomCLIP: under text.; open_clip's CLIP: at the
    top level); no adapter."""
    official = official_state_dict(**SIZES)
    state = {k: v for k, v in official.items() if not k.startswith("text.")}
    state.update(open_clip_text_tower(prefix=text_tower))
    path = _save(state, tmp_path / "EVA02_CLIP_B_psz16_s8B.pt")
    with pytest.raises(CheckpointConversionError, match="no text adapter.*pass text_embedding_dim"):
        convert_eva_clip_checkpoint(path)
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion"):
        model, report = convert_checkpoint_with_report(path, text_embedding_dim=48)
    assert report.adapter == "new" and model.config.text_embedding_dim == 48
    assert sum(report.dropped.values()) == 17 and "token_embedding.weight" in caplog.text
    assert "a new, untrained adapter for 48-d LLM embeddings" in caplog.text
    adapter = model.text_adapter.layers
    assert torch.equal(adapter[0].ln.weight, torch.ones(48)) and torch.equal(adapter[4].bias, torch.zeros(48))
    assert 0.015 < adapter[0].fn[0].weight.std().item() < 0.025 and torch.equal(adapter[5].bias, torch.zeros(24))
    image, _ = _features(model, _pixels(), torch.randn(3, 48))
    torch.testing.assert_close(image, eva02_image_features(official, _pixels(), 1), **TOL)
    assert model.get_text_features(torch.randn(3, 48)).shape == (3, 24)


def test_openai_clip_without_adapter_and_an_adapter_of_another_width(tmp_path, caplog):
    state = openai_clip_state_dict(**{**OPENAI, "llm_dim": None})
    state.update(open_clip_text_tower(prefix=""))
    model = convert_checkpoint(_save(state, tmp_path / "open_clip.pt"), text_embedding_dim=40)
    torch.testing.assert_close(_features(model, _pixels(), _embeddings())[0],
                               openai_clip_image_features(state, _pixels(), 2), **TOL)
    with_adapter = _save(openai_clip_state_dict(**OPENAI), tmp_path / "llm2clip.pt")
    with caplog.at_level(logging.WARNING, logger="llm2clip_hf.conversion"):
        kept = convert_checkpoint(with_adapter, text_embedding_dim=64)  # the adapter is kept as trained
    assert kept.config.text_embedding_dim == 40 and "text_embedding_dim=64 is ignored" in caplog.text


# ------------------------------------------------------------------------------------------------ errors per layout
def _hf_openai_folder(tmp_path, hf, official):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_openai_config(official, num_heads=2)))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("layout", ["openai", "siglip", "hf-openai", "hf-eva02"])
def test_missing_unexpected_and_mismatched_keys_are_listed_for_each_layout(layout, tmp_path):
    if layout == "openai":
        state = openai_clip_state_dict(**OPENAI)
        del state["visual.transformer.resblocks.1.mlp.c_proj.bias"]
        state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(128)  # LayerScale: no such weight here
        state["text.text_adaptor.5.weight"] = torch.zeros(30, 40)  # adapter to another width than the projection
        source, kw = _save(state, tmp_path / "ck.pt"), {}
        expected = ["missing (1): ['vision_model.encoder.layers.1.mlp.fc2.bias']",
                    "unexpected (1): ['visual.transformer.resblocks.0.ls_1.gamma']",
                    "text_adapter.layers.5.weight: checkpoint (30, 40) vs model (24, 40)"]
    elif layout == "siglip":
        state = timm_siglip_state_dict(**SIGLIP)
        del state["visual.trunk.attn_pool.kv.bias"]  # q.bias then has no partner to form in_proj_bias
        state["visual.trunk.cls_token"] = torch.zeros(1, 1, 128)
        source, kw = _save(state, tmp_path / "ck.pt"), {}
        expected = ["missing (1): ['vision_model.head.attention.in_proj_bias']",
                    "unexpected (2): ['visual.trunk.attn_pool.q.bias', 'visual.trunk.cls_token']"]
    elif layout == "hf-openai":
        official = openai_clip_state_dict(**OPENAI)
        hf = hf_openai_state_dict(official)
        del hf["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
        hf["vision_model.encoder.layers.0.self_attn.rel_pos"] = torch.zeros(3)
        source, kw = _hf_openai_folder(tmp_path, hf, official), {}
        expected = ["missing (1): ['vision_model.encoder.layers.0.self_attn.k_proj.bias']",
                    "unexpected (1): ['vision_model.encoder.layers.0.self_attn.rel_pos']"]
    else:
        hf = hf_eva02_state_dict(official_state_dict(**SIZES))
        del hf["vision_model.encoder.layers.1.mlp.ffn_ln.weight"]
        hf["vision_model.encoder.layers.0.self_attn.k_bias"] = torch.zeros(64)
        (tmp_path / "repo").mkdir()
        torch.save(hf, tmp_path / "repo" / "pytorch_model.bin")
        source, kw = tmp_path / "repo", {"text_embedding_dim": 40}
        expected = ["missing (1): ['vision_model.blocks.1.mlp.ffn_ln.weight']",
                    "unexpected (1): ['vision_model.encoder.layers.0.self_attn.k_bias']"]
    with pytest.raises(CheckpointConversionError) as error:
        convert_checkpoint(source, **kw)
    for line in expected:
        assert line in str(error.value)


def test_sizes_of_the_published_towers_are_read_from_shapes():
    """Shapes alone (meta tensors): SigLIP2 So400m/14 gets 16 heads (1152 = 16 x 72), OpenAI L/14-336 16."""
    meta = dict(device="meta")
    siglip = {"visual.trunk.patch_embed.proj.weight": torch.empty(1152, 3, 14, 14, **meta),
              "visual.trunk.pos_embed": torch.empty(1, 256, 1152, **meta),
              "visual.trunk.blocks.0.mlp.fc1.weight": torch.empty(4304, 1152, **meta),
              **{f"visual.trunk.blocks.{i}.norm1.weight": torch.empty(1152, **meta) for i in range(27)},
              **{f"{SIGLIP_ADAPTER}{i}.fn.0.weight": torch.empty(8192, 4096, **meta) for i in range(4)}}
    config = infer_config(siglip)
    vision = config.vision_config
    assert (vision.num_attention_heads, vision.num_hidden_layers, vision.image_size, vision.intermediate_size,
            config.projection_dim, config.text_embedding_dim) == (16, 27, 224, 4304, 1152, 4096)
    openai = {"visual.conv1.weight": torch.empty(1024, 3, 14, 14, **meta),
              "visual.class_embedding": torch.empty(1024, **meta),
              "visual.positional_embedding": torch.empty(577, 1024, **meta),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.empty(4096, 1024, **meta),
              "visual.proj": torch.empty(1024, 1280, **meta),
              **{f"visual.transformer.resblocks.{i}.ln_1.weight": torch.empty(1024, **meta) for i in range(24)}}
    config = infer_config(openai, text_embedding_dim=4096)
    assert (config.vision_config.num_attention_heads, config.vision_config.image_size, config.projection_dim) == (
        16, 336, 1280)


@pytest.mark.parametrize("maker, key, prefix", [
    (lambda: openai_clip_state_dict(**OPENAI), "vision_model.embeddings.position_embedding.weight", 1),
    (lambda: timm_siglip_state_dict(**SIGLIP), "vision_model.embeddings.position_embedding.weight", 0),
])
def test_image_size_override_resizes_every_family(maker, key, prefix, tmp_path):
    model = convert_checkpoint(_save(maker(), tmp_path / "ck.pt"), image_size=48)
    assert model.config.vision_config.image_size == 48
    assert model.state_dict()[key].shape[0] == prefix + 36
    assert model.get_image_features(torch.randn(1, 3, 48, 48)).shape[0] == 1


def test_sources_that_are_not_there(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointConversionError, match="holds no checkpoint"):
        convert_checkpoint(tmp_path / "empty")
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 is set"):
        convert_checkpoint("someone/missing-llm2clip")
    assert attempts == []


def test_a_hub_id_is_downloaded_with_only_the_files_the_converter_reads(tmp_path, monkeypatch):
    """Online (simulated: no network here): the repo's file list picks the weights; snapshot_download fetches only
    them and config.json; the snapshot then converts like a folder."""
    import huggingface_hub

    from llm2clip_hf.conversion import model_loading

    official = openai_clip_state_dict(**OPENAI)
    snapshot = _hf_openai_folder(tmp_path, hf_openai_state_dict(official), official)
    calls = {}
    monkeypatch.setattr(model_loading, "hub_is_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: [
        "config.json", "model.safetensors", "modeling_clip.py", "configuration_clip.py", "CLIP.png"])

    def fake_snapshot_download(repo_id, **kw):
        calls.update(repo_id=repo_id, **kw)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, report = convert_checkpoint_with_report("microsoft/LLM2CLIP-Openai-B-16", revision="main")
    assert calls == {"repo_id": "microsoft/LLM2CLIP-Openai-B-16", "revision": "main",
                     "allow_patterns": ["config.json", "*.index.json", "model.safetensors"]}
    assert (report.source_kind, report.layout) == ("hub", "hf-openai-clip")
    torch.testing.assert_close(_features(model, _pixels(), _embeddings())[0],
                               openai_clip_image_features(official, _pixels(), 2), **TOL)


# ------------------------------------------------------------------------------------------------ reload, CLI
RELOAD = textwrap.dedent("""
    import sys
    sys.modules["llm2clip_hf"] = None  # remote code only: importing the package must fail here
    import numpy as np, torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    pixels, llm = torch.from_numpy(np.load(sys.argv[2])), torch.from_numpy(np.load(sys.argv[3]))
    with torch.no_grad():
        np.save(sys.argv[4], model.get_image_features(pixel_values=pixels).double().numpy())
        np.save(sys.argv[5], model.get_text_features(llm).double().numpy())
""")


def _family_case(family):
    """(state dict in the official layout, its float64 image and text references)."""
    if family == "eva02":
        state = official_state_dict(**SIZES)
        return state, eva02_image_features(state, _pixels(), 1), text_adapter_features(state, _embeddings())
    if family == "clip":
        state = openai_clip_state_dict(**OPENAI)
        return (state, openai_clip_image_features(state, _pixels(), 2),
                text_adapter_features(state, _embeddings()))
    state = timm_siglip_state_dict(**SIGLIP)
    return (state, timm_siglip_image_features(state, _pixels(), 2),
            text_adapter_features(state, _embeddings(), prefix=SIGLIP_ADAPTER, l2_normalize=False))


@pytest.mark.parametrize("family", ["eva02", "clip", "siglip"])
def test_converted_model_reloads_with_remote_code_alone(family, tmp_path):
    state, image_reference, text_reference = _family_case(family)
    model = convert_checkpoint(_save(state, tmp_path / "ck.pt"))
    model.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "pixels.npy", _pixels().numpy())
    np.save(tmp_path / "llm.npy", _embeddings().numpy())
    outputs = [str(tmp_path / "image.npy"), str(tmp_path / "text.npy")]
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "model"), str(tmp_path / "pixels.npy"),
                             str(tmp_path / "llm.npy"), *outputs], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.from_numpy(np.load(outputs[0])), image_reference, **TOL)
    torch.testing.assert_close(torch.from_numpy(np.load(outputs[1])), text_reference, **TOL)


@pytest.mark.parametrize("layout", ["eva_clip-eva02", "eva_clip-openai-clip", "eva_clip-timm-siglip",
                                    "hf-openai-clip", "hf-eva02"])
def test_cli_convert_detects_and_reports_each_layout(layout, tmp_path, capsys):
    extra = []
    family = {"eva_clip-eva02": "eva02", "eva_clip-openai-clip": "clip", "eva_clip-timm-siglip": "siglip",
              "hf-openai-clip": "clip", "hf-eva02": "eva02"}[layout]
    state, reference, _ = _family_case(family)
    if layout.startswith("eva_clip-"):
        source = _save(state, tmp_path / "ck.pt")
    elif layout == "hf-openai-clip":
        source = _hf_openai_folder(tmp_path, hf_openai_state_dict(state), state)
    else:
        (tmp_path / "repo").mkdir()
        torch.save(hf_eva02_state_dict(state), tmp_path / "repo" / "pytorch_model.bin")
        source, extra = tmp_path / "repo", ["--text_embedding_dim", "40"]
    assert cli_main(["convert", str(source), str(tmp_path / "out"), *extra]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["layout"], printed["family"]) == (layout, family)
    assert (printed["adapter"] == "new") == (layout == "hf-eva02")
    reloaded = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        image = reloaded.get_image_features(_pixels()).double()
    torch.testing.assert_close(image, reference, **TOL)


def test_cli_convert_explains_a_missing_text_embedding_dim(tmp_path, capsys):
    state = {k: v for k, v in official_state_dict(**SIZES).items() if not k.startswith("text.")}
    assert cli_main(["convert", str(_save(state, tmp_path / "ck.pt")), str(tmp_path / "out")]) == 1
    assert "--text_embedding_dim" in capsys.readouterr().err
