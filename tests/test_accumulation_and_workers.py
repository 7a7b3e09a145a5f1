"""Gradient accumulation and DataLoader workers in both stages, against the plain computation.

Accumulating 2 micro-batches must give the mean of the two micro-batch gradients (a contrastive loss gains no
negatives from accumulation, and no loss may be scaled twice), and DataLoader workers must not change what is
trained (rows, caption draws and crops are seeded by row and epoch, not by the worker)."""

import itertools

import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import precompute_text_embeddings
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from numerics import assert_same_tensor
from test_grad_cache import RecordGradients

CAPTIONS = ["short_caption", "long_caption"]


@pytest.fixture(scope="module")
def stage_data(tiny_llm_dir):
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    images = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:16]), text_model, CAPTIONS)
    return {"caption": Dataset.from_list(tiny_caption_pair_rows()[:16]), "clip": images}


def new_model(stage, tiny_llm_dir):
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    if stage == "caption":
        return text_model
    return LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)


def trainer_for(stage, tiny_llm_dir, data, tmp_path, **settings):
    args = LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path), stage=stage, per_device_train_batch_size=4, optim="sgd", learning_rate=0.1,
        warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, lora_dropout=0.0,
        use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, **settings)
    recorder = RecordGradients()
    trainer = LLM2CLIPTrainer(model=new_model(stage, tiny_llm_dir), args=args, train_dataset=data,
                              callbacks=[recorder])
    return trainer, recorder


@pytest.mark.parametrize("stage", ["caption", "clip"])
def test_accumulated_gradient_is_the_mean_of_the_micro_batch_gradients(stage, stage_data, tiny_llm_dir, tmp_path):
    trainer, recorder = trainer_for(stage, tiny_llm_dir, stage_data[stage], tmp_path / "run", max_steps=1,
                                    gradient_accumulation_steps=2)
    trainer.train()
    # By hand: the same two micro-batches (the loader's first two), each loss's gradient at the initial weights.
    reference, _ = trainer_for(stage, tiny_llm_dir, stage_data[stage], tmp_path / "hand", max_steps=1,
                               gradient_accumulation_steps=2)
    model = reference.model
    model.train()
    for batch in itertools.islice(reference.get_train_dataloader(), 2):
        (reference.compute_loss(model, batch) / 2).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert expected.keys() == recorder.gradients.keys()
    nonzero = [n for n in expected if expected[n].abs().sum() > 0]
    assert nonzero
    for name in nonzero:
        assert_same_tensor(recorder.gradients[name], expected[name], 1e-5, name)


@pytest.mark.parametrize("stage", ["caption", "clip"])
def test_dataloader_workers_train_exactly_what_the_main_process_trains(stage, stage_data, tiny_llm_dir, tmp_path):
    weights = []
    for workers in (0, 2):
        trainer, _ = trainer_for(stage, tiny_llm_dir, stage_data[stage], tmp_path / str(workers), max_steps=3,
                                 dataloader_num_workers=workers, gradient_accumulation_steps=2)
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=0, msg=name)
