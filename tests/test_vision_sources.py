"""Post-training a pretrained CLIP / SigLIP with an LLM (``--vision-model``), and one model from two published parts
(``attach_text_model`` / ``llm2clip-hf assemble``).

The image side of a pretrained model must survive exactly: after ``train --stage clip --learning-rate 0`` the saved
model, reloaded with remote code alone, gives transformers' own ``get_image_features`` bit for bit."""

import json
import logging
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel, pipeline

from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.cli import main
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.testing import tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.conversion import attach_text_model, llm2clip_from_pretrained_vision

TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99,
            max_position_embeddings=16)
LLM_WIDTH = 64  # hidden size of the tiny LLM fixture
CAPTIONS = ["short_caption", "long_caption"]
QUICK = ["--use-cpu", "--save-strategy", "no", "--disable-tqdm", "true", "--per-device-train-batch-size", "8",
         "--report-to", "none"]
LABELS = ["red circle", "blue square", "green stripe"]
TEMPLATE = "a photo of a {}"

# A process where llm2clip_hf cannot be imported: the saved model must work from its remote code alone.
RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["llm2clip_hf"] = None
    import numpy as np, torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    pixels = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
    np.save(sys.argv[3], features.numpy())
    print(json.dumps({"tower": type(model.vision_model).__name__, "module": type(model).__module__}))
""")


def save_reference(family, directory):
    """A tiny random transformers CLIPModel / SiglipModel saved as a user would (``save_pretrained``)."""
    torch.manual_seed(0)
    if family == "clip":
        model = CLIPModel(CLIPConfig(vision_config=TOWER, text_config=TEXT, projection_dim=24))
    else:
        model = SiglipModel(SiglipConfig(vision_config=TOWER, text_config=TEXT))
        with torch.no_grad():  # a trained SigLIP's temperature and bias, not the all-zero init
            model.logit_scale.fill_(2.5)
            model.logit_bias.fill_(-7.0)
    model.save_pretrained(directory)
    return directory


def reference_features(directory, pixels, family="clip"):
    """transformers' own ``get_image_features`` of the saved source."""
    model = (CLIPModel if family == "clip" else SiglipModel).from_pretrained(directory).eval()
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).pooler_output


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {family: save_reference(family, root / f"tiny-{family}") for family in ("clip", "siglip")}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for i, row in enumerate(tiny_image_caption_rows()[:16]):
        row["image"].save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "short_caption": row["short_caption"],
                     "long_caption": row["long_caption"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def llm(tiny_llm_dir):
    return LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=64)


def pixels_for_test(seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((3, 3, 32, 32)).astype(np.float32))


def reload_image_features(model_dir, pixels, tmp_path):
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    result = subprocess.run([sys.executable, "-c", RELOAD, str(model_dir), str(tmp_path / "pixels.npy"),
                             str(tmp_path / "features.npy")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["module"].startswith("transformers_modules.")
    return torch.from_numpy(np.load(tmp_path / "features.npy")), info


# ------------------------------------------------------------------------------------------------ CLI, lr 0
@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_cli_post_training_with_lr0_keeps_transformers_image_features_exactly(family, sources, image_folder,
                                                                                tiny_llm_dir, tmp_path):
    source, out = sources[family], tmp_path / "out"
    code = main(["train", "--stage", "clip", "--text-model", str(tiny_llm_dir), "--vision-model", str(source),
                 "--dataset", str(image_folder), "--caption-columns", *CAPTIONS, "--output-dir", str(out),
                 "--max-steps", "2", "--learning-rate", "0", *QUICK])
    assert code == 0
    pixels = pixels_for_test()
    reloaded, info = reload_image_features(out, pixels, tmp_path)
    assert info["tower"] == ("CLIPVisionModel" if family == "clip" else "SiglipVisionModel")
    assert torch.equal(reloaded, reference_features(source, pixels, family))
    # The temperature (and SigLIP's bias) of the source survive; the text side is the LLM's, embedded.
    saved, original = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    assert torch.equal(saved["logit_scale"].reshape(()), original["logit_scale"].reshape(()))
    assert not any(key.startswith("text_projection") or ".text_model.embeddings" in key for key in saved)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"] is not None and config["text_model_fingerprint"]
    processor = json.loads((out / "processor_config.json").read_text())["image_processor"]
    if family == "siglip":
        assert torch.equal(saved["logit_bias"].reshape(()), original["logit_bias"].reshape(()))
        assert config["logit_bias_init_value"] == -7.0 and config["vision_projection"] == "none"
        assert processor["image_mean"] == [0.5, 0.5, 0.5] and "crop_size" not in processor
    else:
        assert "logit_bias" not in saved and config["projection_dim"] == 24
        assert torch.equal(saved["visual_projection.weight"], original["visual_projection.weight"])
        assert processor["image_mean"][0] == pytest.approx(0.48145466)


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_stage2_from_a_pretrained_tower_trains_and_lr0_changes_nothing(family, sources, llm, tmp_path):
    rows = Dataset.from_list(tiny_image_caption_rows()[:16])
    cached = precompute_text_embeddings(rows, llm, CAPTIONS, output_dir=tmp_path / "cache")

    def train(learning_rate):
        torch.manual_seed(0)
        model = llm2clip_from_pretrained_vision(sources[family], llm, embed_text_model=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        args = LLM2CLIPTrainingArguments(
            output_dir=str(tmp_path / f"run{learning_rate}"), stage="clip", learning_rate=learning_rate, max_steps=3,
            warmup_steps=0, per_device_train_batch_size=8, use_cpu=True, save_strategy="no", disable_tqdm=True,
            report_to="none", logging_steps=1)
        trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=cached, text_model=llm)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return before, model.state_dict(), losses

    before, after, losses = train(1e-3)
    assert len(losses) == 3 and all(np.isfinite(losses))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("text_adapter.") for k in changed)
    if family == "clip":
        assert "visual_projection.weight" in changed
    before, after, _ = train(0.0)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                        after[k])]


def test_projection_dim_gives_a_new_projection_and_logs_it(sources, llm, caplog):
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion.pretrained_vision"):
        model = llm2clip_from_pretrained_vision(sources["clip"], llm, embed_text_model=False, projection_dim=40)
    assert model.visual_projection.weight.shape == (40, 32)
    assert "new image projection 32 -> 40" in caplog.text and "new text adapter for 64-d" in caplog.text
    original = CLIPModel.from_pretrained(sources["clip"])
    tower = original.vision_model.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in model.vision_model.state_dict().items())


def test_the_sources_preprocessing_is_compared_not_applied(sources, llm, tmp_path, caplog):
    from transformers import CLIPImageProcessorPil

    from llm2clip_hf.modeling import clip_image_processor

    for name, processor in [("same", clip_image_processor(32)),
                            ("other", CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size=48,
                                                            image_mean=[0.5] * 3, image_std=[0.5] * 3))]:
        shutil.copytree(sources["clip"], tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion.pretrained_vision"):
            model = llm2clip_from_pretrained_vision(tmp_path / name, llm)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if name == "same":
            assert warned == []
        else:
            assert len(warned) == 1 and "image_mean [0.5, 0.5, 0.5] (source)" in warned[0]
            assert "image size (48, 48) (source) vs (32, 32)" in warned[0]
        model.save_pretrained(tmp_path / f"{name}-out")
        saved = json.loads((tmp_path / f"{name}-out" / "processor_config.json").read_text())["image_processor"]
        assert saved["image_mean"][0] == pytest.approx(0.48145466)  # the family's, whatever the source says


def test_a_sources_remote_code_is_never_run(sources, llm, tmp_path):
    folder = tmp_path / "with-code"
    shutil.copytree(sources["clip"], folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass CustomModel: pass\n")
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass CustomConfig: pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    model = llm2clip_from_pretrained_vision(folder, llm, embed_text_model=False).eval()
    assert not marker.exists()
    pixels = pixels_for_test()
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixels), reference_features(sources["clip"], pixels))


# ------------------------------------------------------------------------------------------------ two parts -> one
def image_side(family, sources, width=LLM_WIDTH):
    """A model that reads LLM embeddings only, as the official checkpoints are published."""
    torch.manual_seed(1)
    if family == "eva02":
        return LLM2CLIPModel(LLM2CLIPConfig(vision_config=tiny_vision_config(), text_embedding_dim=width,
                                            projection_dim=32))
    return llm2clip_from_pretrained_vision(sources[family], text_embedding_dim=width)


@pytest.mark.parametrize("family", ["eva02", "clip", "siglip"])
def test_attach_text_model_then_the_zero_shot_pipeline_takes_raw_labels(family, sources, llm, tmp_path):
    model = image_side(family, sources)
    assert model.text_model is None
    assembled = attach_text_model(model, llm)
    assert assembled.text_model is not None and assembled.config.text_config.hidden_size == LLM_WIDTH
    assembled.save_pretrained(tmp_path)
    image = tiny_image_caption_rows()[0]["image"]
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    scores = {s["label"]: s["score"] for s in classify(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)}
    processor = assembled.build_processor()
    with torch.no_grad():
        probs = assembled.eval()(**processor(text=[TEMPLATE.format(l) for l in LABELS], images=image)).logits_per_image
        probs = probs.softmax(-1)[0]
        # the text path through the embedded encoder is the adapter applied to the LLM's own embeddings
        tokens = processor(text=[TEMPLATE.format(l) for l in LABELS])
        torch.testing.assert_close(assembled.get_text_features(**tokens),
                                   assembled.get_text_features(llm.encode([TEMPLATE.format(l) for l in LABELS])),
                                   rtol=1e-5, atol=1e-5)
    for i, label in enumerate(LABELS):
        assert scores[label] == pytest.approx(probs[i].item(), abs=1e-5)


def test_attach_text_model_with_another_llm_width_names_both(sources, llm):
    model = image_side("eva02", sources, width=48)
    with pytest.raises(ValueError, match=r"takes 48-d LLM embeddings, but the text model .* produces 64-d ones"):
        attach_text_model(model, llm)


def test_cli_assemble_writes_one_model_that_classifies(sources, tiny_llm_dir, llm, tmp_path, capsys):
    parts = image_side("eva02", sources)
    parts.save_pretrained(tmp_path / "converted")
    code = main(["assemble", "--model", str(tmp_path / "converted"), "--text-model", str(tiny_llm_dir),
                 "--output-dir", str(tmp_path / "one")])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    assert summary["adapter"] == "checkpoint" and summary["vision_family"] == "eva02"
    assert summary["text_embedding_dim"] == LLM_WIDTH
    assembled = LLM2CLIPModel.from_pretrained(tmp_path / "one").eval()
    assert assembled.text_model is not None and assembled.text_model.tokenizer is not None
    reference = parts.eval().state_dict()
    assert all(torch.equal(v, assembled.state_dict()[k]) for k, v in reference.items())
    pixels = pixels_for_test()
    with torch.no_grad():
        assert torch.equal(assembled.get_image_features(pixels), parts.get_image_features(pixels))
    # the adapter of a 48-d LLM cannot be assembled with the 64-d one: error naming both, exit 1
    image_side("eva02", sources, width=48).save_pretrained(tmp_path / "wide")
    code = main(["assemble", "--model", str(tmp_path / "wide"), "--text-model", str(tiny_llm_dir),
                 "--output-dir", str(tmp_path / "bad")])
    assert code == 1 and "takes 48-d LLM embeddings" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ LLM2CLIP sources
def test_llm2clip_source_keeps_a_matching_adapter_and_renews_another_width(sources, llm, tmp_path, caplog):
    parts = image_side("eva02", sources)
    parts.save_pretrained(tmp_path / "same")
    model = llm2clip_from_pretrained_vision(tmp_path / "same", llm, embed_text_model=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in parts.state_dict().items())
    wide = image_side("eva02", sources, width=48)
    wide.save_pretrained(tmp_path / "wide")
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion.pretrained_vision"):
        model = llm2clip_from_pretrained_vision(tmp_path / "wide", llm)
    assert "new text adapter for 64-d LLM embeddings (the checkpoint's adapter takes 48-d" in caplog.text
    assert model.config.text_embedding_dim == LLM_WIDTH and model.text_model is not None
    kept = {k: v for k, v in wide.state_dict().items() if not k.startswith("text_adapter.")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items())
    with pytest.raises(ValueError, match="takes 48-d LLM embeddings"):
        llm2clip_from_pretrained_vision(tmp_path / "wide", llm, adapter="keep")


def official_checkpoint(tmp_path, adapter=True):
    """An official eva_clip-layout .pt (EVA02 width 64, adapter for 40-d LLM embeddings), as LLM2CLIP publishes."""
    from reference_impl import official_state_dict

    state = official_state_dict(width=64, depth=2, patch=8, grid=4, mlp=170, proj=24, llm_dim=40)
    path = tmp_path / ("official.pt" if adapter else "tower_only.pt")
    torch.save(state if adapter else {k: v for k, v in state.items() if not k.startswith("text.")}, path)
    return path


def test_eva_clip_pt_with_an_adapter_of_another_width_gets_a_new_one(llm, tmp_path, caplog):
    from llm2clip_hf.conversion import convert_eva_clip_checkpoint

    path = official_checkpoint(tmp_path)
    reference = convert_eva_clip_checkpoint(path, vision_num_heads=1).eval()
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion.pretrained_vision"):
        model = llm2clip_from_pretrained_vision(path, llm, vision_num_heads=1).eval()
    assert "the checkpoint's adapter takes 40-d embeddings, the LLM gives 64-d ones" in caplog.text
    assert model.config.text_embedding_dim == LLM_WIDTH and model.text_model is not None
    pixels = pixels_for_test()
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixels), reference.get_image_features(pixels))
    assert model.logit_scale.item() == reference.logit_scale.item()


def test_a_published_eva02_repo_folder_assembles_from_its_pt(llm, tmp_path):
    """The published LLM2CLIP-EVA02 repos hold the eva_clip .pt beside a Hugging Face export whose config.json names
    an ``evaclip`` model: assemble (and --vision-model) convert the .pt, as ``convert`` does, instead of refusing the
    unknown model type (issue 37: README's recipe assembles microsoft/LLM2CLIP-EVA02-L-14-336)."""
    from llm2clip_hf.conversion import assemble, convert_checkpoint
    from reference_impl import official_state_dict

    repo = tmp_path / "LLM2CLIP-EVA02-B-16"
    repo.mkdir()
    torch.save(official_state_dict(width=64, depth=2, patch=8, grid=4, mlp=170, proj=24, llm_dim=LLM_WIDTH),
               repo / "LLM2CLIP-EVA02-B-16.pt")
    (repo / "config.json").write_text(json.dumps({"architectures": ["EvaCLIPModel"], "model_type": "evaclip"}))
    summary = assemble(repo, llm, tmp_path / "full")
    assert (summary["source_kind"], summary["vision_family"], summary["adapter"]) == (
        "published-llm2clip", "eva02", "checkpoint")
    reference = convert_checkpoint(repo).eval()
    assembled = LLM2CLIPModel.from_pretrained(tmp_path / "full").eval()
    pixels = pixels_for_test()
    with torch.no_grad():
        assert torch.equal(assembled.get_image_features(pixels), reference.get_image_features(pixels))


def test_eva_clip_pt_without_adapter_through_the_converter(llm, tmp_path, caplog):
    from llm2clip_hf import conversion as convert

    if not hasattr(convert, "convert_checkpoint"):
        pytest.skip("needs llm2clip_hf.conversion.convert_checkpoint (converter of adapter-less open_clip / EVA-CLIP "
                    ".pt files), which is not in this tree yet")
    reference = convert.convert_eva_clip_checkpoint(official_checkpoint(tmp_path), vision_num_heads=1).eval()
    with caplog.at_level(logging.INFO, logger="llm2clip_hf.conversion.pretrained_vision"):
        model = llm2clip_from_pretrained_vision(official_checkpoint(tmp_path, adapter=False), llm,
                                                vision_num_heads=1).eval()
    assert "the checkpoint has no text adapter" in caplog.text
    assert model.config.text_embedding_dim == LLM_WIDTH and model.text_model is not None
    pixels = pixels_for_test()
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixels), reference.get_image_features(pixels))


# ------------------------------------------------------------------------------------------------ errors
def test_missing_hub_model_offline_makes_no_network_call(monkeypatch):
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 is set.*huggingface-cli download someone/missing-clip"):
        llm2clip_from_pretrained_vision("someone/missing-clip", text_embedding_dim=LLM_WIDTH)
    assert attempts == []


def test_unsupported_sources_are_named_with_the_supported_kinds(tiny_llm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'llama' model \(LlamaModel\), which is not a supported vision source.*"
                                         r"CLIPModel.*SiglipVisionModel.*\.pt"):
        llm2clip_from_pretrained_vision(tiny_llm_dir, text_embedding_dim=LLM_WIDTH)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without config.json"):
        llm2clip_from_pretrained_vision(tmp_path / "empty", text_embedding_dim=LLM_WIDTH)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported kind"):
        llm2clip_from_pretrained_vision(tmp_path / "notes.txt", text_embedding_dim=LLM_WIDTH)


def test_a_transformers_source_needs_the_llm_width(sources):
    with pytest.raises(ValueError, match="has no text adapter: pass text_model"):
        llm2clip_from_pretrained_vision(sources["clip"])


@pytest.mark.parametrize("extra, message", [
    (["--model", "{clip}"], "--model and --vision-model are mutually exclusive"),
    (["--vision-width", "64", "--vision-preset", "L/14"], "--vision-preset, --vision-width describe a new EVA02 tower"),
])
def test_cli_rejects_conflicting_model_options(extra, message, sources, image_folder, tiny_llm_dir, tmp_path, capsys):
    code = main(["train", "--stage", "clip", "--text-model", str(tiny_llm_dir), "--vision-model", str(sources["clip"]),
                 "--dataset", str(image_folder), "--output-dir", str(tmp_path), *QUICK,
                 *[a.format(clip=sources["clip"]) for a in extra]])
    assert code == 1 and message in capsys.readouterr().err
