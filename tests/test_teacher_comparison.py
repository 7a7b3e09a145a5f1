"""docs/teacher_comparison.md, run as written at tiny scale: two teachers (the raw LLM and its stage-1 encoder, one
--text-template for both), a cache per teacher, stage 2 per seed and teacher, and per-language retrieval of every
run on the shipped 12-emoji set (English captions and CLDR's French, German, Spanish and Chinese names)."""

import json
import re
from pathlib import Path

import pytest
import torch

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.cli import main
from llm2clip_hf.modeling import TEXT_TEMPLATES
from llm2clip_hf.testing import tiny_caption_pair_rows

DOC = Path(__file__).parents[1] / "docs" / "teacher_comparison.md"
DATA = Path(__file__).parent / "data" / "multilingual" / "metadata.jsonl"
LANGUAGES = ["caption", "caption_fr", "caption_de", "caption_es", "caption_zh"]
TEMPLATE = "llama-3-instruct"  # as the document: a preset name (the tiny tokenizer has its tokens)
TINY_TOWER = ["--vision-preset", "B/16", "--image-size", "32", "--patch-size", "8", "--vision-width", "64",
              "--vision-layers", "2", "--vision-heads", "2", "--projection-dim", "32"]
QUICK = ["--use-cpu", "--save-strategy", "no", "--disable-tqdm", "true", "--per-device-train-batch-size", "4"]


def cli(*argv, scale=()) -> None:
    """Run ``llm2clip-hf *argv`` with the test-scale options ``scale``; every option of ``argv`` must be one the
    document's own command uses."""
    documented = documented_options(argv[0])
    used = {str(a) for a in argv[1:] if str(a).startswith("--")}
    assert used <= documented, f"{argv[0]}: {used - documented} not in docs/teacher_comparison.md"
    assert main([str(a) for a in (*argv, *scale)]) == 0


def documented_options(command: str) -> set[str]:
    """The options of the document's ``llm2clip-hf <command>`` lines (in its bash blocks, continuations joined),
    with the ``$TEMPLATE`` variable expanded as the document defines it."""
    text = DOC.read_text()
    template = re.search(r'TEMPLATE="([^"]+)"', text).group(1)
    lines = " ".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ").splitlines()
    used = " ".join(line for line in lines if re.search(rf"(llm2clip-hf|llm2clip_hf\.cli) {command}\b", line))
    return set(re.findall(r"(--[a-z-]+)", used.replace("$TEMPLATE", template)))


@pytest.mark.slow
def test_the_documented_teacher_comparison_runs_as_written(tiny_llm_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in tiny_caption_pair_rows()))
    template = ["--text-template", TEMPLATE]

    # 1. The two teachers.
    cli("train", "--stage", "caption", "--text-model", tiny_llm_dir, *template, "--dataset", pairs,
        "--caption-columns", "short_caption", "long_caption", "--eval-fraction", "0.25",
        "--output-dir", tmp_path / "stage1", scale=["--max-steps", "2", *QUICK])
    teachers = {"raw": tiny_llm_dir, "tuned": tmp_path / "stage1"}
    # 2. One cache per teacher (English captions only: the training language).
    for name, model in teachers.items():
        cli("embed", "--text-model", model, *template, "--dataset", DATA, "--caption-columns", "caption",
            "--output-dir", tmp_path / "cache" / name)
    # 3. Stage 2, same seed, both teachers. 4. Evaluate both the same way, per language.
    runs = {}
    for seed in (0, 1):
        for name, model in teachers.items():
            out = tmp_path / f"clip_{name}_seed{seed}"
            cli("train", "--stage", "clip", "--text-model", model, *template, "--dataset", DATA,
                "--embedding-cache", tmp_path / "cache" / name, "--caption-columns", "caption", "--seed", seed,
                "--output-dir", out, scale=["--max-steps", "2", "--eval-fraction", "0", *TINY_TOWER, *QUICK])
            cli("evaluate", "--task", "retrieval", "--model", out, "--dataset", DATA, "--caption-columns", *LANGUAGES,
                "--output-dir", out)
            runs[name, seed] = out

    raw_llm = LLM2CLIPTextModel.from_llm(tiny_llm_dir, text_template=TEMPLATE).state_dict()
    tuned = LLM2CLIPTextModel.from_pretrained(tmp_path / "stage1").state_dict()
    assert any(not torch.equal(raw_llm[k], tuned[k]) for k in raw_llm)  # stage 1 changed the teacher
    for (name, seed), out in runs.items():
        metrics = json.loads((out / "metrics_retrieval.json").read_text())
        for column in [*LANGUAGES, "mean"]:
            for key in ("image_to_text_R@1", "text_to_image_R@10"):
                assert 0.0 <= metrics[f"{column}/{key}"] <= 100.0
        assert metrics["caption_fr/num_captions"] == 12 and metrics["num_captions"] == 5 * 12
        # Each CLIP carries its own teacher, and reads text with the template the caches were made with.
        clip = LLM2CLIPModel.from_pretrained(out)
        assert clip.text_model.config.text_template == TEXT_TEMPLATES[TEMPLATE]
        teacher = raw_llm if name == "raw" else tuned
        embedded = clip.text_model.state_dict()
        assert all(torch.equal(embedded[k], teacher[k]) for k in teacher)
