"""Issue 34: llm2clip-hf models as MTEB (MIEB) encoders, and our metrics checked against MTEB's own harness.

A post-trained tiny model (``train --stage clip``) is scored on held-out image-caption data twice: by the package
(``evaluate_retrieval`` / ``evaluate_zero_shot``) and by ``mteb.evaluate`` on the same data built as MTEB tasks.
MTEB is run with ``cache=None`` or a temporary folder; nothing is written under ~/.cache.
"""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset

mteb = pytest.importorskip("mteb", reason="mteb is not installed: pip install 'llm2clip-hf[mteb]' (the test extra "
                                          "installs it)")

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel  # noqa: E402
from llm2clip_hf.cli import main  # noqa: E402
from llm2clip_hf.evaluation import (  # noqa: E402
    embed_images,
    evaluate_caption_retrieval,
    evaluate_retrieval,
    evaluate_zero_shot,
    image_text_retrieval_tasks,
    retrieval_recall,
    mteb_encoder,
    run_mteb_tasks,
    zero_shot_task,
)
from llm2clip_hf.evaluation.model_evaluation import embed_llm_outputs, llm_embeddings_for  # noqa: E402
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows  # noqa: E402

TINY_TOWER = ["--vision-preset", "B/16", "--image-size", "32", "--patch-size", "8", "--vision-width", "64",
              "--vision-layers", "2", "--vision-heads", "2", "--projection-dim", "32"]
CAPTIONS = ["short_caption", "long_caption"]
KS = (1, 5, 10)
TEMPLATE = "a photo of a {} shape."
MTEB_ROUNDING = 5e-6 + 1e-12  # MTEB reports retrieval scores as fractions rounded to 5 decimals (half to even)


def held_out_rows() -> list[dict]:
    """The 32 colour x shape scenes drawn again at another size (new pixels after resizing), with the shape as a
    class label: data the model was not trained on."""
    return [{**row, "label": row["short_caption"].split()[-1]} for row in tiny_image_caption_rows(image_size=36)]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_llm_dir):
    """A tiny LLM2CLIP model post-trained by the CLI (stage 2, embedded text encoder), saved with its card."""
    root = tmp_path_factory.mktemp("mteb")
    (root / "train").mkdir()
    rows = []
    for i, row in enumerate(tiny_image_caption_rows()):
        row["image"].save(root / "train" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "short_caption": row["short_caption"],
                     "long_caption": row["long_caption"]})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "clip-model"
    code = main(["train", "--stage", "clip", "--text-model", str(tiny_llm_dir), "--dataset", str(root / "train"),
                 "--output-dir", str(out), "--max-steps", "8",
                 "--caption-columns", *CAPTIONS, *TINY_TOWER, "--use-cpu", "--save-strategy", "no",
                 "--disable-tqdm", "true", "--per-device-train-batch-size", "16"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def model(trained_dir):
    return LLM2CLIPModel.from_pretrained(trained_dir).eval()


@pytest.fixture(scope="module")
def held_out():
    return Dataset.from_list(held_out_rows())


def scores_of(result, task_name):
    (task_result,) = [r for r in result.task_results if r.task_name == task_name]
    (scores,) = task_result.scores["test"]
    return scores


def test_mteb_retrieval_equals_the_package_recall(model, held_out):
    """MTEB's any-to-any retrieval on the held-out split equals ``evaluate_retrieval``, R@1/5/10 both ways.

    What corresponds: our image->text R@k counts an image as found when *any* of its captions is in the top k
    (CLIP_benchmark's convention); that is MTEB's ``hit_rate_at_k`` (pytrec_eval ``success``). MTEB's
    ``recall_at_k`` is the share of the image's captions in the top k: with 2 captions per image it is lower (at
    k=1 at most 0.5). Text->image has one relevant image per caption, so MTEB's ``recall_at_k`` and
    ``hit_rate_at_k`` both equal our R@k / 100. MTEB rounds to 5 decimals. Ties: see
    :func:`test_tied_scores_are_where_the_two_differ`; the trained model's scores have none here.
    """
    ours = evaluate_retrieval(model, held_out, "image", CAPTIONS, per_column=False)
    i2t, t2i = image_text_retrieval_tasks(held_out, "image", CAPTIONS, name="HeldOut")
    result = mteb.evaluate(mteb_encoder(model), [i2t, t2i], cache=None, show_progress_bar=False)
    image_to_text, text_to_image = scores_of(result, "HeldOutI2TRetrieval"), scores_of(result, "HeldOutT2IRetrieval")
    for k in KS:
        assert abs(image_to_text[f"hit_rate_at_{k}"] - ours[f"image_to_text_R@{k}"] / 100) <= MTEB_ROUNDING
        assert abs(text_to_image[f"recall_at_{k}"] - ours[f"text_to_image_R@{k}"] / 100) <= MTEB_ROUNDING
        assert text_to_image[f"hit_rate_at_{k}"] == text_to_image[f"recall_at_{k}"]
        assert image_to_text[f"recall_at_{k}"] <= image_to_text[f"hit_rate_at_{k}"]
    assert image_to_text["recall_at_1"] <= 0.5
    # the model learnt something, so the comparison is not between two zeros
    assert ours["text_to_image_R@5"] > 100 * 5 / 32 and ours["image_to_text_R@5"] > 100 * 10 / 64


def test_mteb_retrieval_in_bfloat16_equals_evaluate_with_that_dtype(trained_dir, held_out):
    """``dtype`` loads the folder as ``from_pretrained(dtype=...)`` (``evaluate --dtype``) does: MTEB's recall of
    the bfloat16 model equals the package's on the same bfloat16 model."""
    encoder = mteb_encoder(trained_dir, dtype="bfloat16", device="cpu")
    assert encoder.model.visual_projection.weight.dtype == torch.bfloat16
    ours = evaluate_retrieval(LLM2CLIPModel.from_pretrained(trained_dir, dtype=torch.bfloat16), held_out, "image",
                              CAPTIONS, per_column=False)
    i2t, t2i = image_text_retrieval_tasks(held_out, "image", CAPTIONS, name="BF16")
    result = mteb.evaluate(encoder, [i2t, t2i], cache=None, show_progress_bar=False)
    for k in KS:
        assert abs(scores_of(result, "BF16I2TRetrieval")[f"hit_rate_at_{k}"] - ours[f"image_to_text_R@{k}"] / 100) \
            <= MTEB_ROUNDING
        assert abs(scores_of(result, "BF16T2IRetrieval")[f"recall_at_{k}"] - ours[f"text_to_image_R@{k}"] / 100) \
            <= MTEB_ROUNDING


def test_mteb_zero_shot_equals_the_package_accuracy(model, held_out):
    """MTEB's zero-shot classification (one prompt per class) equals ``evaluate_zero_shot`` with that one template:
    MTEB's ``accuracy`` is our ``zeroshot_top1`` / 100 (its argmax and our expectation differ only on exact ties)."""
    task = zero_shot_task(held_out, "image", "label", template=TEMPLATE, name="HeldOutShapes")
    ours = evaluate_zero_shot(model, held_out, "image", "label", templates=[TEMPLATE])
    result = mteb.evaluate(mteb_encoder(model), task, cache=None, show_progress_bar=False)
    assert task.get_candidate_labels() == [TEMPLATE.format(n) for n in ["circle", "square", "stripe", "triangle"]]
    assert scores_of(result, "HeldOutShapes")["accuracy"] == pytest.approx(ours["zeroshot_top1"] / 100, abs=1e-9)


def test_tied_scores_are_where_the_two_differ(model, held_out):
    """Exact score ties: the package counts a query whose correct item ties with wrong ones by its expected hit
    under random tie-breaking (:mod:`llm2clip_hf.evaluation.ranking`); MTEB passes the scores to pytrec_eval, which
    orders tied documents by their id, descending as strings (``caption-9`` before ``caption-63``). A model whose
    image side is collapsed (every image the same embedding) makes every text->image query a 32-way tie, and every
    caption of an image-> text query ties with the same caption of the other images.

    Text->image: each image has the same number of captions, so the fixed id order and the expectation give the
    same average (k / 32). Image->text with its captions collapsed to one embedding per caption column ties all
    captions: MTEB puts the ids ``caption-9, caption-8, caption-7, caption-63, ...`` first, whose owners repeat
    (captions of one image have neighbouring ids), so fewer images are found than the expectation says.
    """
    collapsed = LLM2CLIPModel.from_pretrained(model.name_or_path).eval()
    with torch.no_grad():
        collapsed.visual_projection.weight.zero_()
        collapsed.visual_projection.bias.fill_(1.0)
    i2t, t2i = image_text_retrieval_tasks(held_out, "image", CAPTIONS, name="Collapsed")
    encoder = mteb_encoder(collapsed)
    result = mteb.evaluate(encoder, [t2i], cache=None, show_progress_bar=False)
    ours = evaluate_retrieval(collapsed, held_out, "image", CAPTIONS, per_column=False)
    for k in KS:
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(100 * k / 32)
        assert scores_of(result, "CollapsedT2IRetrieval")[f"recall_at_{k}"] == pytest.approx(k / 32, abs=1e-5)

    # Image -> text, all captions tied (a constant text side): MTEB's id order versus the expectation.
    class ConstantText(type(encoder)):
        def get_text_embeddings(self, texts, *args, **kwargs):
            return torch.ones(len(texts), self.mteb_model_meta.embed_dim)

    constant = ConstantText(model, None, encoder.mteb_model_meta, None, None, None, False)
    scores = scores_of(mteb.evaluate(constant, [i2t], cache=None, show_progress_bar=False), "CollapsedI2TRetrieval")
    by_id = sorted((f"caption-{j}" for j in range(64)), reverse=True)  # caption j belongs to image j // 2
    for k in KS:
        found = {int(caption_id.split("-")[1]) // 2 for caption_id in by_id[:k]}
        expected = 1 - torch.tensor([1 - 2 / (64 - i) for i in range(k)]).prod().item()  # P(one of 2 in a random k)
        ours = retrieval_recall(torch.ones(32, 4), torch.ones(64, 4), [j // 2 for j in range(64)], ks=(k,))
        assert scores[f"hit_rate_at_{k}"] == pytest.approx(len(found) / 32, abs=MTEB_ROUNDING)  # MTEB: by id
        assert ours[f"image_to_text_R@{k}"] / 100 == pytest.approx(expected)  # the package: the expectation
    assert scores["hit_rate_at_5"] == pytest.approx(3 / 32, abs=MTEB_ROUNDING)  # images 4, 3 and 31


def text_loader(texts):
    from torch.utils.data import DataLoader

    return DataLoader(Dataset.from_dict({"text": texts}), batch_size=5)


def test_encoder_embeds_through_the_package_evaluation_functions(model, held_out):
    """Texts: the LLM embedding then the adapter (llm_embeddings_for + embed_llm_outputs); images: embed_images (the
    model's own preprocessing); both L2-normalised. Nothing is embedded by a second copy of the code."""
    encoder = mteb_encoder(model, batch_size=7)
    task = image_text_retrieval_tasks(held_out, "image", CAPTIONS, name="Paths")[1]
    texts = [row["long_caption"] for row in held_out_rows()]
    from torch.utils.data import DataLoader

    from mteb.types import PromptType

    got = encoder.encode(text_loader(texts), task_metadata=task.metadata, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.query)
    expected = embed_llm_outputs(model, llm_embeddings_for(texts, model, None, 7))
    torch.testing.assert_close(torch.from_numpy(got), F.normalize(expected, dim=-1))
    images = DataLoader(held_out.select_columns(["image"]), batch_size=5, collate_fn=lambda rows: {
        "image": [r["image"] for r in rows]})
    got = encoder.encode(images, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.document)
    torch.testing.assert_close(torch.from_numpy(got), F.normalize(embed_images(model, held_out["image"]), dim=-1))


def test_model_metadata_from_config_and_card(trained_dir, model, tiny_llm_dir, tmp_path):
    encoder = mteb_encoder(trained_dir, dtype="float32")
    meta = encoder.mteb_model_meta
    assert meta.name == "local/clip-model" and meta.revision.startswith("weights-")
    assert meta.embed_dim == model.config.projection_dim == 32
    assert meta.modalities == ["image", "text"] and meta.similarity_fn_name.value == "cosine"
    assert meta.max_tokens == model.text_model.config.max_seq_length
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())
    assert meta.use_instructions is False and encoder.query_instruction is None
    assert meta.adapted_from  # the card's base model (the text model the run started from)
    # the revision follows the weights in memory (MTEB's result cache is keyed by name and revision)
    assert mteb_encoder(model).mteb_model_meta.revision == meta.revision
    changed = LLM2CLIPModel.from_pretrained(trained_dir)
    with torch.no_grad():
        changed.text_adapter.parameters().__next__().add_(1e-3)
    assert mteb_encoder(changed).mteb_model_meta.revision != meta.revision
    assert mteb_encoder(model, query_instruction="task").mteb_model_meta.revision != meta.revision
    # a card's languages; a Hub-style name and revision given explicitly
    card = tmp_path / "card-model"
    model.save_pretrained(card)
    text = (card / "README.md").read_text() if (card / "README.md").exists() else "---\n---\n"
    (card / "README.md").write_text(text.replace("---\n", "---\nlanguage:\n- en\n- de\nlicense: apache-2.0\n", 1))
    meta = mteb_encoder(card, name="me/model", revision="abc").mteb_model_meta
    assert meta.languages == ["deu-Latn", "eng-Latn"] and meta.license == "apache-2.0"
    assert (meta.name, meta.revision) == ("me/model", "abc")
    # a text encoder alone: text modality, the LLM's width, MTEB's task instruction on queries
    alone = mteb_encoder(tiny_llm_dir)
    assert alone.mteb_model_meta.modalities == ["text"] and alone.text_model is not None and alone.model is None
    assert alone.mteb_model_meta.embed_dim == alone.text_model.config.hidden_size
    assert alone.query_instruction == "task" and alone.document_instruction is None
    with pytest.raises(ValueError, match="text encoder alone, which has no image side"):
        alone.get_image_embeddings(held_out_rows()[:1])


def test_model_without_text_encoder_takes_a_separate_one(model, held_out, tmp_path):
    """A model saved without its text encoder gets it as ``text_model`` (a folder, as ``evaluate --text-model``)."""
    image_side = LLM2CLIPModel.from_pretrained(model.name_or_path)
    model.text_model.save_pretrained(tmp_path / "text")
    image_side.text_model, image_side.config.text_config = None, None
    assert mteb_encoder(image_side).mteb_model_meta.modalities == ["image"]  # MTEB refuses its text tasks
    encoder = mteb_encoder(image_side, tmp_path / "text")
    assert encoder.mteb_model_meta.modalities == ["image", "text"]
    t2i = image_text_retrieval_tasks(held_out, "image", CAPTIONS, name="Separate")[1]
    scores = scores_of(mteb.evaluate(encoder, t2i, cache=None, show_progress_bar=False), "SeparateT2IRetrieval")
    ours = evaluate_retrieval(model, held_out, "image", CAPTIONS, per_column=False)
    for k in KS:
        assert abs(scores[f"recall_at_{k}"] - ours[f"text_to_image_R@{k}"] / 100) <= MTEB_ROUNDING


def test_text_encoder_alone_on_an_mteb_text_retrieval_task(tiny_llm_dir):
    """A text encoder alone on an MTEB text-to-text retrieval task with the query instruction MTEB gives: MTEB's
    hit rate at 1 equals the package's caption retrieval accuracy (CRA) with that query instruction."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    rows = tiny_caption_pair_rows()
    instruction = "Given a short caption, retrieve a detailed caption of the same picture"

    class ShortToLong(AbsTaskRetrieval):
        metadata = TaskMetadata(name="TinyShortToLongRetrieval", description="short -> long captions",
                                dataset={"path": "local/tiny", "revision": "1"}, type="Retrieval", category="t2t",
                                eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
                                prompt={"query": instruction})

        def load_data(self, **kwargs):
            ids = [f"{i:02d}" for i in range(len(rows))]
            self.dataset = {"default": {"test": {
                "corpus": Dataset.from_dict({"id": [f"d{i}" for i in ids], "text": [r["long_caption"] for r in rows]}),
                "queries": Dataset.from_dict({"id": [f"q{i}" for i in ids],
                                              "text": [r["short_caption"] for r in rows]}),
                "relevant_docs": {f"q{i}": {f"d{i}": 1} for i in ids}, "top_ranked": None}}}
            self.data_loaded = True

    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    encoder = mteb_encoder(text_model)
    from mteb.types import PromptType

    assert encoder.instruction_for(ShortToLong.metadata, PromptType.query) == instruction
    assert encoder.instruction_for(ShortToLong.metadata, PromptType.document) is None
    scores = scores_of(mteb.evaluate(encoder, ShortToLong(), cache=None, show_progress_bar=False),
                       "TinyShortToLongRetrieval")
    ours = evaluate_caption_retrieval(text_model, Dataset.from_list(rows), CAPTIONS, query_instruction=instruction)
    assert abs(scores["hit_rate_at_1"] - ours["cra_a_to_b"] / 100) <= MTEB_ROUNDING


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(text):
    return json.loads(text[text.index("{\n"):])


def test_cli_evaluate_mteb_on_local_data_equals_evaluate_retrieval(capsys, trained_dir, tmp_path):
    """``evaluate --task mteb --dataset`` runs the data as MTEB tasks and writes MTEB's result files beside
    metrics_mteb.json; its scores equal ``evaluate --task retrieval`` / ``--task zeroshot`` on the same data."""
    Dataset.from_list(held_out_rows()).save_to_disk(str(tmp_path / "held-out"))
    common = ["--model", trained_dir, "--dataset", tmp_path / "held-out", "--caption-columns", *CAPTIONS]
    code, out, err = run_cli(capsys, "evaluate", "--task", "mteb", *common, "--templates", TEMPLATE,
                             "--output-dir", tmp_path / "out")
    assert code == 0, err
    result = last_json(out)
    assert json.loads((tmp_path / "out" / "metrics_mteb.json").read_text()) == result
    folder = tmp_path / "out" / "mteb" / "results" / "local__clip-model" / result["mteb_revision"]
    assert {p.name for p in folder.iterdir()} >= {"LocalImageTextI2TRetrieval.json", "LocalImageTextT2IRetrieval.json",
                                                  "LocalZeroShot.json", "model_meta.json"}
    assert result["mteb_results"] == str(tmp_path / "out" / "mteb" / "results")
    i2t, t2i = (result["mteb"][f"LocalImageText{d}Retrieval"]["default"] for d in ("I2T", "T2I"))
    code, out, err = run_cli(capsys, "evaluate", "--task", "retrieval", *common, "--per-caption-column", "false")
    assert code == 0, err
    ours = last_json(out)
    for k in KS:
        assert abs(i2t[f"hit_rate_at_{k}"] - ours[f"image_to_text_R@{k}"] / 100) <= MTEB_ROUNDING
        assert abs(t2i[f"recall_at_{k}"] - ours[f"text_to_image_R@{k}"] / 100) <= MTEB_ROUNDING
    code, out, err = run_cli(capsys, "evaluate", "--task", "zeroshot", *common, "--templates", TEMPLATE)
    assert code == 0, err
    assert result["mteb"]["LocalZeroShot"]["default"]["accuracy"] == pytest.approx(
        last_json(out)["zeroshot_top1"] / 100, abs=1e-9)


def test_cli_evaluate_mteb_names_missing_data_and_unknown_tasks(capsys, trained_dir, tmp_path, monkeypatch):
    """Offline, a task whose data is not cached fails with a message that says so (before any model runs)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    code, _, err = run_cli(capsys, "evaluate", "--task", "mteb", "--model", trained_dir,
                           "--mteb-tasks", "Flickr30kT2IRetrieval")
    assert code == 1
    assert "Flickr30kT2IRetrieval" in err and "mteb/flickr30kt2i" in err and "not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1" in err
    code, _, err = run_cli(capsys, "evaluate", "--task", "mteb", "--model", trained_dir, "--mteb-tasks", "NoSuchTask")
    assert code == 1 and "MTEB has no task 'NoSuchTask'" in err
    code, _, err = run_cli(capsys, "evaluate", "--task", "mteb", "--mteb-tasks", "STS12")
    assert code == 1 and "needs --model (an LLM2CLIP model) or --text-model" in err


def test_documented_mteb_example_runs(trained_dir, tmp_path, monkeypatch, capsys):
    """The MTEB Python block of docs/evaluation.md, run as written in a folder holding a trained model
    (``my-llm2clip``) and held-out data (``my_test``). (tests/test_docs.py runs it too, on the docs' stand-ins.)"""
    page = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    section = page[page.index("## MTEB (MIEB)"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my-llm2clip").symlink_to(trained_dir, target_is_directory=True)
    Dataset.from_list(held_out_rows()).save_to_disk(str(tmp_path / "my_test"))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    scores = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(scores) == {"LocalImageTextI2TRetrieval", "LocalImageTextT2IRetrieval", "LocalZeroShot"}
