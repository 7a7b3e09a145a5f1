import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel, LLM2CLIPProcessor, TextAdapter
from llm2clip_hf.testing import tiny_llm2clip_config
from reference_impl import text_adapter_features


@pytest.fixture()
def clip_model(text_model):
    """A tiny LLM2CLIP model with the tiny text encoder embedded (random weights, seeded)."""
    torch.manual_seed(0)
    model = LLM2CLIPModel(tiny_llm2clip_config(text_config=text_model.config)).eval()
    model.text_model.load_state_dict(text_model.state_dict())
    model.text_model.tokenizer = text_model.tokenizer
    return model


@pytest.fixture()
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 5 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def test_adapter_matches_official_formula():
    torch.manual_seed(0)
    adapter = TextAdapter(24, 8)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {f"text.text_adaptor.{k.removeprefix('layers.')}": v for k, v in adapter.state_dict().items()}
    embeddings = torch.randn(5, 24) * 3
    torch.testing.assert_close(adapter(embeddings).double(), text_adapter_features(state, embeddings), rtol=0, atol=1e-5)


def test_adapter_ignores_embedding_scale():
    adapter = TextAdapter(16, 8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(adapter(x), adapter(7.5 * x))


def test_forward_logits_and_loss(clip_model, images, captions):
    processor = clip_model.build_processor()
    inputs = processor(text=captions[:3], images=images)
    with torch.no_grad():
        out = clip_model(**inputs, return_loss=True)
        img = F.normalize(clip_model.get_image_features(inputs["pixel_values"]), dim=-1)
        txt = F.normalize(clip_model.get_text_features(clip_model.text_model.encode(captions[:3])), dim=-1)
    logits = clip_model.logit_scale.exp() * img @ txt.t()
    torch.testing.assert_close(out.logits_per_image, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits_per_text, logits.t(), rtol=0, atol=1e-5)
    labels = torch.arange(3)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)


def test_text_features_from_tokens_equal_features_from_embeddings(clip_model, captions):
    batch = clip_model.text_model.tokenize(captions)
    with torch.no_grad():
        from_tokens = clip_model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                   pooling_mask=batch["pooling_mask"])
        from_embeddings = clip_model.get_text_features(clip_model.text_model.encode(captions))
    torch.testing.assert_close(from_tokens, from_embeddings, rtol=0, atol=1e-5)


def test_save_and_reload_round_trip(clip_model, images, captions, tmp_path):
    clip_model.save_pretrained(tmp_path)
    reloaded = LLM2CLIPModel.from_pretrained(tmp_path).eval()
    processor = LLM2CLIPProcessor.from_pretrained(tmp_path)
    inputs = processor(text=captions, images=images)
    with torch.no_grad():
        a, b = clip_model(**inputs), reloaded(**inputs)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_llm2clip.LLM2CLIPModel"
    assert {"modeling_llm2clip.py", "modeling_eva02.py", "processing_llm2clip.py"} <= {p.name for p in tmp_path.iterdir()}


REMOTE_SCRIPT = textwrap.dedent("""
    import sys, json, torch, numpy as np
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "llm2clip_hf" or name.startswith("llm2clip_hf."):
                raise ImportError("llm2clip_hf is blocked in this process")
    sys.meta_path.insert(0, Block())
    from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline
    from PIL import Image
    path = sys.argv[1]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    with torch.no_grad():
        logits = model(**processor(text=["a dog", "a photo of a cat"], images=image)).logits_per_image
    classify = pipeline("zero-shot-image-classification", model=path, trust_remote_code=True)
    scores = classify(image, candidate_labels=["dog", "cat"], hypothesis_template="a photo of a {}")
    print(json.dumps({"config": type(config).__name__, "model": type(model).__module__, "logits": logits.tolist(),
                      "pipeline": {s["label"]: s["score"] for s in scores}}))
""")


def test_remote_code_loads_without_the_package(clip_model, captions, tmp_path):
    clip_model.save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["config"] == "LLM2CLIPConfig" and out["model"].startswith("transformers_modules.")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    processor = clip_model.build_processor()
    with torch.no_grad():
        logits = clip_model(**processor(text=["a dog", "a photo of a cat"], images=image)).logits_per_image
        probs = clip_model(**processor(text=["a photo of a dog", "a photo of a cat"], images=image)).logits_per_image.softmax(-1)
    torch.testing.assert_close(torch.tensor(out["logits"]), logits, rtol=0, atol=1e-5)
    assert out["pipeline"]["dog"] == pytest.approx(probs[0, 0].item(), abs=1e-5)
    assert out["pipeline"]["cat"] == pytest.approx(probs[0, 1].item(), abs=1e-5)


def test_model_without_text_encoder_takes_embeddings_only(tmp_path):
    model = LLM2CLIPModel(tiny_llm2clip_config(text_embedding_dim=48)).eval()
    assert model.text_model is None
    features = model.get_text_features(torch.randn(2, 48))
    assert features.shape == (2, 32)
    with pytest.raises(ValueError, match="no embedded text encoder"):
        model.get_text_features(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, 48\).*different LLM"):
        model.get_text_features(torch.randn(2, 64))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()


def test_embedding_width_must_match_the_embedded_llm(text_model):
    with pytest.raises(ValueError, match="text_embedding_dim=100 does not match"):
        LLM2CLIPConfig(text_config=text_model.config, text_embedding_dim=100)


def test_the_usual_clip_processor_call_is_accepted(clip_model, images, captions, tmp_path):
    """Issue 33 item 9: ``processor(text=..., images=..., return_tensors="pt", padding=True)`` as CLIPProcessor is
    called raised a TypeError (padding went to the image processor). padding="max_length" pads on the left."""
    clip_model.save_pretrained(tmp_path)
    processor = LLM2CLIPProcessor.from_pretrained(tmp_path)
    plain = processor(text=captions, images=images)
    usual = processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True)
    for key in plain:
        torch.testing.assert_close(usual[key], plain[key], rtol=0, atol=0)
    padded = processor(text=captions, padding="max_length", max_length=40)
    assert padded["input_ids"].shape == (len(captions), 40)
    with torch.no_grad():
        torch.testing.assert_close(clip_model.get_text_features(**padded),
                                   clip_model.get_text_features(**processor(text=captions, max_length=40)),
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="always padded"):
        processor(text=captions, padding=False)


def test_a_model_built_from_a_config_refuses_to_save_without_its_tokenizer(clip_model, tmp_path):
    """Issue 33 item 10: an embedded text encoder without a tokenizer was saved without tokenizer and processor,
    silently, and the zero-shot pipeline failed on the folder. Now nothing is written and the error names the fix."""
    clip_model.text_model.tokenizer = None
    with pytest.raises(ValueError, match="embed_text_model=True"):
        clip_model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
