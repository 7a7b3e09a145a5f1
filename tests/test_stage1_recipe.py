"""Stage 1's default recipe: the small-LLM settings replace the official ones only where they were left unset and
only for LLMs under 1B parameters; a default warmup never takes more than a quarter of a run. With ``-m slow``: the
demo's stage 1 (those defaults with lr 4e-3), on the real SmolLM2-135M and the emoji pairs, raises held-out CRA to 3x
its raw level and by 20 points in 20 steps."""

import logging

import pytest
import torch

from llm2clip_hf.demo import DemoArguments, emoji_splits
from llm2clip_hf.evaluation import evaluate_caption_retrieval
from llm2clip_hf.model_loading import load_text_model
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.trainers.training_args import SMALL_LLM_DEFAULTS, STAGE_DEFAULTS

from datasets import Dataset

CAPTIONS = ["short_caption", "long_caption"]


def args_for(tmp_path, stage="caption", **settings):
    return LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage=stage, use_cpu=True, report_to="none",
                                     save_strategy="no", **settings)


@pytest.mark.parametrize("stage", ["caption", "mntp"])
def test_small_llm_defaults_replace_only_unset_official_values(tmp_path, stage):
    official = STAGE_DEFAULTS[stage]["learning_rate"]
    small = SMALL_LLM_DEFAULTS[stage]["learning_rate"]
    assert small != official
    args = args_for(tmp_path, stage)
    assert args.learning_rate == official
    assert args.apply_model_size_defaults(8_000_000_000) == {} and args.learning_rate == official
    assert args.apply_model_size_defaults(135_000_000) == SMALL_LLM_DEFAULTS[stage]
    assert args.learning_rate == small
    explicit = args_for(tmp_path, stage, learning_rate=official)
    assert "learning_rate" not in explicit.apply_model_size_defaults(135_000_000)
    assert explicit.learning_rate == official
    clip = args_for(tmp_path, "clip")
    assert clip.apply_model_size_defaults(135_000_000) == {} and clip.learning_rate == STAGE_DEFAULTS["clip"][
        "learning_rate"]


def test_small_llm_caption_queries_carry_no_instruction_unless_one_is_given(tmp_path):
    args = args_for(tmp_path)
    assert args.short_query_instruction == STAGE_DEFAULTS["caption"]["short_query_instruction"] != ""
    args.apply_model_size_defaults(135_000_000)
    assert (args.short_query_instruction, args.long_query_instruction) == ("", "")
    given = args_for(tmp_path, short_query_instruction="Find the caption")
    given.apply_model_size_defaults(135_000_000)
    assert given.short_query_instruction == "Find the caption" and given.long_query_instruction == ""


def test_default_warmup_is_capped_at_a_quarter_of_the_run(tmp_path):
    args = args_for(tmp_path)
    assert args.warmup_steps == 300
    assert args.get_warmup_steps(150) == 38          # 300 would exceed the whole run
    assert args.get_warmup_steps(100_000) == 300     # the official warmup at scale
    assert args_for(tmp_path, warmup_steps=300).get_warmup_steps(150) == 300  # explicit: as given
    assert args_for(tmp_path, warmup_steps=0.5).get_warmup_steps(150) == 75


def test_trainer_applies_and_logs_the_small_llm_defaults(text_model, tmp_path, caplog):
    args = args_for(tmp_path, per_device_train_batch_size=8, max_steps=10)
    with caplog.at_level(logging.WARNING):
        trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=Dataset.from_list(
            tiny_caption_pair_rows()[:16]))
    small = SMALL_LLM_DEFAULTS["caption"]["learning_rate"]
    assert any("small-LLM defaults" in record.getMessage() and str(small) in record.getMessage()
               for record in caplog.records)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    assert {group["initial_lr"] if "initial_lr" in group else group["lr"]
            for group in trainer.optimizer.param_groups} == {small}
    # the scheduler warms up over 3 steps (a quarter of 10, rounded up), not the official 300
    assert trainer.lr_scheduler.lr_lambdas[0](3) == pytest.approx(1.0)
    assert trainer.lr_scheduler.lr_lambdas[0](1) == pytest.approx(1 / 3)


@pytest.mark.slow
def test_demo_stage1_lifts_held_out_cra_of_smollm2_on_emoji(tmp_path):
    torch.manual_seed(0)
    train, test = emoji_splits(smoke=False)
    model = load_text_model(None, max_length=64)
    raw = evaluate_caption_retrieval(model, test, CAPTIONS)["cra"]
    demo = DemoArguments()  # the demo's stage 1: the small-LLM defaults but for a doubled learning rate
    args = args_for(tmp_path, per_device_train_batch_size=demo.stage1_batch_size, max_steps=demo.stage1_steps,
                    learning_rate=demo.stage1_learning_rate, seed=0, disable_tqdm=True)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    tuned = evaluate_caption_retrieval(trainer.text_model, test, CAPTIONS)["cra"]
    assert tuned >= 3 * raw and tuned >= raw + 20, (raw, tuned)
