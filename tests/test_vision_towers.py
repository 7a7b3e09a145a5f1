"""LLM2CLIP on each published tower family: EVA02 (ours), OpenAI CLIP and SigLIP (transformers' own models).

Image features must equal transformers' ``CLIPModel`` / ``SiglipModel`` on the same weights, in memory and after a
reload with remote code alone; per-family projection, adapter normalisation and image preprocessing follow the
official checkpoints."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip_hf.modeling import image_processor_for
from llm2clip_hf.testing import tiny_vision_config

TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
LLM_WIDTH = 24

RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["llm2clip_hf"] = None  # remote code only
    import numpy as np, torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    pixels = torch.from_numpy(np.load(sys.argv[2]))
    llm = torch.from_numpy(np.load(sys.argv[3]))
    with torch.no_grad():
        out = {"image": model.get_image_features(pixel_values=pixels).tolist(),
               "text": model.get_text_features(llm).tolist(), "tower": type(model.vision_model).__name__}
    print(json.dumps(out))
""")


def reference_model(family, **vision):
    torch.manual_seed(0)
    if family == "clip":
        return CLIPModel(CLIPConfig(vision_config={**TOWER, **vision}, text_config=TEXT, projection_dim=16)).eval()
    return SiglipModel(SiglipConfig(vision_config={**TOWER, **vision}, text_config=TEXT)).eval()


def ours_from(reference):
    config = LLM2CLIPConfig(vision_config=reference.config.vision_config, text_embedding_dim=LLM_WIDTH,
                            projection_dim=getattr(reference.config, "projection_dim", None)
                            if isinstance(reference, CLIPModel) else None)
    model = LLM2CLIPModel(config).eval()
    vision = {k: v for k, v in reference.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    result = model.load_state_dict(vision, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("text_adapter.", "logit_")) for k in result.missing_keys), result.missing_keys
    return model


def reference_image_features(reference, pixels):
    with torch.no_grad():
        features = reference.get_image_features(pixel_values=pixels)
    return getattr(features, "pooler_output", features)


@pytest.mark.slow
@pytest.mark.parametrize("family, vision", [("clip", {}), ("clip", {"hidden_act": "gelu"}), ("siglip", {}),
                                            ("siglip", {"hidden_act": "gelu"})])
def test_image_features_equal_transformers_own_model_and_the_remote_code_reload(family, vision, tmp_path):
    reference = reference_model(family, **vision)
    model = ours_from(reference)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = model.get_image_features(pixels)
    torch.testing.assert_close(ours, reference_image_features(reference, pixels), rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path / "model")
    llm = torch.randn(2, LLM_WIDTH)
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    np.save(tmp_path / "llm.npy", llm.numpy())
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "model"), str(tmp_path / "pixels.npy"),
                             str(tmp_path / "llm.npy")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["tower"] == {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[family]
    torch.testing.assert_close(torch.tensor(reloaded["image"]), ours, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(reloaded["text"]), model.get_text_features(llm), rtol=0, atol=1e-6)


def test_family_defaults_follow_the_official_checkpoints():
    eva = LLM2CLIPConfig(vision_config=tiny_vision_config(), text_embedding_dim=LLM_WIDTH, projection_dim=16)
    clip = LLM2CLIPConfig(vision_config=reference_model("clip").config.vision_config, text_embedding_dim=LLM_WIDTH)
    siglip = LLM2CLIPConfig(vision_config=reference_model("siglip").config.vision_config, text_embedding_dim=LLM_WIDTH)
    assert (eva.vision_projection, eva.adapter_l2_normalize) == ("linear_bias", True)
    assert (clip.vision_projection, clip.adapter_l2_normalize) == ("linear", True)
    assert (siglip.vision_projection, siglip.adapter_l2_normalize, siglip.projection_dim) == ("none", False, 32)
    assert LLM2CLIPModel(eva).visual_projection.bias is not None
    assert LLM2CLIPModel(clip).visual_projection.bias is None
    assert LLM2CLIPModel(siglip).visual_projection is None
    with pytest.raises(ValueError, match="projection_dim must be 32"):
        LLM2CLIPConfig(vision_config=siglip.vision_config, projection_dim=64)
    # A saved config of any family reloads as the same family (model_type picks the class).
    for config in (eva, clip, siglip):
        again = LLM2CLIPConfig.from_dict(config.to_dict())
        assert type(again.vision_config) is type(config.vision_config)
        assert again.vision_projection == config.vision_projection


def test_adapter_normalisation_by_family():
    """EVA02 / CLIP adapters L2-normalise the LLM embedding (scale-invariant); the SigLIP2 model's does not."""
    llm = torch.randn(4, LLM_WIDTH)
    for family, invariant in (("clip", True), ("siglip", False)):
        model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=reference_model(family).config.vision_config,
                                             text_embedding_dim=LLM_WIDTH)).eval()
        with torch.no_grad():
            same = torch.allclose(model.get_text_features(llm), model.get_text_features(3.0 * llm), atol=1e-5)
        assert same == invariant, family


def test_image_processor_by_family(tmp_path):
    """CLIP / EVA02: OpenAI mean and std, resize of the short side and center crop; SigLIP: mean = std = 0.5, the
    whole image resized to the square. Checked against Pillow + numpy directly."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    siglip = reference_model("siglip").config.vision_config
    pixels = image_processor_for(siglip)(image, return_tensors="pt")["pixel_values"][0]
    expected = (np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(pixels, torch.from_numpy(expected.transpose(2, 0, 1)), rtol=0, atol=1e-5)
    clip = reference_model("clip").config.vision_config
    pixels = image_processor_for(clip)(image, return_tensors="pt")["pixel_values"][0]
    resized = image.resize((42, 32), Image.BICUBIC)  # short side 48 -> 32, long side int(64 * 32 / 48) = 42
    crop = np.asarray(resized, dtype=np.float32)[:, 5:37] / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(pixels, torch.from_numpy(((crop - mean) / std).astype(np.float32).transpose(2, 0, 1)),
                               rtol=0, atol=1e-5)
    model = LLM2CLIPModel(LLM2CLIPConfig(vision_config=siglip, text_embedding_dim=LLM_WIDTH))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [0.5, 0.5, 0.5] and saved["size"] == {"height": 32, "width": 32}


def test_logit_bias_enters_logits_and_the_sigmoid_loss():
    config = LLM2CLIPConfig(vision_config=reference_model("siglip").config.vision_config, text_embedding_dim=LLM_WIDTH,
                            logit_scale_init_value=math.log(10.0), logit_bias_init_value=-10.0)
    model = LLM2CLIPModel(config).eval()
    assert model.logit_bias.item() == -10.0
    pixels, llm = torch.randn(3, 3, 32, 32), torch.randn(3, LLM_WIDTH)
    with torch.no_grad():
        out = model(pixel_values=pixels, llm_embeddings=llm, return_loss=True)
        image = F.normalize(model.get_image_features(pixels), dim=-1)
        text = F.normalize(model.get_text_features(llm), dim=-1)
    logits = 10.0 * image @ text.t() - 10.0
    torch.testing.assert_close(out.logits_per_image, logits, rtol=0, atol=1e-5)
    naive = 0.0
    for i in range(3):
        for j in range(3):
            label = 1.0 if i == j else -1.0
            naive += math.log(1.0 + math.exp(-label * logits[i, j].item()))
    assert out.loss.item() == pytest.approx(naive / 3, rel=1e-5)
