"""Every `llm2clip-hf` command on tiny data in the formats users bring (jsonl, csv, parquet, imagefolder)."""

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from datasets import load_dataset, load_from_disk
from PIL import Image

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPProcessor, LLM2CLIPTextModel
from llm2clip_hf.cli import COMMANDS, main
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows
from llm2clip_hf.data import ROW_HASH_COLUMN, load_dataset_from_spec, read_cache_metadata, text_model_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from launching import accelerate_launch  # noqa: E402

TINY_TOWER = ["--vision-preset", "B/16", "--image-size", "32", "--patch-size", "8", "--vision-width", "64",
              "--vision-layers", "2", "--vision-heads", "2", "--projection-dim", "32"]
QUICK = ["--use-cpu", "--save-strategy", "no", "--disable-tqdm", "true", "--per-device-train-batch-size", "8"]
# `train` gets these explicitly, so the tests can redo its eval split (datasets' train_test_split with this seed)
SEED, EVAL_FRACTION, CAPTION_COLUMNS = 42, 0.25, ["short_caption", "long_caption"]
SPLIT = ["--seed", str(SEED), "--eval-fraction", str(EVAL_FRACTION), "--caption-columns", *CAPTION_COLUMNS]
ZERO_SHOT_TEMPLATES = ["a {}", "a {} shape"]
# A score this close to a query's bar could rank either way between the CLI's float32 path and this one.
TIE_TOLERANCE = 1e-5


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(text):
    return json.loads(text[text.index("{\n"):])


# ------------------------------------------------------------------------------------------------------------
# Expected metrics, computed here from the saved models without the package's evaluation code.

def cosine_scores(queries, keys):
    """[num_queries][num_keys] cosine similarities, as nested lists of floats (float64)."""
    return (F.normalize(queries.double(), dim=-1) @ F.normalize(keys.double(), dim=-1).T).tolist()


def hit_rate(scores, correct, k, slack=0.0):
    """Percent of queries that are hits at k: fewer than k wrong candidates score above the query's best correct
    candidate (ties count for the query). ``slack`` > 0 also lets near-ties count for it, < 0 against it."""
    hits = 0
    for row, right in zip(scores, correct):
        best = max(row[j] for j in right)
        above = sum(1 for j, score in enumerate(row) if j not in right and score > best + slack)
        hits += above < k
    return 100.0 * hits / len(scores)


def assert_metric(value, naive):
    """``value`` (from the CLI) must be ``naive(0.0)``, the metric computed here. Only a score within
    TIE_TOLERANCE of a query's bar could legitimately rank differently in the CLI's float32 computation: when
    there is such a near-tie, accept exactly the outcomes it allows (naive(-tol) .. naive(+tol))."""
    strict, exact, lenient = naive(-TIE_TOLERANCE), naive(0.0), naive(TIE_TOLERANCE)
    if strict == lenient:
        assert value == pytest.approx(exact, abs=1e-6)
    else:
        assert strict - 1e-6 <= value <= lenient + 1e-6, (value, strict, exact, lenient)


def expected_cra(metrics, prefix, text_model, rows):
    """CRA between the short and the long captions of ``rows`` (both directions and their mean)."""
    with torch.no_grad():
        short = text_model.encode([r["short_caption"] for r in rows])
        long = text_model.encode([r["long_caption"] for r in rows])
    diagonal = [{i} for i in range(len(rows))]
    a_to_b, b_to_a = cosine_scores(short, long), cosine_scores(long, short)
    assert_metric(metrics[f"{prefix}cra_a_to_b"], lambda slack: hit_rate(a_to_b, diagonal, 1, slack))
    assert_metric(metrics[f"{prefix}cra_b_to_a"], lambda slack: hit_rate(b_to_a, diagonal, 1, slack))
    assert_metric(metrics[f"{prefix}cra"], lambda slack: (hit_rate(a_to_b, diagonal, 1, slack)
                                                          + hit_rate(b_to_a, diagonal, 1, slack)) / 2)


def image_features(model_dir, model, images):
    """Joint-space features of PIL images, preprocessed by the image processor saved with the model."""
    processor = LLM2CLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        return model.get_image_features(pixel_values=pixels)


def text_features(model, texts):
    """Joint-space features of captions: the model's embedded LLM encoder, then its adapter."""
    with torch.no_grad():
        return model.get_text_features(model.text_model.encode(texts))


def assert_retrieval_metrics(metrics, prefix, model_dir, images, captions):
    """Image->text (an image is a hit if any of its captions is in the top k) and text->image recall@1/5/10 of
    the saved model on ``images`` and ``captions`` (a list of captions per image)."""
    model = LLM2CLIPModel.from_pretrained(model_dir).eval()
    texts = [text for own in captions for text in own]
    owner = [i for i, own in enumerate(captions) for _ in own]
    image_embeds, text_embeds = image_features(model_dir, model, images), text_features(model, texts)
    image_to_text, text_to_image = cosine_scores(image_embeds, text_embeds), cosine_scores(text_embeds, image_embeds)
    captions_of = [{j for j, i in enumerate(owner) if i == image} for image in range(len(images))]
    image_of = [{i} for i in owner]
    for k in (1, 5, 10):
        assert_metric(metrics[f"{prefix}image_to_text_R@{k}"], lambda s: hit_rate(image_to_text, captions_of, k, s))
        assert_metric(metrics[f"{prefix}text_to_image_R@{k}"], lambda s: hit_rate(text_to_image, image_of, k, s))


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
                 "--output-dir", str(out), "--max-steps", "4", *SPLIT, *TINY_TOWER, *QUICK])
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
                           "--per-device-train-batch-size", "16", "--use-cpu", "--save-strategy", "no", *SPLIT)
    metrics = last_json(out)
    assert code == 0 and metrics["stage"] == "caption"
    assert (tmp_path / "s1" / "metrics.json").is_file() and (tmp_path / "s1" / "model.safetensors").is_file()
    # The Trainer's evaluation hook: CRA of the trained encoder on the held-out rows, redone from the saved model.
    rows = load_dataset("json", data_files=str(data_dir / "pairs.jsonl"), split="train")
    held_out = list(rows.train_test_split(test_size=EVAL_FRACTION, seed=SEED)["test"])
    assert metrics["eval_num_pairs"] == len(held_out) == 8
    expected_cra(metrics, "eval_", LLM2CLIPTextModel.from_pretrained(tmp_path / "s1"), held_out)
    code, after, _ = run_cli(capsys, "evaluate", "--task", "caption-retrieval", "--text-model", tmp_path / "s1",
                             "--dataset", data_dir / "pairs.jsonl")
    assert code == 0
    assert last_json(after)["cra"] > last_json(before)["cra"] + 20


def test_train_clip_stage_on_imagefolder_with_several_captions_per_image(clip_model_dir, data_dir):
    metrics = json.loads((clip_model_dir / "metrics.json").read_text())
    assert metrics["eval_num_images"] == 8 and metrics["eval_num_captions"] == 24  # 3 captions per held-out image
    # The Trainer's evaluation hook, redone from the saved model on the held-out rows: the split is made from the
    # rows as the CLI read them (the cache holds only their embeddings, one row per image row).
    cached = load_from_disk(str(clip_model_dir / "_embedding_cache"))
    source = load_dataset_from_spec(str(data_dir / "images"), image_column="image")
    assert cached.column_names == ["short_caption_llm_embedding", "long_caption_llm_embedding", ROW_HASH_COLUMN]
    assert len(cached) == len(source)
    held_out = list(source.train_test_split(test_size=EVAL_FRACTION, seed=SEED)["test"])
    assert len(held_out) == 8
    assert_retrieval_metrics(metrics, "eval_", clip_model_dir, [row["image"] for row in held_out],
                             [[row["short_caption"], *row["long_caption"]] for row in held_out])
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
    if source == "images":
        with open(data_dir / "images" / "metadata.jsonl") as handle:
            rows = [json.loads(line) for line in handle]
        images = [Image.open(data_dir / "images" / r["file_name"]).convert("RGB") for r in rows]
        captions = [[r["short_caption"], *r["long_caption"]] for r in rows]
    else:
        table = pd.read_csv(data_dir / source) if source.endswith(".csv") else pd.read_parquet(data_dir / source)
        images = [Image.open(data_dir / path).convert("RGB") for path in table["image"]]
        captions = [[short, long] for short, long in zip(table["short_caption"], table["long_caption"])]
    assert_retrieval_metrics(metrics, "", clip_model_dir, images, captions)


def assert_zero_shot_metrics(metrics, model_dir, images, truth, class_names):
    """Zero-shot top-1 / top-5 and mean per-class recall of the saved model on ``images`` of classes ``truth``
    (indices into ``class_names``): each class embeds as the normalised mean of its normalised template
    embeddings; an image is right at k when fewer than k classes beat its own class."""
    assert metrics["num_classes"] == len(class_names) and metrics["num_images"] == len(images)
    model = LLM2CLIPModel.from_pretrained(model_dir).eval()
    classifier = torch.stack([
        F.normalize(F.normalize(text_features(model, [t.format(name) for t in ZERO_SHOT_TEMPLATES]), dim=-1).mean(0),
                    dim=-1) for name in class_names])
    scores = cosine_scores(image_features(model_dir, model, images), classifier)
    truth = [{label} for label in truth]
    assert_metric(metrics["zeroshot_top1"], lambda slack: hit_rate(scores, truth, 1, slack))
    if len(class_names) >= 5:
        assert_metric(metrics["zeroshot_top5"], lambda slack: hit_rate(scores, truth, 5, slack))

    def mean_per_class_recall(slack):
        members = [[i for i, t in enumerate(truth) if t == {c}] for c in range(len(class_names))]
        return sum(hit_rate([scores[i] for i in m], [truth[i] for i in m], 1, slack)
                   for m in members) / len(class_names)

    assert_metric(metrics["mean_per_class_recall"], mean_per_class_recall)


def test_evaluate_zero_shot_from_label_strings(capsys, clip_model_dir, data_dir):
    code, out, _ = run_cli(capsys, "evaluate", "--task", "zeroshot", "--model", clip_model_dir,
                           "--dataset", data_dir / "captions.csv", "--label-column", "label",
                           "--templates", *ZERO_SHOT_TEMPLATES)
    assert code == 0
    # Expected: the class names are the distinct labels.
    table = pd.read_csv(data_dir / "captions.csv")
    classes = sorted(set(table["label"]))
    assert len(classes) == 8
    images = [Image.open(data_dir / path).convert("RGB") for path in table["image"]]
    assert_zero_shot_metrics(last_json(out), clip_model_dir, images, [classes.index(label) for label in table["label"]],
                             classes)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """An ImageNet-style folder: one subfolder of PNGs per class, no metadata file."""
    root = tmp_path_factory.mktemp("classes")
    for i, row in enumerate(tiny_image_caption_rows()[:12]):  # 3 colours x 4 shapes
        shape = row["short_caption"].split()[-1]
        if shape != "stripe":
            (root / shape).mkdir(exist_ok=True)
            row["image"].save(root / shape / f"{i}.png")
    return root


@pytest.mark.parametrize("class_names", [None, ["red square", "blue circle", "green triangle"]])
def test_evaluate_zero_shot_on_a_folder_of_class_subfolders(capsys, clip_model_dir, class_folder, class_names):
    """The folder reads as datasets' imagefolder does: an image column and a ClassLabel of the folder names, which
    are the class names unless --class-names gives others (in the ClassLabel's order)."""
    names = ["--class-names", *class_names] if class_names else []
    code, out, err = run_cli(capsys, "evaluate", "--task", "zeroshot", "--model", clip_model_dir,
                             "--dataset", class_folder, "--templates", *ZERO_SHOT_TEMPLATES, *names)
    assert code == 0, err
    reference = load_dataset("imagefolder", data_dir=str(class_folder), split="train")
    folders = sorted(p.name for p in class_folder.iterdir())
    assert reference.features["label"].names == folders == ["circle", "square", "triangle"]
    assert_zero_shot_metrics(last_json(out), clip_model_dir, [image.convert("RGB") for image in reference["image"]],
                             reference["label"], class_names or folders)


def test_class_names_must_name_every_class_of_the_folder(capsys, clip_model_dir, class_folder):
    code, _, err = run_cli(capsys, "evaluate", "--task", "zeroshot", "--model", clip_model_dir,
                           "--dataset", class_folder, "--class-names", "red square", "blue circle")
    assert code == 1
    assert "2 class names were given for the 3 classes" in err and "'circle', 'square', 'triangle'" in err


def test_a_folder_of_neither_layout_is_refused_naming_both(capsys, clip_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "loose.png").write_bytes(b"")  # an image outside any class folder
    code, _, err = run_cli(capsys, "evaluate", "--task", "zeroshot", "--model", clip_model_dir, "--dataset", tmp_path)
    assert code == 1
    assert "metadata.jsonl" in err and "one subfolder per class" in err and "save_to_disk" in err


def test_embed_writes_a_cache_bound_to_the_text_model(capsys, data_dir, tiny_llm_dir, tmp_path):
    code, out, _ = run_cli(capsys, "embed", "--text-model", tiny_llm_dir, "--dataset", data_dir / "captions.csv",
                           "--image-column", "image", "--output-dir", tmp_path / "cache", "--rows-per-shard", "10")
    assert code == 0 and last_json(out)["rows"] == 32 and last_json(out)["device"] == "cpu"
    from datasets import load_from_disk

    cached = load_from_disk(str(tmp_path / "cache"))
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    assert read_cache_metadata(cached)["fingerprint"] == text_model_fingerprint(text_model)
    source = load_dataset_from_spec(str(data_dir / "captions.csv"))
    expected = text_model.encode(list(source["short_caption"]))
    assert torch.allclose(torch.tensor(cached["short_caption_llm_embedding"]), expected, atol=1e-5)
    # stage 2 on the same data reuses the finished cache (nothing is recomputed) and joins it to the images
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("data-*.arrow")}
    assert len(shards) == 4
    code, out, _ = run_cli(capsys, "train", "--stage", "clip", "--text-model", tiny_llm_dir, "--dataset",
                           data_dir / "captions.csv", "--embedding-cache", tmp_path / "cache",
                           "--output-dir", tmp_path / "s2", "--max-steps", "2", *TINY_TOWER, *QUICK)
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("data-*.arrow")} == shards


def test_embed_dtype_and_attention_options(capsys, data_dir, tiny_llm_dir, tmp_path):
    code, out, _ = run_cli(capsys, "embed", "--text-model", tiny_llm_dir, "--dataset", data_dir / "pairs.jsonl",
                           "--output-dir", tmp_path / "cache", "--dtype", "bfloat16", "--attn-implementation", "eager",
                           "--storage-dtype", "bfloat16")
    assert code == 0
    from datasets import load_from_disk

    from llm2clip_hf.data import embeddings_as_float32

    cached = load_from_disk(str(tmp_path / "cache")).with_format("numpy")[:]
    got = torch.from_numpy(embeddings_as_float32(cached["long_caption_llm_embedding"]))
    reference = LLM2CLIPTextModel.from_llm(tiny_llm_dir).encode([r["long_caption"] for r in tiny_caption_pair_rows()])
    assert (got - reference).norm() / reference.norm() < 0.03  # a bf16 LLM: close, not equal
    assert (got - reference).abs().max() > 0  # it did run in bf16
    code, _, err = run_cli(capsys, "embed", "--text-model", tiny_llm_dir, "--dataset", data_dir / "pairs.jsonl",
                           "--output-dir", tmp_path / "other", "--dtype", "float64")
    assert code == 1 and "--dtype 'float64' is not one of" in err


@pytest.mark.parametrize("rows, columns", [(1, ["short_caption"]), (2, ["short_caption"]),
                                          (1, ["short_caption", "long_caption"])])
def test_embed_on_one_or_two_captions_writes_the_cache_and_skips_the_teacher_check(capsys, caplog, tiny_llm_dir,
                                                                                   tmp_path, rows, columns):
    """Centered, N captions span at most N - 1 directions: `embed` refused any 2 captions as having "no spread left"
    and exited 1 on one caption after writing the cache. Too few captions for the statistics skip the check."""
    import logging

    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_caption_pair_rows()[:rows]))
    with caplog.at_level(logging.WARNING, logger="llm2clip_hf"):
        code, out, err = run_cli(capsys, "embed", "--text-model", tiny_llm_dir, "--dataset", data,
                                 "--caption-columns", *columns, "--output-dir", tmp_path / "cache")
    assert code == 0, err
    teacher = last_json(out)["teacher"]
    assert teacher["verdict"] == "skipped" and teacher["rows"] == rows * len(columns)
    assert f"Teacher check skipped: {rows * len(columns)} caption" in caplog.text
    cached = load_from_disk(str(tmp_path / "cache"))
    assert len(cached) == rows and read_cache_metadata(cached)["num_rows"] == rows


@pytest.mark.slow
def test_embed_under_accelerate_launch_splits_the_work_and_equals_one_process(capsys, data_dir, tiny_llm_dir,
                                                                               tmp_path):
    """Two gloo processes (`--multi_gpu` on a CPU machine is torchrun with gloo: `--cpu` would start one)."""
    rows = [{"caption": f"{r['long_caption']} number {i}"} for i, r in enumerate(tiny_caption_pair_rows() * 3)]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["embed", "--text-model", str(tiny_llm_dir), "--dataset", str(captions), "--caption-columns", "caption",
            "--rows-per-shard", "8"]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    launched = accelerate_launch(["-m", "llm2clip_hf.cli", *args, "--output-dir", tmp_path / "two"])
    assert last_json(launched.stdout)["processes"] == 2
    assert last_json(launched.stdout)["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    from datasets import load_from_disk

    one, two = (load_from_disk(str(tmp_path / name)) for name in ("one", "two"))
    assert len(two) == len(rows) == len(one)
    got = torch.tensor(two["caption_llm_embedding"])
    torch.testing.assert_close(got, torch.tensor(one["caption_llm_embedding"]), atol=1e-5, rtol=1e-5)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    for index in (0, 17, len(rows) - 1):  # row order is input order
        torch.testing.assert_close(got[index], text_model.encode([rows[index]["caption"]])[0], atol=1e-5, rtol=1e-5)


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


@pytest.mark.slow
def test_demo_smoke_mode_runs_every_step_and_writes_the_report(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--smoke", "--stage2-seeds", "0", "1", "--output-dir", tmp_path)
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert metrics["reload_max_abs_difference"] < 1e-5
    assert len(metrics["stage1_loss"]) == 2
    assert {teacher: len(curve) for teacher, curve in metrics["stage2_loss"].items()} == {"raw": 3, "tuned": 3}
    assert metrics["zero_shot_query"]["answer"] in metrics["zero_shot_query"]["scores"]
    # both teachers' CLIPs, every seed, every metric; the summary is the seeds' mean and the paired differences
    seeds = metrics["stage2_seeds"]
    for teacher in ("raw", "tuned"):
        runs = metrics["per_seed"][teacher]
        assert len(runs) == len(seeds) >= 2
        for key in ("image_to_text_R@5", "long_text_to_image_R@1", "cross_lingual_image_to_text_R@10",
                    "caption_zh_text_to_image_R@5", "zero_shot_top1", "cra"):
            values = [run[key] for run in runs]
            assert metrics["summary"][teacher][key]["mean"] == pytest.approx(sum(values) / len(values))
    differences = [t["image_to_text_R@5"] - r["image_to_text_R@5"]
                   for r, t in zip(metrics["per_seed"]["raw"], metrics["per_seed"]["tuned"])]
    assert metrics["summary"]["tuned_minus_raw"]["image_to_text_R@5"]["values"] == pytest.approx(differences)
    assert metrics["long_caption_words"]["min"] > 77
    assert "CRA, held-out pairs" in out and "dense, >77 words" in out and "fr/de/es/zh mean" in out


@pytest.mark.slow
def test_train_clip_stage_streaming_parquet_shards_with_a_keyed_cache(capsys, data_dir, tiny_llm_dir, tmp_path):
    table = pd.read_parquet(data_dir / "captions.parquet")
    table["image"] = [str(data_dir / path) for path in table["image"]]
    table["key"] = [f"row-{i:03d}" for i in range(len(table))]
    shards = tmp_path / "shards"
    shards.mkdir()
    for part in range(2):
        table.iloc[part::2].to_parquet(shards / f"part-{part}.parquet")
    # a stream needs a keyed cache, and says how to make it
    stream_args = ["train", "--stage", "clip", "--text-model", tiny_llm_dir, "--dataset", shards, "--streaming",
                   "true", "--key-column", "key", "--embedding-cache", tmp_path / "cache", "--max-steps", "2",
                   "--output-dir", tmp_path / "s2", "--caption-columns", *CAPTION_COLUMNS, *TINY_TOWER, *QUICK]
    code, _, err = run_cli(capsys, *stream_args)
    assert code == 1 and "embed --dataset <the same rows, map-style> --key-column key" in err
    code, out, err = run_cli(capsys, "embed", "--text-model", tiny_llm_dir, "--dataset", shards, "--key-column", "key",
                           "--caption-columns", *CAPTION_COLUMNS, "--output-dir", tmp_path / "cache")
    assert code == 0 and last_json(out)["key_column"] == "key", err[-1500:]
    assert sorted(load_from_disk(str(tmp_path / "cache"))["key"]) == sorted(table["key"])
    code, out, err = run_cli(capsys, *stream_args)
    assert code == 0, err[-2000:]
    metrics = last_json(out)
    assert metrics["stage"] == "clip" and metrics["train_loss"] > 0
    assert LLM2CLIPModel.from_pretrained(tmp_path / "s2").config.text_model_fingerprint
    at = stream_args.index("--max-steps")
    code, _, err = run_cli(capsys, *stream_args[:at], *stream_args[at + 2:], "--eval-fraction", "0.25")
    assert code == 1 and "give --max-steps" in err and "evaluation during a streamed run" in err


@pytest.mark.slow
def test_the_demo_holds_one_llm_at_a_time(tmp_path, monkeypatch):
    """Every training (stage 1 and each stage 2) starts with at most one text encoder alive: the demo's peak is stage
    1's, not that plus a raw copy and the saved encoder (4.57 vs 3.3 GiB on SmolLM2 before)."""
    import gc

    from llm2clip_hf import LLM2CLIPTextModel
    from llm2clip_hf.demo import recipe

    alive = []
    original = recipe.LLM2CLIPTrainer.train

    def counting_train(self, *args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, LLM2CLIPTextModel) for o in gc.get_objects()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(recipe.LLM2CLIPTrainer, "train", counting_train)
    recipe.run(recipe.DemoArguments(output_dir=str(tmp_path), smoke=True, stage2_seeds=[0]))
    assert alive == [1, 1, 1], alive  # stage 2 on the raw LLM, stage 1, stage 2 on the stage-1 LLM


@pytest.mark.parametrize("command", ["train", "embed", "evaluate", "convert", "assemble", "export-vision", "demo"])
def test_every_command_prints_its_help(command, capsys):
    from llm2clip_hf.cli.commands import COMMANDS

    assert command in COMMANDS and len(COMMANDS) == 7  # a new command joins this list
    # argparse %-formats help strings: a stray '%' in a field's help breaks --help for the whole command
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert f"llm2clip-hf {command}" in capsys.readouterr().out


def test_top_level_help_documents_debug(capsys):
    assert main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


def failing_command(monkeypatch, error):
    def run(*arguments):
        raise error

    monkeypatch.setattr(COMMANDS["convert"], "run", run)


@pytest.mark.parametrize("error", [ValueError("--checkpoint is not a checkpoint"),
                                   FileNotFoundError("no such checkpoint")])
def test_user_error_prints_one_line_with_a_debug_hint(capsys, monkeypatch, error):
    failing_command(monkeypatch, error)
    code, out, err = run_cli(capsys, "convert", "in.pt", "out")
    assert code == 1 and out == ""
    assert err.splitlines() == [f"llm2clip-hf convert: error: {error} (run with --debug for the traceback)"]


@pytest.mark.parametrize("error", [TypeError("bug"), PermissionError("denied"), RuntimeError("bug")])
def test_internal_error_propagates_with_its_traceback(monkeypatch, error):
    failing_command(monkeypatch, error)
    with pytest.raises(type(error)):
        main(["convert", "in.pt", "out"])


@pytest.mark.parametrize("argv", [["--debug", "convert", "in.pt", "out"], ["convert", "in.pt", "--debug", "out"]])
def test_debug_flag_reraises_user_errors_wherever_it_is(monkeypatch, argv):
    failing_command(monkeypatch, ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        main(argv)


def test_evaluate_retrieval_per_caption_column_reports_each_language_and_their_mean(capsys, clip_model_dir):
    """Cross-lingual retrieval (XM3600-style) with an English-trained model: each caption column of the shipped
    12-emoji set (English and CLDR's French, German, Spanish and Chinese names) is its own gallery; every
    language's R@k is recomputed here from the saved model, and the mean is theirs."""
    data = Path(__file__).parent / "data" / "multilingual" / "metadata.jsonl"
    languages = ["caption", "caption_fr", "caption_de", "caption_es", "caption_zh"]
    code, out, err = run_cli(capsys, "evaluate", "--task", "retrieval", "--model", clip_model_dir, "--dataset", data,
                             "--caption-columns", *languages)  # several columns: each its own gallery, by default
    assert code == 0, err[-2000:]
    metrics = last_json(out)
    assert metrics["num_captions"] == 5 * 12  # and all of them as one gallery, as with one column
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    images = [Image.open(data.parent / row["image"]) for row in rows]
    recall = [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    for language in languages:
        own = {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith(language + "/")}
        assert own["num_images"] == own["num_captions"] == len(rows)
        assert_retrieval_metrics(own, "", clip_model_dir, images, [[row[language]] for row in rows])
        words = sorted(len(row[language].split()) for row in rows)
        assert own["caption_words_max"] == words[-1] and own["caption_words_over_77"] == 0.0
    for key in recall:
        assert metrics[f"mean/{key}"] == pytest.approx(sum(metrics[f"{lang}/{key}"] for lang in languages) / 5)


@pytest.fixture()
def one_process_group(tmp_path):
    """A 1-process gloo group, as ``accelerate launch`` leaves one for the command; destroyed afterwards if the
    command did not."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_finished_command_shuts_the_launchers_process_group_down(monkeypatch, one_process_group):
    monkeypatch.setattr(COMMANDS["convert"], "run", lambda *arguments: None)
    assert main(["convert", "in.pt", "out"]) == 0
    assert not one_process_group.is_initialized()


def test_a_failed_command_leaves_the_process_group_to_the_other_processes(capsys, monkeypatch, one_process_group):
    failing_command(monkeypatch, ValueError("bad input"))
    assert main(["convert", "in.pt", "out"]) == 1
    assert one_process_group.is_initialized()


@pytest.mark.parametrize("stage, workers", [("clip", 0), ("clip", 2), ("caption", 0)])
def test_a_seeded_training_run_is_reproducible(capsys, data_dir, tiny_llm_dir, tmp_path, stage, workers):
    """Two identical seeded runs in one process (the global RNG in another state at the second start) save equal
    weights: a new tower and adapter (stage 2) and the LoRA weights (stage 1) are initialised from the seed, and the
    augmentation (in DataLoader workers too) and data draws follow it. Before, 79 of 99 stage-2 tensors differed."""
    dataset = data_dir / ("images" if stage == "clip" else "pairs.jsonl")
    options = [*TINY_TOWER] if stage == "clip" else []
    for run in ("a", "b"):
        torch.rand(7)  # a different global RNG state at each start
        code, _, _ = run_cli(capsys, "train", "--stage", stage, "--text-model", tiny_llm_dir, "--dataset", dataset,
                             "--output-dir", tmp_path / run, "--max-steps", "3", "--seed", "5",
                             "--caption-columns", *CAPTION_COLUMNS, "--dataloader-num-workers", workers, *options,
                             *QUICK)
        assert code == 0
    from safetensors.torch import load_file

    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert first.keys() == second.keys()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, f"{len(differing)} of {len(first)} tensors differ, e.g. {differing[:3]}"


# ------------------------------------------------------------------------------------------------------------
# --adapter-input-normalization auto with a pretrained image side (--vision-model)

def dominated_llm(tiny_llm_dir, directory):
    """The tiny LLM with a common vector added to every token embedding: its caption embeddings share one large
    component (mean pairwise cosine ~0.96 on the tiny captions) and still tell captions apart once centered."""
    from transformers import AutoModel, AutoTokenizer

    llm = AutoModel.from_pretrained(tiny_llm_dir)
    with torch.no_grad():
        llm.embed_tokens.weight += 0.02 * torch.randn(llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    llm.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_llm_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vision_sources(tmp_path_factory, tiny_llm_dir):
    """A dominated teacher, a tiny transformers CLIP (no adapter: a new one) and a tiny LLM2CLIP model with an
    adapter for the LLM's width (it comes with the model)."""
    from transformers import CLIPConfig, CLIPModel

    from llm2clip_hf.testing import tiny_vision_config

    root = tmp_path_factory.mktemp("vision_sources")
    llm = dominated_llm(tiny_llm_dir, root / "dominated_llm")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                max_position_embeddings=16)
    CLIPModel(CLIPConfig(vision_config=tower, text_config=text, projection_dim=24)).save_pretrained(root / "clip")
    LLM2CLIPModel.from_text_model(LLM2CLIPTextModel.from_llm(llm), tiny_vision_config(), embed_text_model=False,
                                  projection_dim=32).save_pretrained(root / "llm2clip")
    return {"llm": llm, "clip": root / "clip", "llm2clip": root / "llm2clip"}


def post_train(capsys, vision_sources, data_dir, source, out, *extra):
    return run_cli(capsys, "train", "--stage", "clip", "--text-model", vision_sources["llm"], "--vision-model",
                   vision_sources[source], "--dataset", data_dir / "captions.csv", "--caption-columns",
                   *CAPTION_COLUMNS, "--output-dir", out, "--max-steps", "1", "--learning-rate", "0", *extra, *QUICK)


def test_auto_centers_the_new_adapter_of_a_pretrained_vision_model(capsys, data_dir, vision_sources, tmp_path):
    """With --vision-model, auto only warned: a new adapter for a dominated teacher was left uncentered."""
    code, out, err = post_train(capsys, vision_sources, data_dir, "clip", tmp_path / "out")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["adapter_input_normalization"] == "center"
    assert config["adapter_input_statistics_rows"] == 64  # fitted on the cache: 32 rows x 2 captions
    model = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    cached = load_from_disk(str(tmp_path / "out" / "_embedding_cache"))
    from llm2clip_hf.data import embedding_statistics

    mean, _, _ = embedding_statistics(cached, CAPTION_COLUMNS)
    torch.testing.assert_close(model.text_adapter.input_mean, torch.from_numpy(mean))


def test_auto_leaves_an_adapter_that_comes_with_the_vision_model_as_it_is(capsys, data_dir, vision_sources, tmp_path):
    code, out, err = post_train(capsys, vision_sources, data_dir, "llm2clip", tmp_path / "out")
    assert code == 0, err
    from safetensors.torch import load_file

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["adapter_input_normalization"] is None
    saved, source = (load_file(folder / "model.safetensors") for folder in (tmp_path / "out",
                                                                            vision_sources["llm2clip"]))
    adapter = [name for name in source if name.startswith("text_adapter.")]
    assert adapter and not any(name.startswith("text_adapter.input_") for name in saved)
    assert all(torch.equal(saved[name], source[name]) for name in adapter)  # learning rate 0: the same adapter
    # an explicit normalisation that adapter was not trained with is refused, naming the fix
    code, _, err = post_train(capsys, vision_sources, data_dir, "llm2clip", tmp_path / "centered",
                              "--adapter-input-normalization", "center")
    assert code == 1 and "comes with the model" in err and "Drop the flag" in err
