"""Every `llm2clip-hf` command on tiny data in the formats users bring (jsonl, csv, parquet, imagefolder)."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.cli import main
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows
from llm2clip_hf.trainers import read_cache_metadata, text_model_fingerprint

TINY_TOWER = ["--vision-preset", "B/16", "--image-size", "32", "--patch-size", "8", "--vision-width", "64",
              "--vision-layers", "2", "--vision-heads", "2", "--projection-dim", "32"]
QUICK = ["--use-cpu", "--save-strategy", "no", "--disable-tqdm", "true", "--per-device-train-batch-size", "8"]


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(text):
    return json.loads(text[text.index("{\n"):])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The same 32 image-caption rows as an imagefolder, a csv with relative image paths, and a parquet file;
    plus caption pairs as jsonl. The imagefolder's second caption column holds two captions per image."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rows = []
    for i, row in enumerate(tiny_image_caption_rows()):
        row["image"].save(root / "images" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "short_caption": row["short_caption"],
                     "long_caption": [row["long_caption"], row["long_caption"].replace("photo", "picture")]})
    with open(root / "images" / "metadata.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    table = pd.DataFrame([{"image": f"images/{r['file_name']}", "short_caption": r["short_caption"],
                           "long_caption": r["long_caption"][0], "label": r["short_caption"].split()[1]}
                          for r in rows])
    table.to_csv(root / "captions.csv", index=False)
    table.to_parquet(root / "captions.parquet")
    with open(root / "pairs.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in tiny_caption_pair_rows())
    return root


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory, data_dir, tiny_llm_dir):
    out = tmp_path_factory.mktemp("clip")
    code = main(["train", "--stage", "clip", "--text-model", str(tiny_llm_dir), "--dataset", str(data_dir / "images"),
                 "--output-dir", str(out), "--max-steps", "4", "--eval-fraction", "0.25", *TINY_TOWER, *QUICK])
    assert code == 0
    return out


def test_evaluate_caption_retrieval_matches_direct_computation(capsys, data_dir, tiny_llm_dir, tmp_path):
    code, out, _ = run_cli(capsys, "evaluate", "--task", "caption-retrieval", "--text-model", tiny_llm_dir,
                           "--dataset", data_dir / "pairs.jsonl", "--output-dir", tmp_path)
    assert code == 0
    metrics = last_json(out)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    rows = tiny_caption_pair_rows()
    short = F.normalize(text_model.encode([r["short_caption"] for r in rows]), dim=-1)
    long = F.normalize(text_model.encode([r["long_caption"] for r in rows]), dim=-1)
    expected = 100 * ((short @ long.T).argmax(1) == torch.arange(len(rows))).float().mean().item()
    assert metrics["cra_a_to_b"] == pytest.approx(expected)
    assert json.loads((tmp_path / "metrics_caption-retrieval.json").read_text()) == metrics


def test_train_caption_stage_then_evaluate_the_saved_encoder(capsys, data_dir, tiny_llm_dir, tmp_path):
    args = ["--text-model", tiny_llm_dir, "--dataset", data_dir / "pairs.jsonl"]
    _, before, _ = run_cli(capsys, "evaluate", "--task", "caption-retrieval", *args)
    code, out, _ = run_cli(capsys, "train", "--stage", "caption", *args, "--output-dir", tmp_path / "s1",
                           "--max-steps", "20", "--learning-rate", "2e-3", "--warmup-steps", "0",
                           "--per-device-train-batch-size", "16", "--use-cpu", "--save-strategy", "no",
                           "--eval-fraction", "0.25")
    metrics = last_json(out)
    assert code == 0 and metrics["stage"] == "caption"
    assert metrics["eval_num_pairs"] == 8 and 0 <= metrics["eval_cra"] <= 100  # the Trainer's evaluation hook
    assert (tmp_path / "s1" / "metrics.json").is_file() and (tmp_path / "s1" / "model.safetensors").is_file()
    code, after, _ = run_cli(capsys, "evaluate", "--task", "caption-retrieval", "--text-model", tmp_path / "s1",
                             "--dataset", data_dir / "pairs.jsonl")
    assert code == 0
    assert last_json(after)["cra"] > last_json(before)["cra"] + 20


def test_train_clip_stage_on_imagefolder_with_several_captions_per_image(clip_model_dir):
    metrics = json.loads((clip_model_dir / "metrics.json").read_text())
    assert metrics["eval_num_images"] == 8 and metrics["eval_num_captions"] == 24  # 3 captions per held-out image
    assert 0 <= metrics["eval_image_to_text_R@1"] <= 100
    model = LLM2CLIPModel.from_pretrained(clip_model_dir)
    assert model.text_model is not None and model.config.text_model_fingerprint
    assert (clip_model_dir / "_embedding_cache" / "llm2clip_embedding_cache.json").is_file()


@pytest.mark.parametrize("source", ["captions.csv", "captions.parquet", "images"])
def test_evaluate_retrieval_on_every_format(capsys, clip_model_dir, data_dir, source):
    code, out, err = run_cli(capsys, "evaluate", "--task", "retrieval", "--model", clip_model_dir,
                             "--dataset", data_dir / source, "--caption-columns", "short_caption", "long_caption")
    assert code == 0, err
    metrics = last_json(out)
    assert metrics["num_images"] == 32
    assert metrics["num_captions"] == (96 if source == "images" else 64)


def test_evaluate_zero_shot_from_label_strings(capsys, clip_model_dir, data_dir):
    code, out, _ = run_cli(capsys, "evaluate", "--task", "zeroshot", "--model", clip_model_dir,
                           "--dataset", data_dir / "captions.csv", "--label-column", "label",
                           "--templates", "a {}", "a {} shape")
    assert code == 0
    metrics = last_json(out)
    assert metrics["num_classes"] == 8 and 0 <= metrics["zeroshot_top1"] <= 100


def test_embed_writes_a_cache_bound_to_the_text_model(capsys, data_dir, tiny_llm_dir, tmp_path):
    code, out, _ = run_cli(capsys, "embed", "--text-model", tiny_llm_dir, "--dataset", data_dir / "captions.csv",
                           "--image-column", "image", "--output-dir", tmp_path / "cache")
    assert code == 0
    from datasets import load_from_disk

    cached = load_from_disk(str(tmp_path / "cache"))
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    assert read_cache_metadata(cached)["fingerprint"] == text_model_fingerprint(text_model)
    expected = text_model.encode(list(cached["short_caption"]))
    assert torch.allclose(torch.tensor(cached["short_caption_llm_embedding"]), expected, atol=1e-5)
    # the cache folder trains stage 2 directly (no text model needed: it was recorded in the cache)
    code, out, _ = run_cli(capsys, "train", "--stage", "clip", "--text-model", tiny_llm_dir, "--dataset",
                           tmp_path / "cache", "--output-dir", tmp_path / "s2", "--max-steps", "2",
                           *TINY_TOWER, *QUICK)
    assert code == 0


def test_config_file_supplies_arguments_and_flags_override_it(capsys, data_dir, tiny_llm_dir, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"task: caption-retrieval\ntext_model: {tiny_llm_dir}\ndataset: {data_dir / 'pairs.jsonl'}\n"
                      "max_samples: 5\n")
    code, out, _ = run_cli(capsys, "evaluate", "--config", config, "--max-samples", "7")
    assert code == 0 and last_json(out)["num_pairs"] == 7


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--task", "ranking", "--dataset", "x.jsonl"], "Unknown --task 'ranking'"),
    (["evaluate", "--task", "retrieval", "--dataset", "{pairs}"], "needs --model"),
    (["evaluate", "--task", "caption-retrieval", "--dataset", "{pairs}", "--caption-columns", "short_caption",
      "caption", "--text-model", "{llm}"], "['caption']"),
    (["evaluate", "--task", "caption-retrieval", "--dataset", "no/such/dataset", "--text-model", "{llm}"],
     "HF_HUB_OFFLINE"),
    (["evaluate", "--task", "caption-retrieval", "--dataset", "{pairs}", "--text-model", "no-such/model"],
     "HF_HUB_OFFLINE=1 is set"),
    (["evaluate", "--task", "caption-retrieval", "--dataset", "{pairs}", "--text-model", "{llm}",
      "--pooling-mode", "max"], "pooling"),
])
def test_bad_inputs_end_with_a_clear_error(capsys, data_dir, tiny_llm_dir, argv, message):
    argv = [a.format(pairs=data_dir / "pairs.jsonl", llm=tiny_llm_dir) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert message in err


def test_demo_smoke_mode_runs_every_step_and_writes_the_report(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--smoke", "--output-dir", tmp_path)
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert metrics["reload_max_abs_difference"] < 1e-5
    assert len(metrics["stage1_loss"]) == 2 and len(metrics["stage2_loss"]) == 3
    assert metrics["zero_shot_query"]["answer"] in metrics["zero_shot_query"]["scores"]
    assert "caption retrieval accuracy" in out
