"""LLM2CLIPTrainer honours what the user set and refuses what cannot work: eval_on_start, data_seed, a loss built
for another number of processes, compute_metrics; a frozen LLM never trains in train mode; stage 2 trains without
the LLM and embeds it at the final save."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModel

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import ROW_INDEX, precompute_text_embeddings
from llm2clip_hf.evaluation.model_evaluation import embed_images
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import CaptionContrastiveLoss, LLM2CLIPTrainer, LLM2CLIPTrainingArguments

CAPTIONS = ["short_caption", "long_caption"]


def arguments(tmp_path, stage, **settings):
    defaults = dict(output_dir=str(tmp_path / "out"), stage=stage, use_cpu=True, report_to="none", save_strategy="no",
                    disable_tqdm=True, per_device_train_batch_size=4, per_device_eval_batch_size=4)
    return LLM2CLIPTrainingArguments(**{**defaults, **settings})


@pytest.fixture(scope="module")
def cached_images(tiny_llm_dir):
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    return text_model, precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()[:12]), text_model,
                                                  CAPTIONS)


def clip_model(text_model, embed=False):
    torch.manual_seed(0)
    return LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=embed, projection_dim=32)


@pytest.mark.parametrize("setting, expected", [(None, True), (False, False), (True, True)])
def test_stage1_evaluates_before_training_by_default_but_not_when_told_not_to(tiny_llm_dir, tmp_path, setting,
                                                                              expected):
    pairs = Dataset.from_list(tiny_caption_pair_rows()[:8])
    args = arguments(tmp_path, "caption", eval_on_start=setting)
    trainer = LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args, train_dataset=pairs,
                              eval_dataset=pairs)
    assert trainer.args.eval_on_start is expected
    assert args.eval_on_start is (setting is True)  # the caller's object is left as it was


def first_batch_rows(trainer):
    return next(iter(trainer.get_train_dataloader()))[ROW_INDEX].tolist()


def test_data_seed_orders_the_data_and_seed_does_not_when_data_seed_is_set(tiny_llm_dir, tmp_path):
    pairs = Dataset.from_list(tiny_caption_pair_rows())

    def rows(**seeds):
        trainer = LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir),
                                  args=arguments(tmp_path, "caption", **seeds), train_dataset=pairs)
        return first_batch_rows(trainer), trainer.train_dataset["query_is_short"]

    same_data_seed = rows(seed=0, data_seed=7), rows(seed=5, data_seed=7)
    assert same_data_seed[0] == same_data_seed[1]  # order and query/positive coin flips follow data_seed alone
    assert rows(seed=0, data_seed=8) != same_data_seed[0]
    assert rows(seed=0) != rows(seed=5)  # without data_seed, seed orders the data


def test_a_loss_built_for_another_number_of_processes_is_refused(tiny_llm_dir, tmp_path):
    pairs = Dataset.from_list(tiny_caption_pair_rows()[:8])
    with pytest.raises(ValueError, match=r"world_size=2, rank=1, but this run has 1 processes.*world_size=args"):
        LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=arguments(tmp_path, "caption"),
                        train_dataset=pairs, loss=CaptionContrastiveLoss(world_size=2, rank=1))


def test_compute_metrics_receives_every_evaluation_rows_embeddings(cached_images, tmp_path):
    text_model, data = cached_images
    received = []

    def compute_metrics(prediction):
        received.append(prediction)
        return {"rows": float(len(prediction.label_ids))}

    model = clip_model(text_model)
    trainer = LLM2CLIPTrainer(model=model, args=arguments(tmp_path, "clip", retrieval_metrics=False),
                              train_dataset=data, eval_dataset=data, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == len(data) and len(received) == 1
    images, texts = received[0].predictions
    assert images.shape == (len(data), 32) and texts.shape == (len(data), 32)
    assert sorted(received[0].label_ids.tolist()) == list(range(len(data)))
    # the image embeddings are those of the evaluation's own image path, row by row (L2-normalised, as the model's
    # output gives them)
    expected = F.normalize(embed_images(model, [data[int(row)]["image"] for row in received[0].label_ids]), dim=-1)
    torch.testing.assert_close(torch.as_tensor(images), expected, rtol=1e-4, atol=1e-5)


def test_compute_metrics_is_refused_in_the_mntp_stage(tiny_llm_dir, tmp_path):
    with pytest.raises(ValueError, match="compute_metrics is not supported in stage 'mntp'"):
        LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=arguments(tmp_path, "mntp"),
                        train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:8]),
                        compute_metrics=lambda prediction: {})


@pytest.mark.parametrize("text_source, llm_trains", [("frozen", False), ("lora", True)])
def test_a_frozen_embedded_llm_runs_in_eval_mode_while_the_tower_trains(cached_images, tmp_path, text_source,
                                                                         llm_trains):
    text_model, data = cached_images
    model = clip_model(text_model, embed=True)
    modes = []
    model.text_model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.vision_model.register_forward_pre_hook(lambda module, args: modes.append(("tower", module.training)))
    args = arguments(tmp_path, "clip", text_source=text_source, max_steps=2)
    LLM2CLIPTrainer(model=model, args=args, train_dataset=data).train()
    assert {mode for mode in modes if isinstance(mode, bool)} == {llm_trains}
    assert {mode for mode in modes if isinstance(mode, tuple)} == {("tower", True)}


def test_stage2_trains_without_the_llm_and_embeds_it_at_the_final_save(cached_images, tmp_path):
    text_model, data = cached_images
    model = clip_model(text_model, embed=False)
    loads = []

    def load_text_model():
        loads.append(model.text_model)  # what the model held while it trained
        return text_model

    trainer = LLM2CLIPTrainer(model=model, args=arguments(tmp_path, "clip", max_steps=2), train_dataset=data,
                              text_model=text_model, text_model_on_save=load_text_model)
    trainer.train()
    assert model.text_model is None and not loads  # no LLM in the trained model
    trainer.save_model()
    assert loads == [None]
    reloaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert reloaded.text_model is not None and not reloaded.text_model.training
    captions = ["a red circle", "a photo of a blue square"]
    with torch.no_grad():
        expected = model.get_text_features(text_model.encode(captions))  # adapter on the LLM's embeddings
        got = reloaded.get_text_features(**reloaded.text_model.tokenize(captions))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_stage1_with_gradient_checkpointing_gives_the_same_gradients(tiny_llm_dir, tmp_path):
    """The official stage 1 trains with gradient checkpointing (the demo too, for memory): the LoRA gradients of a
    step equal those without it."""
    from test_grad_cache import RecordGradients

    pairs = Dataset.from_list(tiny_caption_pair_rows()[:8])
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        recorder = RecordGradients()
        args = arguments(tmp_path / str(checkpointing), "caption", max_steps=1, per_device_train_batch_size=8,
                         lora_dropout=0.0, gradient_checkpointing=checkpointing)
        LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args, train_dataset=pairs,
                        callbacks=[recorder]).train()
        gradients.append(recorder.gradients)
    assert gradients[0].keys() == gradients[1].keys() and any(g.abs().sum() > 0 for g in gradients[0].values())
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-7)


def in_batch_repeats(rows, per_device, processes):
    """Rows that appear twice in one step's global batch when accelerate shards a plain batch sampler over
    ``processes`` (its ``BatchSamplerShard``, even batches as the Trainer prepares it), per step."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    shards = [list(BatchSamplerShard(BatchSampler(SequentialSampler(range(rows)), per_device, False), processes,
                                     rank, even_batches=True)) for rank in range(processes)]
    return [sum(len(batch) for batch in step) - len({row for batch in step for row in batch})
            for step in zip(*shards)]


def test_global_batch_check_refuses_exactly_where_accelerate_repeats_rows_in_a_batch():
    from llm2clip_hf.trainers.stages import check_global_batch

    assert in_batch_repeats(20, 16, 2) == [12]
    with pytest.raises(ValueError, match=r"20 rows, fewer than one global batch of 32 .* 12 repeated rows.*<= 10"):
        check_global_batch(20, 16, 2)
    for rows, per_device, processes in ((32, 16, 2), (40, 16, 2), (33, 4, 4)):
        assert max(in_batch_repeats(rows, per_device, processes)) == 0
        check_global_batch(rows, per_device, processes)  # no error
    check_global_batch(5, 16, 1)  # one process: accelerate does not shard, the batch is just smaller
    assert max(in_batch_repeats(31, 16, 2)) > 0
    with pytest.raises(ValueError):
        check_global_batch(31, 16, 2)


def test_the_trainer_refuses_fewer_rows_than_one_global_batch(tiny_llm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(LLM2CLIPTrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir),
                        args=arguments(tmp_path, "caption", per_device_train_batch_size=16, max_steps=1),
                        train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:20]))


def test_text_stages_checkpoint_activations_unless_told_not_to(tiny_llm_dir, tmp_path):
    assert arguments(tmp_path, "caption").activation_checkpointing is True
    assert arguments(tmp_path, "mntp").activation_checkpointing is True
    assert arguments(tmp_path, "clip").activation_checkpointing is False  # a tower trained whole: not the default
    assert arguments(tmp_path, "caption", activation_checkpointing=False).activation_checkpointing is False
    with pytest.warns(FutureWarning):  # transformers' deprecated alias still counts as the user's choice
        assert arguments(tmp_path, "caption", gradient_checkpointing=False).activation_checkpointing is False
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    trainer = LLM2CLIPTrainer(model=text_model, args=arguments(tmp_path, "caption", max_steps=1),
                              train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:8]))
    trainer.train()
    assert text_model.llm.is_activation_checkpointing


PIN_MEMORY_WARNING = "'pin_memory' argument is set as true but no accelerator is found"


def pin_memory_warnings(run):
    """The messages of torch's 'no accelerator' pin_memory warnings that ``run()`` emits."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if PIN_MEMORY_WARNING in str(w.message)]


def test_memory_is_pinned_by_default_only_where_an_accelerator_is_and_an_explicit_setting_is_kept(tiny_llm_dir,
                                                                                                 tmp_path):
    """Pinned memory only speeds up copies to an accelerator; on a CPU-only machine torch warns at every loader it
    is asked for. By default it follows the device (here without use_cpu, as the CLI runs on a CPU machine), so a
    training run with evaluation and the package's own loader warn nothing there; what the user set is kept."""
    from llm2clip_hf.data.loaders import training_data_loader

    present = torch.accelerator.is_available()
    args = arguments(tmp_path, "caption", use_cpu=False, max_steps=2, eval_strategy="steps", eval_steps=2)
    assert args.dataloader_pin_memory is present
    for explicit in (True, False):
        assert arguments(tmp_path, "caption", use_cpu=False,
                         dataloader_pin_memory=explicit).dataloader_pin_memory is explicit
    pairs = Dataset.from_list(tiny_caption_pair_rows()[:8])
    trainer = LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args, train_dataset=pairs,
                              eval_dataset=pairs)
    assert trainer.args.dataloader_pin_memory is present
    assert pin_memory_warnings(trainer.train) == []
    assert pin_memory_warnings(lambda: list(training_data_loader(list(range(4)), list, args, batch_size=2))) == []
    if not present:  # an explicit request is honoured, with torch's warning
        pinned = arguments(tmp_path, "caption", use_cpu=False, dataloader_pin_memory=True)
        assert pin_memory_warnings(lambda: list(training_data_loader(list(range(4)), list, pinned, batch_size=2)))
