"""`llm2clip-hf export-vision`: an LLM2CLIP model's tower as a standalone folder (every hidden-state layer equal to the
model's tower; CLIP / SigLIP towers as transformers' own classes, loadable without this package), and docs/llava.md's
Llava recipe on it: LlavaForConditionalGeneration with the exported tower, forward, generate, save and reload."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, SiglipVisionConfig)

from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip_hf.cli import main
from llm2clip_hf.testing import tiny_image_caption_rows, tiny_vision_config

TOWER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
VISION_CONFIGS = {"eva02": lambda: tiny_vision_config(), "clip": lambda: CLIPVisionConfig(**TOWER),
                  "siglip": lambda: SiglipVisionConfig(**TOWER)}

# A process where llm2clip_hf cannot be imported: the exported tower must load from its folder alone.
RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["llm2clip_hf"] = None
    import numpy as np, torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[3] == "remote").eval()
    with torch.no_grad():
        states = model(pixel_values=torch.from_numpy(np.load(sys.argv[2])), output_hidden_states=True).hidden_states
    np.save(sys.argv[2] + ".out.npy", torch.stack(states).numpy())
    print(json.dumps({"class": type(model).__name__, "module": type(model).__module__}))
""")


def llm2clip_model(family):
    torch.manual_seed(0)
    return LLM2CLIPModel(LLM2CLIPConfig(vision_config=VISION_CONFIGS[family](), text_embedding_dim=24,
                                        projection_dim=None if family == "siglip" else 16)).eval()


@pytest.fixture(scope="module", params=["eva02", "clip", "siglip"])
def exported(request, tmp_path_factory):
    family = request.param
    model = llm2clip_model(family)
    source, output = tmp_path_factory.mktemp(f"{family}_model"), tmp_path_factory.mktemp(f"{family}_tower")
    model.save_pretrained(source)
    assert main(["export-vision", "--model", str(source), "--output-dir", str(output)]) == 0
    processor = AutoImageProcessor.from_pretrained(output)
    pixels = processor(images=[r["image"] for r in tiny_image_caption_rows()[:2]], return_tensors="pt")["pixel_values"]
    return family, model, output, pixels


def test_every_hidden_state_equals_the_models_tower_without_the_package(exported, tmp_path):
    family, model, output, pixels = exported
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    mode = "remote" if family == "eva02" else "plain"  # CLIP / SigLIP: transformers' own classes, no remote code
    result = subprocess.run([sys.executable, "-c", RELOAD, str(output), str(tmp_path / "pixels.npy"), mode],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    expected_class = {"eva02": "EVA02VisionModel", "clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[family]
    assert info["class"] == expected_class
    assert info["module"].startswith("transformers_modules" if family == "eva02" else "transformers.models")
    with torch.no_grad():
        expected = torch.stack(model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states)
    got = torch.from_numpy(np.load(str(tmp_path / "pixels.npy") + ".out.npy"))
    assert got.shape == expected.shape and got.shape[0] == model.config.vision_config.num_hidden_layers + 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_image_processor_is_the_one_the_tower_was_trained_with(exported):
    family, model, output, _ = exported
    saved = AutoImageProcessor.from_pretrained(output)
    size = model.config.vision_config.image_size
    mean, std = ((0.5, 0.5, 0.5),) * 2 if family == "siglip" else (
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert list(saved.image_mean) == pytest.approx(mean) and list(saved.image_std) == pytest.approx(std)
    if family == "siglip":  # the whole image resized to the square
        assert (saved.size["height"], saved.size["width"]) == (size, size) and not getattr(saved, "do_center_crop", False)
    else:  # short side resized, then a center crop
        assert saved.size["shortest_edge"] == size and saved.do_center_crop
        assert (saved.crop_size["height"], saved.crop_size["width"]) == (size, size)


def tiny_llava(tower_dir, family):
    """The docs/llava.md recipe: LlavaConfig around the exported tower's config and any causal LM's."""
    vision_config = AutoConfig.from_pretrained(tower_dir)
    text_config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=127,
                         vision_feature_layer=-2,
                         vision_feature_select_strategy="full" if family == "siglip" else "default")
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(AutoModel.from_pretrained(tower_dir).state_dict())
    return llava


def test_llava_on_the_exported_tower_forward_generate_save_reload(exported, tmp_path):
    family, model, output, pixels = exported
    llava = tiny_llava(output, family)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    input_ids = torch.tensor([[1] + [127] * grid**2 + [5, 6, 7]] * 2)
    with torch.no_grad():
        image_features = llava.model.get_image_features(pixel_values=pixels)
        features = image_features.pooler_output if hasattr(image_features, "pooler_output") else image_features
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        # the projector reads the tower's second-to-last hidden state, patch tokens only (CLS dropped)
        states = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        states = states if family == "siglip" else states[:, 1:]
        torch.testing.assert_close(features.reshape(-1, features.shape[-1]),
                                   llava.model.multi_modal_projector(states).reshape(-1, features.shape[-1]))
        logits = llava(input_ids=input_ids, pixel_values=pixels).logits
        generated = llava.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert logits.shape == (2, input_ids.shape[1], 128) and torch.isfinite(logits).all()
    assert generated.shape == (2, input_ids.shape[1] + 3)
    llava.save_pretrained(tmp_path / "llava")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, pixel_values=pixels).logits, logits)


LLAVA_RELOAD = textwrap.dedent("""
    import sys
    if sys.argv[2] == "without":
        sys.modules["llm2clip_hf"] = None
    else:
        import llm2clip_hf  # registers EVA02VisionConfig / EVA02VisionModel with transformers' Auto classes
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])
    print(type(model.model.vision_tower).__name__)
""")


@pytest.mark.slow
def test_a_saved_llava_rebuilds_an_eva02_tower_only_where_llm2clip_hf_is_imported(exported, tmp_path):
    family, _, output, _ = exported
    tiny_llava(output, family).save_pretrained(tmp_path / "llava")
    runs = {mode: subprocess.run([sys.executable, "-c", LLAVA_RELOAD, str(tmp_path / "llava"), mode],
                                 capture_output=True, text=True, timeout=300) for mode in ("without", "with")}
    assert runs["with"].returncode == 0, runs["with"].stderr[-2000:]
    if family == "eva02":
        assert runs["without"].returncode != 0 and "Unrecognized model type for subconfig: llm2clip_eva02_vision" in runs["without"].stderr
    else:  # transformers' own tower classes: no package needed
        assert runs["without"].returncode == 0, runs["without"].stderr[-2000:]
        assert runs["without"].stdout.strip() == runs["with"].stdout.strip()
