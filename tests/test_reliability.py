"""Failure behaviour: bad rows, truncation, cache integrity, non-finite losses, killed runs, offline loading."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.evaluation import evaluate_retrieval
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from launching import accelerate_launch  # noqa: E402

CAPTIONS = ["short_caption", "long_caption"]


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rows_with_bad_ones():
    """16 good rows as image bytes, then a corrupt image, a missing file, an empty and a None caption."""
    rows = [{"image": {"bytes": png_bytes(r["image"]), "path": None}, "short_caption": r["short_caption"],
             "long_caption": r["long_caption"]} for r in tiny_image_caption_rows()[:16]]
    good = dict(rows[0])
    rows.append(dict(good, image={"bytes": b"not a png at all", "path": None}))      # row 16
    rows.append(dict(good, image={"bytes": None, "path": "/no/such/image.png"}))     # row 17
    rows.append(dict(good, short_caption=""))                                        # row 18
    rows.append(dict(good, long_caption=None))                                       # row 19
    return rows


def clip_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), stage="clip", per_device_train_batch_size=10, max_steps=2,
                    use_cpu=True, save_strategy="no", disable_tqdm=True, text_source="frozen")
    return LLM2CLIPTrainingArguments(**{**settings, **overrides})


def in_loop_model(text_model):
    torch.manual_seed(0)
    return LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), projection_dim=32)


def test_training_skips_and_counts_bad_rows(text_model, tmp_path, caplog):
    data = Dataset.from_list(rows_with_bad_ones())
    trainer = LLM2CLIPTrainer(model=in_loop_model(text_model), args=clip_args(tmp_path), train_dataset=data)
    assert len(trainer.train_dataset) == 18  # the two bad captions are dropped before training
    result = trainer.train()
    assert result.metrics["skipped_rows"] == 2  # corrupt and missing image
    assert "Skipped 2 rows with unreadable images: [16, 17]" in caplog.text
    assert "Skipping 2 of 20 rows" in caplog.text and "Skipping row 16" in caplog.text


def test_training_without_skipping_names_the_bad_row(text_model, tmp_path):
    data = Dataset.from_list(rows_with_bad_ones())
    with pytest.raises(ValueError, match="Row 18 has an empty"):
        LLM2CLIPTrainer(model=in_loop_model(text_model), args=clip_args(tmp_path, skip_bad_rows=False),
                        train_dataset=data)
    data = Dataset.from_list(rows_with_bad_ones()[:18])
    trainer = LLM2CLIPTrainer(model=in_loop_model(text_model), args=clip_args(tmp_path, skip_bad_rows=False),
                              train_dataset=data.select(list(range(16, 18)) + list(range(16))))
    with pytest.raises(ValueError, match="row 0: cannot read the image"):
        trainer.train()


def test_caption_stage_skips_empty_captions(text_model, tmp_path):
    rows = tiny_caption_pair_rows()[:8]
    rows[3]["long_caption"] = "   "
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="caption", max_steps=1, use_cpu=True,
                                     save_strategy="no", per_device_train_batch_size=4, disable_tqdm=True)
    trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=Dataset.from_list(rows))
    assert len(trainer.train_dataset) == 7 and 3 not in trainer.train_dataset["__llm2clip_row__"]
    with pytest.raises(ValueError, match="Row 3"):
        LLM2CLIPTrainer(model=text_model, args=args, train_dataset=Dataset.from_list(rows),
                        eval_dataset=Dataset.from_list(rows))  # evaluation never skips


def test_evaluation_never_drops_a_row(text_model):
    rows = rows_with_bad_ones()[:17]
    model = in_loop_model(text_model)
    with pytest.raises(ValueError, match="Row 16: cannot read the image"):
        evaluate_retrieval(model, Dataset.from_list(rows), "image", CAPTIONS)
    rows = rows_with_bad_ones()[:16] + [rows_with_bad_ones()[18]]
    with pytest.raises(ValueError, match="Row 16, column 'short_caption'"):
        evaluate_retrieval(model, Dataset.from_list(rows), "image", CAPTIONS)


def test_long_captions_are_truncated_counted_and_warned_once(tiny_llm_dir, caplog):
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=8)
    long = "a photo of a cat sitting on a red sofa near the window in the park"
    full = LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=512)
    assert len(full.tokenize_items([long])[0].input_ids) > 8
    caplog.clear()
    text_model.encode([long, "a dog", long])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 captions" in warnings[0].getMessage()
    assert [item.truncated for item in text_model.tokenize_items([long, "a dog", long])] == [True, False, True]


def test_non_finite_loss_stops_naming_step_and_rows_after_saving_the_last_good_state(text_model, tmp_path):
    from llm2clip_hf.trainers import CaptionContrastiveLoss

    class ExplodesAtStep2(CaptionContrastiveLoss):
        calls = 0

        def forward(self, *args):
            type(self).calls += 1
            loss = super().forward(*args)
            return loss * float("nan") if type(self).calls == 2 else loss

    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="caption", max_steps=4, use_cpu=True,
                                     save_strategy="no", per_device_train_batch_size=4, disable_tqdm=True)
    data = Dataset.from_list(tiny_caption_pair_rows()[:8])
    trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=data, loss=ExplodesAtStep2())
    with pytest.raises(FloatingPointError, match=r"at step 2 \(process 0: loss nan, batch rows \[\d+, \d+, \d+, \d+\]\)") \
            as error:
        trainer.train()
    assert "checkpoint-1" in str(error.value)
    assert (tmp_path / "checkpoint-1" / "adapter_model.safetensors").is_file()
    saved = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


RUN = """
import sys, time, torch
from datasets import Dataset
from transformers import TrainerCallback
from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.data import precompute_text_embeddings
from safetensors.torch import save_file
llm_dir, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.5)
torch.manual_seed(0)
text_model = LLM2CLIPTextModel.from_llm(llm_dir)
data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()), text_model,
                                  ["short_caption", "long_caption"])
torch.manual_seed(0)
model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
args = LLM2CLIPTrainingArguments(output_dir=out, stage="clip", max_steps=8, save_strategy="steps", save_steps=2,
                                 per_device_train_batch_size=8, use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data, callbacks=[Slow()])
trainer.train(resume_from_checkpoint=resume or None)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + "/final.safetensors")
"""


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_llm_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def launch(out, mode):
        return subprocess.Popen([sys.executable, str(script), str(tiny_llm_dir), str(out), mode], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    full = launch(tmp_path / "full", "fresh")
    killed = launch(tmp_path / "cut", "fresh")
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoint-4" / "trainer_state.json").exists():
        assert time.time() < deadline and killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    resumed = launch(tmp_path / "cut", "resume")
    for proc in (full, resumed):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    expected = load_file(tmp_path / "full" / "final.safetensors")
    got = load_file(tmp_path / "cut" / "final.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_offline_loading_makes_no_network_call_and_says_how_to_provide_the_model(monkeypatch):
    from llm2clip_hf.conversion.model_loading import load_clip_model, load_text_model

    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 is set.*huggingface-cli download someone/missing-llm"):
        load_text_model("someone/missing-llm")
    with pytest.raises(OSError, match="LLM2CLIP model 'someone/missing-clip'"):
        load_clip_model("someone/missing-clip")
    assert attempts == []


def test_cli_stage2_cache_step_follows_the_bad_caption_policy(tiny_llm_dir, tmp_path, caplog):
    """An imagefolder whose row 7 has an empty long caption: the cache step drops it with a warning, as training
    with skip_bad_rows=True (the default) promises, instead of stopping; with --skip-bad-rows false it stops."""
    from test_cli import QUICK, TINY_TOWER

    from llm2clip_hf.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, row in enumerate(tiny_image_caption_rows()[:12]):
        row["image"].save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "short_caption": row["short_caption"],
                     "long_caption": "" if i == 7 else row["long_caption"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--stage", "clip", "--text-model", str(tiny_llm_dir), "--dataset", str(folder),
              "--max-steps", "1", *TINY_TOWER, *QUICK]
    assert main(common + ["--output-dir", str(tmp_path / "out")]) == 0
    assert "Skipping 1 of 12 rows" in caplog.text and "rows [7]" in caplog.text
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["stage"] == "clip" and metrics["epoch"] > 0  # it trained
    cache = load_from_disk(str(tmp_path / "out" / "_embedding_cache"))
    assert len(cache) == 11  # one row of embeddings per kept row (row 7 dropped, as logged)
    assert main(common + ["--output-dir", str(tmp_path / "strict"), "--skip-bad-rows", "false"]) == 1


def test_non_finite_loss_is_checked_once_per_optimizer_step_and_names_the_micro_batch(text_model, tmp_path):
    from llm2clip_hf.trainers import CaptionContrastiveLoss

    class ExplodesAtCall6(CaptionContrastiveLoss):
        calls = 0

        def forward(self, *args):
            type(self).calls += 1
            loss = super().forward(*args)
            return loss * float("nan") if type(self).calls == 6 else loss

    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="caption", max_steps=3, use_cpu=True,
                                     save_strategy="no", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                     disable_tqdm=True, train_sampling_strategy="sequential")
    data = Dataset.from_list(tiny_caption_pair_rows()[:24])
    trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=data, loss=ExplodesAtCall6())
    checks = []
    original = trainer.health.check
    trainer.health.check = lambda: (checks.append(len(trainer.health.records)), original())[1]
    with pytest.raises(FloatingPointError, match=r"at step 2 \(process 0: loss nan, batch rows \[\d+, \d+\]\)") as error:
        trainer.train()
    assert checks == [4, 4]  # one check per optimizer step, over its 4 micro-batches
    assert "checkpoint-1" in str(error.value)
    rows = [int(r) for r in str(error.value).split("batch rows [")[1].split("]")[0].split(", ")]
    assert len(rows) == 2 and rows != [0, 1]  # the second micro-batch of step 2, not the step's first


@pytest.mark.slow
def test_non_finite_loss_on_one_process_stops_every_process_after_a_joint_save(tiny_llm_dir, tmp_path):
    """2 gloo processes; only process 1 sees a NaN loss (at step 2). Both stop at that step with the same message
    naming process 1 and its rows, after saving checkpoint-1 together (model state and both processes' RNG files);
    no process applies the NaN update."""
    accelerate_launch([Path(__file__).with_name("non_finite_worker.py"), tiny_llm_dir, tmp_path])
    messages = [(tmp_path / f"error-{rank}.txt").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1]
    assert "at step 2 (process 1: loss nan, batch rows [" in messages[0] and "process 0:" not in messages[0]
    assert "checkpoint-1" in messages[0]
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    finals = [load_file(tmp_path / f"weights-{rank}.safetensors") for rank in (0, 1)]
    assert all(torch.isfinite(v).all() for final in finals for v in final.values())
