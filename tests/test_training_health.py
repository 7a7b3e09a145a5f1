"""Training health: collapsed embeddings are noticed in both stages (warned, or stopped with the last good checkpoint
kept); non-finite losses are tested in test_reliability.py, on one process and on two."""

import logging
import math

import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.training_health import CollapseMonitor, EmbeddingCollapseError, StepHealth, embedding_spread

COLLAPSED = "The training embeddings have collapsed"


def test_spread_is_zero_for_identical_rows_and_large_for_spread_ones():
    assert embedding_spread(torch.ones(6, 4) * 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_spread(torch.eye(4)).item() == pytest.approx(1 - 1 / 4)  # |mean|^2 of 4 orthonormal rows
    assert embedding_spread(torch.randn(2, 8), torch.ones(2, 8)).item() == pytest.approx(0.0, abs=1e-6)  # the least
    assert embedding_spread(torch.randn(1, 8)) is None


def test_monitor_reports_a_streak_once_after_patience_and_ignores_a_spread_without_uninformative_loss():
    monitor = CollapseMonitor(spread_ratio=0.02, patience=3)
    log_n = math.log(16)
    healthy, collapsed = StepHealth(0.4, 1.0, log_n), StepHealth(0.001, log_n, log_n)
    low_spread_but_learning = StepHealth(0.001, 0.5 * log_n, log_n)
    assert not monitor.update(1, healthy)
    assert [monitor.update(step, low_spread_but_learning) for step in (2, 3, 4, 5)] == [False] * 4
    assert [monitor.update(step, collapsed) for step in (6, 7, 8, 9)] == [False, False, True, False]
    assert monitor.streak_start == 6
    assert not monitor.update(10, healthy) and monitor.streak == 0
    assert [monitor.update(step, collapsed) for step in (11, 12, 13)] == [False, False, True]  # a new streak


def stage1(tiny_llm_dir, tmp_path, learning_rate, **settings):
    torch.manual_seed(0)
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="caption", max_steps=12, learning_rate=learning_rate, warmup_steps=0,
        per_device_train_batch_size=8, use_cpu=True, logging_steps=1, disable_tqdm=True, report_to="none",
        **{"save_strategy": "no", **settings})
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
        stage1(tiny_llm_dir, tmp_path, learning_rate).train()
    warnings = collapse_warnings(caplog)
    assert len(warnings) == (1 if collapses else 0)
    if collapses:
        assert "learning_rate=0.5" in warnings[0] and "ln(candidates) = 2.7726" in warnings[0]


def test_stop_on_collapse_keeps_the_last_checkpoint_from_before_the_collapse(tiny_llm_dir, tmp_path):
    trainer = stage1(tiny_llm_dir, tmp_path, 0.5, stop_on_collapse=True, save_strategy="steps", save_steps=2)
    with pytest.raises(EmbeddingCollapseError, match="stop_on_collapse=True") as error:
        trainer.train()
    start = trainer.health.collapse.streak_start
    kept = max(step for step in range(2, start, 2))
    assert f"checkpoint-{kept}" in str(error.value) and f"since step {start}" in str(error.value)
    assert (tmp_path / f"checkpoint-{kept}").is_dir()
    assert not (tmp_path / "model.safetensors").exists()  # nothing from the collapsed steps became the model


@pytest.mark.parametrize("learning_rate, collapses", [(1.0, True), (1e-3, False)])
def test_stage2_collapse_is_warned(text_model, tmp_path, caplog, learning_rate, collapses):
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()), text_model,
                                      ["short_caption", "long_caption"])
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False,
                                          projection_dim=32)
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage="clip", max_steps=12, learning_rate=learning_rate, warmup_steps=0,
        per_device_train_batch_size=8, use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        report_to="none")
    with caplog.at_level(logging.WARNING):
        LLM2CLIPTrainer(model=model, args=args, train_dataset=data).train()
    assert len(collapse_warnings(caplog)) == (1 if collapses else 0)
