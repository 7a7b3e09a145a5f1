"""Training health: collapsed embeddings are noticed in both stages (stopped by default with the last good weights
saved as a model, or warned with stop_on_collapse=False); non-finite losses are tested in test_reliability.py, on one
process and on two."""

import logging
import math

import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.training_health import (
    CollapseMonitor,
    EmbeddingCollapseError,
    StepHealth,
    checkpoint_before,
    embedding_spread,
)

COLLAPSED = "The training embeddings have collapsed"


def test_spread_is_zero_for_identical_rows_and_large_for_spread_ones():
    assert embedding_spread(torch.ones(6, 4) * 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_spread(torch.eye(4)).item() == pytest.approx(1 - 1 / 4)  # |mean|^2 of 4 orthonormal rows
    per_side = embedding_spread(torch.eye(4), torch.ones(4, 4))  # one spread per side, in their order
    assert per_side.tolist() == pytest.approx([1 - 1 / 4, 0.0], abs=1e-6)
    assert embedding_spread(torch.randn(1, 8)) is None


def test_monitor_reports_a_streak_once_after_patience_and_ignores_a_spread_without_uninformative_loss():
    monitor = CollapseMonitor(spread_ratio=0.02, patience=3)
    log_n = math.log(16)
    healthy, collapsed = StepHealth((0.4,), 1.0, log_n), StepHealth((0.001,), log_n, log_n)
    low_spread_but_learning = StepHealth((0.001,), 0.5 * log_n, log_n)
    assert not monitor.update(1, healthy)
    assert [monitor.update(step, low_spread_but_learning) for step in (2, 3, 4, 5)] == [False] * 4
    assert [monitor.update(step, collapsed) for step in (6, 7, 8, 9)] == [False, False, True, False]
    assert monitor.streak_start == 6
    assert not monitor.update(10, healthy) and monitor.streak == 0
    assert [monitor.update(step, collapsed) for step in (11, 12, 13)] == [False, False, True]  # a new streak


def stage1(tiny_llm_dir, tmp_path, learning_rate, **settings):
    torch.manual_seed(0)
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="caption", learning_rate=learning_rate, warmup_steps=0,
        per_device_train_batch_size=8, use_cpu=True, logging_steps=1, disable_tqdm=True, report_to="none",
        **{"save_strategy": "no", "max_steps": 12, "loss_centering": False, **settings})  # the plain loss collapses
    return LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args,
                           train_dataset=Dataset.from_list(tiny_caption_pair_rows()))


def collapse_warnings(caplog):
    return [r.getMessage() for r in caplog.records if COLLAPSED in r.getMessage()]


@pytest.mark.parametrize("learning_rate, collapses", [(0.5, True), (2e-4, False)])
def test_stage1_collapse_at_a_very_high_learning_rate_is_warned_and_a_sane_run_is_not(
        tiny_llm_dir, tmp_path, caplog, learning_rate, collapses):
    """lr 0.5 maps every caption of the tiny LLM to nearly one point within 5 steps (loss at ln 16); 2e-4 keeps
    the spread above 60 % of its start."""
    with caplog.at_level(logging.WARNING):
        stage1(tiny_llm_dir, tmp_path, learning_rate, stop_on_collapse=False).train()
    warnings = collapse_warnings(caplog)
    assert len(warnings) == (1 if collapses else 0)
    if collapses:
        assert "learning_rate=0.5" in warnings[0] and "ln(candidates) = 2.7726" in warnings[0]
        assert "Training goes on" in warnings[0]


def test_checkpoint_before_a_collapse_excludes_the_weights_that_embedded_its_first_step(tmp_path):
    """Step S embeds with the weights after S - 1 updates (checkpoint-<S-1>): they are already collapsed."""
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert checkpoint_before(str(tmp_path), 7) == str(tmp_path / "checkpoint-4")
    assert checkpoint_before(str(tmp_path), 8) == str(tmp_path / "checkpoint-6")
    assert checkpoint_before(str(tmp_path), 3) is None


def spread_of(model, rows):
    with torch.no_grad():
        return embedding_spread(model.encode([r["short_caption"] for r in rows] + [r["long_caption"] for r in rows])
                                ).item()


def test_a_collapse_stops_by_default_and_saves_the_last_good_weights_as_a_model(tiny_llm_dir, tmp_path):
    """Default settings: the run stops; the saved last-good model equals a run of exactly that many steps (constant
    lr, so the first N steps of both runs are the same computation), and its embeddings are spread where the
    collapsed ones are not."""
    constant = dict(lr_scheduler_type="constant", save_strategy="steps", save_steps=2)
    trainer = stage1(tiny_llm_dir, tmp_path / "run", 0.5, **constant)
    with pytest.raises(EmbeddingCollapseError) as error:
        trainer.train()
    start, good = trainer.health.collapse.streak_start, trainer.health.snapshot.step
    assert good <= start - 2  # at the latest, the weights that embedded step start - 1, the last step not collapsed
    saved = tmp_path / "run" / f"last-good-step-{good}"
    message = str(error.value)
    assert error.value.last_good_model == str(saved) and str(saved) in message
    assert "learning_rate=0.5" in message and "stop_on_collapse=False" in message
    assert "loss_centering=True" in message  # this run set the plain loss
    assert f"checkpoint-{max(s for s in range(2, start - 1, 2))}" in message
    assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing from the collapsed steps became the model
    last_good = LLM2CLIPTextModel.from_pretrained(saved)

    reference = stage1(tiny_llm_dir, tmp_path / "reference", 0.5, **{**constant, "max_steps": good,
                                                                    "save_strategy": "no"})
    reference.train()
    reference.save_model()
    expected = LLM2CLIPTextModel.from_pretrained(tmp_path / "reference")
    for (name, value), (_, other) in zip(last_good.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(value, other, msg=name)
    rows = tiny_caption_pair_rows()
    raw = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    assert spread_of(last_good, rows) > 0.02 * spread_of(raw, rows)  # above the collapse threshold


def test_stage1_keeps_the_best_checkpoint_by_held_out_cra(tiny_llm_dir, tmp_path):
    """load_best_model_at_end with metric_for_best_model="cra": the model at the end is the checkpoint with the best
    held-out CRA, recomputed here from each checkpoint's saved CRA in the log."""
    rows = tiny_caption_pair_rows()
    torch.manual_seed(0)
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="caption", max_steps=8, learning_rate=1e-3, warmup_steps=0,
        per_device_train_batch_size=8, use_cpu=True, logging_steps=1, disable_tqdm=True, report_to="none",
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
        metric_for_best_model="cra")
    trainer = LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args,
                              train_dataset=Dataset.from_list(rows[:24]), eval_dataset=Dataset.from_list(rows[24:]))
    trainer.train()
    evaluations = [(entry["step"], entry["eval_cra"]) for entry in trainer.state.log_history if "eval_cra" in entry
                   and entry["step"] > 0]
    best_step = max(evaluations, key=lambda entry: entry[1])[0]  # the Trainer keeps the first of equal scores
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    from llm2clip_hf.evaluation import evaluate_caption_retrieval
    now = evaluate_caption_retrieval(trainer.accelerator.unwrap_model(trainer.model), Dataset.from_list(rows[24:]),
                                     ["short_caption", "long_caption"])["cra"]
    assert now == pytest.approx(max(cra for _, cra in evaluations))


@pytest.mark.parametrize("learning_rate, collapses", [(1.0, True), (1e-3, False)])
def test_stage2_collapse_stops_by_default(text_model, tmp_path, caplog, learning_rate, collapses):
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()), text_model,
                                      ["short_caption", "long_caption"])
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                          projection_dim=32)
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="clip", max_steps=12, learning_rate=learning_rate, warmup_steps=0,
        per_device_train_batch_size=8, use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        report_to="none")
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data)
    if not collapses:
        with caplog.at_level(logging.WARNING):
            trainer.train()
        assert not collapse_warnings(caplog)
        return
    with pytest.raises(EmbeddingCollapseError) as error:  # stopped by default; the last good tower saved
        trainer.train()
    reloaded = LLM2CLIPModel.from_pretrained(error.value.last_good_model)
    assert reloaded.config.vision_config.hidden_size == model.config.vision_config.hidden_size


def test_cli_stage1_that_collapses_exits_non_zero_with_the_last_good_model_saved(tiny_llm_dir, tmp_path, capsys):
    import json

    from llm2clip_hf.cli.commands import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in tiny_caption_pair_rows()))
    out = tmp_path / "s1"
    code = main(["train", "--stage", "caption", "--text-model", str(tiny_llm_dir), "--dataset", str(pairs),
                 "--output-dir", str(out), "--max-steps", "12", "--learning-rate", "0.5", "--warmup-steps", "0",
                 "--per-device-train-batch-size", "8", "--use-cpu", "--save-strategy", "no",
                 "--loss-centering", "false"])
    error = capsys.readouterr().err
    assert code == 1 and "collapsed to nearly one point" in error and "--stop-on-collapse false" in error
    saved = [p for p in out.iterdir() if p.name.startswith("last-good-step-")]
    assert len(saved) == 1 and str(saved[0]) in error
    LLM2CLIPTextModel.from_pretrained(saved[0])  # a loadable encoder
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def test_the_collapse_check_watches_the_raw_embeddings_under_the_centered_loss(tmp_path):
    """Centered rows are spread by construction (their mean is zero), so watching them would hide a collapse to one
    point; with the loss near ln(candidates) the check must see the raw rows' (near-zero) spread."""
    from llm2clip_hf.data.text_pairs import ROLES, TEXTS
    from llm2clip_hf.trainers.losses import CaptionContrastiveLoss
    from llm2clip_hf.trainers.stages import STAGES

    seen = []
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="caption", use_cpu=True, report_to="none")
    stage = STAGES["caption"](args, observe=lambda model, *embeddings: seen.append(embedding_spread(*embeddings)))
    collapsed = torch.ones(12, 16) + 1e-4 * torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    stage._loss_on(None, {ROLES: ["query", "positive", "negative"]}, CaptionContrastiveLoss(center=True),
                   {TEXTS: collapsed})
    assert seen[0].item() < 1e-6


def test_stage2_flags_an_image_tower_collapsing_against_its_own_start_when_the_text_side_starts_narrow(
        text_model, tmp_path, caplog):
    """A dominated teacher without centering gives a narrow text side from step 1. The image side then collapses to
    about 0.1 % of its own starting spread while the text side stays as it was: each side is checked against its own
    start, so the image collapse is flagged (the smaller of the two spreads never fell below 2 % of its start)."""
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:8]), text_model,
                                      ["short_caption", "long_caption"])
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                          projection_dim=32).train()
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="clip", max_steps=4, use_cpu=True, save_strategy="no", report_to="none",
        stop_on_collapse=False, collapse_patience=2)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data)
    noise = torch.Generator().manual_seed(0)
    spread_images = torch.randn(8, 32, generator=noise)
    narrow_text = torch.ones(8, 32) + 0.05 * torch.randn(8, 32, generator=noise)
    collapsed_images = torch.ones(8, 32) + 0.03 * torch.randn(8, 32, generator=noise)
    start_image, text = embedding_spread(spread_images).item(), embedding_spread(narrow_text).item()
    image = embedding_spread(collapsed_images).item()
    assert image < 0.002 * start_image  # the image side fell to about 0.1 % of its own start ...
    assert min(image, text) > 0.02 * min(start_image, text)  # ... but not below 2 % of the smaller starting spread
    log_n = math.log(8)
    with caplog.at_level(logging.WARNING):
        for step, images in enumerate([spread_images, collapsed_images, collapsed_images]):
            trainer.state.global_step = step
            trainer.health.observe(model, images, narrow_text)
            trainer.health.record(torch.tensor(log_n), torch.arange(8), log_n)
            trainer.health.check()
    warnings = collapse_warnings(caplog)
    assert len(warnings) == 1 and "since step 2" in warnings[0]
    assert "image embeddings" in warnings[0] and "text embeddings" not in warnings[0]
    assert f"{image:.2e}" in warnings[0] and f"{start_image:.2e}" in warnings[0]
