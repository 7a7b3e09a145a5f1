"""Stage 1 on named sources (captions + text pairs): every batch, and every step's global batch, from one source;
sources drawn by weight; a pair source's instruction excluded from pooling like the caption instructions."""

import json
import math
from collections import Counter

import pytest
from llm2clip_hf.trainers.training_args import OFFICIAL_LONG_QUERY_INSTRUCTION, OFFICIAL_SHORT_QUERY_INSTRUCTION
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset, DatasetDict

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.cli import main
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.data import SourceBatchSampler, text_pair_source
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

PAIR_INSTRUCTION = "Given a question, retrieve the passage that answers it"


def question_rows(n=24):
    """Text pairs in the columns a user might have (question, answer, a wrong answer as hard negative)."""
    return [{"question": f"which shape has number {i}", "answer": f"a drawing of shape {i} painted red",
             "wrong": f"a drawing of shape {i + 1} painted blue"} for i in range(n)]


def sources(negatives=True):
    pairs = text_pair_source(Dataset.from_list(question_rows()), PAIR_INSTRUCTION, "question", "answer",
                             "wrong" if negatives else None)
    if not negatives:
        pairs = pairs.remove_columns("wrong")
    return DatasetDict(captions=Dataset.from_list(tiny_caption_pair_rows()), pairs=pairs)


def args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), stage="caption", per_device_train_batch_size=4, max_steps=2,
                    learning_rate=1e-3, warmup_steps=0, logging_steps=1, save_strategy="no", use_cpu=True,
                    disable_tqdm=True, report_to="none", seed=0)
    settings.update(overrides)
    return LLM2CLIPTrainingArguments(**settings)


def source_of(batch, sizes):
    """The index of the source (of the concatenation of ``sizes``) that every row of ``batch`` is in."""
    bounds = torch.tensor(sizes).cumsum(0)
    owners = {int(torch.searchsorted(bounds, row, right=True)) for _, row in batch}
    assert len(owners) == 1, (batch, owners)
    return owners.pop()


# ------------------------------------------------------------------------------------------------ the sampler
def test_every_batch_holds_rows_of_one_source_and_each_full_batch_once_per_epoch():
    sizes = {"a": 37, "b": 100, "c": 21}
    sampler = SourceBatchSampler(sizes, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9 + 25 + 5  # the last incomplete batch of each source is dropped
    assert Counter(source_of(b, list(sizes.values())) for b in batches) == {0: 9, 1: 25, 2: 5}
    rows = [row for batch in batches for _, row in batch]
    assert len(set(rows)) == len(rows) and all(epoch == 0 for batch in batches for epoch, _ in batch)
    assert [source_of(b, list(sizes.values())) for b in batches[:10]] != [1] * 10  # sources interleave


def test_sources_are_drawn_with_the_mixing_weights():
    sampler = SourceBatchSampler({"a": 1000, "b": 1000}, batch_size=4, seed=3, weights=[0.8, 0.2])
    draws = [source_of(batch, [1000, 1000]) for batch in sampler]
    assert len(draws) == 500 and abs(draws.count(0) / 500 - 0.8) < 0.02
    assert 0.6 < draws[:100].count(0) / 100 < 0.95  # shuffled, not one source after the other
    # A source drawn more often than it has batches reads all its rows, then starts a new pass in a new order.
    sampler = SourceBatchSampler({"a": 40, "b": 400}, batch_size=4, seed=0, weights=[0.9, 0.1])
    small = [[row for _, row in batch] for batch in sampler if batch[0][1] < 40]
    assert len(small) == 99
    first, second = sum(small[:10], []), sum(small[10:20], [])
    assert sorted(first) == sorted(second) == list(range(40)) and first != second


def test_batches_depend_only_on_seed_and_epoch():
    def batches(seed, epoch):
        sampler = SourceBatchSampler({"a": 50, "b": 30}, batch_size=4, seed=seed, weights=[1, 3])
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 2) == batches(0, 2)
    assert batches(0, 2) != batches(0, 3) and batches(0, 2) != batches(1, 2)
    assert {epoch for batch in batches(0, 2) for epoch, _ in batch} == {2}


def test_each_step_global_batch_is_one_source_under_two_process_sharding():
    sizes = [30, 50]
    sampler = SourceBatchSampler({"a": sizes[0], "b": sizes[1]}, batch_size=4, seed=0, group_size=2)
    # accelerate's default sharding: process i takes batch i of every 2 consecutive batches
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=i) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(sampler) // 2 == 3 + 6  # full global batches of 8 rows
    for first, second in zip(*shards):
        assert source_of(first, sizes) == source_of(second, sizes)
        assert not {row for _, row in first} & {row for _, row in second}


def test_bad_weights_and_small_sources_raise():
    sizes = {"captions": 40, "pairs": 40}
    with pytest.raises(ValueError, match=r"3 weights for the 2 sources \['captions', 'pairs'\]"):
        SourceBatchSampler(sizes, 4, 0, weights=[1, 1, 1])
    for weights in ([1, -1], [0, 0]):
        with pytest.raises(ValueError, match="non-negative and not all zero"):
            SourceBatchSampler(sizes, 4, 0, weights=weights)
    with pytest.raises(ValueError, match=r"\{'pairs': 40\} have fewer rows than one batch of 48"):
        SourceBatchSampler({"captions": 100, "pairs": 40}, 12, 0, group_size=4)


# ------------------------------------------------------------------------------------------------ the trainer
def test_mismatched_negatives_and_misplaced_weights_raise(tiny_llm_dir, tmp_path):
    def trainer(data, **overrides):
        return LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args(tmp_path, **overrides),
                               train_dataset=data)

    with pytest.raises(ValueError, match=r"\['captions'\] have hard negatives but \['pairs'\] have none.*"
                                         r"hard_negatives=False"):
        trainer(sources(negatives=False))
    assert "negative" not in trainer(sources(), hard_negatives=False).train_dataset.column_names
    with pytest.raises(ValueError, match="source_mixing_weights weighs the named sources"):
        trainer(Dataset.from_list(tiny_caption_pair_rows()), source_mixing_weights=[1.0])
    with pytest.raises(ValueError, match="3 weights for the 2 sources"):
        trainer(sources(), source_mixing_weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("source", ["captions", "pairs"])
def test_pair_instruction_is_excluded_from_pooling_like_the_caption_instruction(text_model, tmp_path, source):
    """Collated queries of either source embed as the model's own tokenization with the row's instruction: the
    instruction is in the input but not pooled. (LoRA starts at zero: the base model.)"""
    training = args(tmp_path, hard_negatives=False, short_query_instruction=OFFICIAL_SHORT_QUERY_INSTRUCTION,
                    long_query_instruction=OFFICIAL_LONG_QUERY_INSTRUCTION)  # small LLMs default to none
    trainer = LLM2CLIPTrainer(model=text_model, args=training, train_dataset=sources(negatives=False))
    first = 0 if source == "captions" else 32
    rows = [trainer.train_dataset[i] for i in range(first, first + 6)]
    instructions = [row["query_instruction"] for row in rows]
    expected = {training.short_query_instruction, training.long_query_instruction} if source == "captions" \
        else {PAIR_INSTRUCTION}
    assert set(instructions) <= expected
    batch = trainer.data_collator(rows)
    queries = {key: value[:6] for key, value in batch["texts"].items()}
    texts = [row["query"] for row in rows]
    bare = [item.num_pooled for item in text_model.tokenize_items(texts)]
    assert queries["pooling_mask"].sum(1).tolist() == bare
    assert (queries["attention_mask"].sum(1) > queries["pooling_mask"].sum(1) + 3).all()  # instruction tokens
    with torch.no_grad():
        collated = trainer.model(**queries).text_embeds
        own = text_model(**text_model.tokenize(texts, instructions, training.instruction_separator)).text_embeds
    torch.testing.assert_close(collated, own, rtol=1e-4, atol=1e-5)


class Recording:
    """A collator that records the query instructions of every batch before collating it."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, rows):
        self.batches.append({row["query_instruction"] for row in rows})
        return self.collator(rows)


def test_training_on_captions_and_pairs_keeps_batches_to_one_source(text_model, tmp_path):
    data = sources()
    evaluation = {name: dataset.select(range(4)) for name, dataset in data.items()}
    training = args(tmp_path, per_device_eval_batch_size=4)
    trainer = LLM2CLIPTrainer(model=text_model, args=training, train_dataset=data, eval_dataset=evaluation)
    trainer.data_collator = recording = Recording(trainer.data_collator)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses + [result.training_loss])
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"eval_captions_loss", "eval_captions_cra", "eval_pairs_loss"} <= logged  # sources evaluated apart
    recording.batches.clear()
    for _ in trainer.get_train_dataloader():  # one whole epoch
        pass
    caption_instructions = {trainer.args.short_query_instruction, trainer.args.long_query_instruction}
    kinds = ["captions" if batch <= caption_instructions else "pairs" if batch == {PAIR_INSTRUCTION} else batch
             for batch in recording.batches]
    assert Counter(kinds) == {"captions": 32 // 4, "pairs": 24 // 4}, kinds


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture()
def data_files(tmp_path):
    for name, rows in (("captions.jsonl", tiny_caption_pair_rows()), ("questions.jsonl", question_rows())):
        with open(tmp_path / name, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return tmp_path


def test_cli_trains_stage1_on_captions_and_a_pair_dataset(capsys, data_files, tiny_llm_dir, tmp_path):
    common = ["train", "--stage", "caption", "--text-model", str(tiny_llm_dir), "--dataset",
              str(data_files / "captions.jsonl"), "--pair-dataset", str(data_files / "questions.jsonl"),
              "--pair-columns", "question", "answer", "wrong", "--output-dir", str(tmp_path / "s1")]
    assert main([*common, "--pair-instruction", "one", "two"]) == 1
    assert "--pair-instruction takes one instruction per --pair-dataset (1), got 2" in capsys.readouterr().err
    code = main([*common, "--pair-instruction", PAIR_INSTRUCTION, "--source-mixing-weights", "0.5", "0.5",
                 "--max-steps", "2", "--per-device-train-batch-size", "4", "--use-cpu", "--save-strategy", "no",
                 "--disable-tqdm", "true", "--report-to", "none"])
    assert code == 0
    metrics = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert metrics["stage"] == "caption" and math.isfinite(metrics["train_loss"])
    assert (tmp_path / "s1" / "model.safetensors").is_file()
