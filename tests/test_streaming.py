"""Stage 2 on streams (datasets.IterableDataset from parquet / webdataset shards): the key join with the embedding
cache, training, epochs in DataLoader workers, splitting between processes (in-process and a real 2-process run),
and what a resumed run reads."""

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import TrainerCallback

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.data import (
    ROW_INDEX,
    KeyIndex,
    build_embedding_cache,
    embedding_column,
    join_embeddings,
    join_stream_embeddings,
    key_hashes,
    read_cache_metadata,
    training_stream,
    with_key_row_index,
)
from llm2clip_hf.testing import tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from launching import accelerate_launch  # noqa: E402

CAPTIONS = ["short_caption", "long_caption"]
KEYS = [f"s{i:04d}" for i in range(32)]  # the 32 rows of tiny_image_caption_rows, 8 per shard
WORKER = Path(__file__).with_name("streaming_worker.py")


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(autouse=True)
def short_reader_shutdown(monkeypatch):
    """datasets sleeps 5 s whenever it closes the interleaved readers of parquet shards (shuffled streams, an Arrow
    workaround): once per epoch in training, most of this module's time. 0.1 s is enough here."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)


@pytest.fixture(scope="module")
def module_text_model(tiny_llm_dir):
    return LLM2CLIPTextModel.from_llm(tiny_llm_dir)


@pytest.fixture(scope="module")
def source():
    """The map-style rows, with their keys."""
    return Dataset.from_list(tiny_image_caption_rows()).add_column("key", KEYS)


@pytest.fixture(scope="module")
def embeddings(source, module_text_model, tmp_path_factory):
    """The embedding cache as build_embedding_cache writes it: one row per source row, in source order."""
    return build_embedding_cache(source, module_text_model, CAPTIONS, tmp_path_factory.mktemp("cache") / "cache")


@pytest.fixture(scope="module")
def cache(embeddings):
    """The cache with a key column, its rows shuffled: a join by position would pair the wrong rows."""
    return embeddings.add_column("key", KEYS).shuffle(seed=1).flatten_indices()


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    """The rows in 4 parquet shards (image, captions, key) and in 4 webdataset shards (png + json, __key__)."""
    root = tmp_path_factory.mktemp("shards")
    (root / "parquet").mkdir()
    (root / "webdataset").mkdir()
    for shard in range(4):
        part = source.shard(4, shard, contiguous=True)
        part.to_parquet(str(root / "parquet" / f"train-{shard:05d}.parquet"))
        with tarfile.open(root / "webdataset" / f"train-{shard:05d}.tar", "w") as tar:
            for row in part:
                image = io.BytesIO()
                row["image"].save(image, format="PNG")
                captions = json.dumps({c: row[c] for c in CAPTIONS}).encode()
                for name, data in ((f"{row['key']}.png", image.getvalue()), (f"{row['key']}.json", captions)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def stream_of(shards: Path, kind: str):
    files = str(shards / kind / ("*.parquet" if kind == "parquet" else "*.tar"))
    return load_dataset(kind, data_files=files, split="train", streaming=True)


def joined_parquet(shards, cache):
    return join_stream_embeddings(stream_of(shards, "parquet"), cache, key_column="key")


class RecordingTrainer(LLM2CLIPTrainer):
    """Keeps the rows (``ROW_INDEX``) and loss of every training step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[list[int]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.rows.append(inputs[ROW_INDEX].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def stage2_trainer(text_model, data, tmp_path, embed_text_model=False, **overrides) -> RecordingTrainer:
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=embed_text_model,
                                          projection_dim=32)
    settings = dict(output_dir=str(tmp_path / "out"), stage="clip", per_device_train_batch_size=8, max_steps=3,
                    logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, report_to="none", seed=0)
    settings.update(overrides)
    return RecordingTrainer(model=model, args=LLM2CLIPTrainingArguments(**settings), train_dataset=data,
                            text_model=None if embed_text_model else text_model)


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def epoch_rows(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(row) for batch in loader for row in batch[ROW_INDEX]]


ALL_ROWS = sorted(key_hashes(KEYS).tolist())


# ------------------------------------------------------------------------------------------------ the key join
def test_key_join_attaches_each_streamed_row_its_own_cached_embeddings(shards, cache, embeddings, source):
    mapped = join_embeddings(source, embeddings)  # the map-style rows, joined by position
    joined = join_stream_embeddings(stream_of(shards, "webdataset"), cache, cache_key_column="key")
    seen = []
    for row in joined:
        key = row["__key__"]
        expected = mapped[KEYS.index(key)]
        for column in CAPTIONS:
            np.testing.assert_array_equal(row[embedding_column(column)], expected[embedding_column(column)])
        assert row[ROW_INDEX] == key_hashes([key])[0] >= 0
        seen.append(key)
    assert sorted(seen) == KEYS
    assert read_cache_metadata(joined) == read_cache_metadata(embeddings)


def test_a_streamed_row_without_cached_embedding_stops_naming_its_key(shards, cache):
    partial_cache = cache.filter(lambda key: key != "s0013", input_columns="key")
    joined = join_stream_embeddings(stream_of(shards, "webdataset"), partial_cache, cache_key_column="key")
    with pytest.raises(ValueError, match="No cached embedding for the streamed row with __key__='s0013'"):
        list(joined)


def test_key_index_finds_rows_and_refuses_duplicate_keys():
    index = KeyIndex(Dataset.from_dict({"key": ["a", "b", "c"]}), "key")
    assert index.find(key_hashes(["c", "x", "a", "b"])).tolist() == [2, -1, 0, 1]
    with pytest.raises(ValueError, match="has the key 'b' twice"):
        KeyIndex(Dataset.from_dict({"key": ["a", "b", "c", "b"]}), "key")


def test_streamed_rows_need_a_key_and_known_columns(shards, module_text_model, tmp_path):
    stream = stream_of(shards, "parquet")  # its key column is "key", not webdataset's "__key__"
    with pytest.raises(ValueError, match="no '__key__' column"):
        stage2_trainer(module_text_model, stream, tmp_path)
    with pytest.raises(ValueError, match="columns are unknown"):
        with_key_row_index(stream.map(lambda row: row), "key")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind, key_column, image_column", [("parquet", "key", "image"),
                                                            ("webdataset", "__key__", "png")])
def test_stage2_trains_on_a_stream_of_shards(kind, key_column, image_column, shards, cache, module_text_model,
                                             tmp_path):
    joined = join_stream_embeddings(stream_of(shards, kind), cache, key_column=key_column, cache_key_column="key")
    trainer = stage2_trainer(module_text_model, joined, tmp_path, max_steps=6, image_column=image_column)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses), losses
    epoch_0 = sorted(row for step in trainer.rows[:4] for row in step)  # 4 batches of 8 rows: one pass
    assert epoch_0 == ALL_ROWS and set(trainer.rows[4]) <= set(ALL_ROWS)


def test_accumulation_over_a_stream_on_several_processes_is_refused(shards, cache, module_text_model, tmp_path,
                                                                    monkeypatch):
    stage2_trainer(module_text_model, joined_parquet(shards, cache), tmp_path, gradient_accumulation_steps=2)
    monkeypatch.setattr(LLM2CLIPTrainingArguments, "world_size", property(lambda self: 2))
    stage2_trainer(module_text_model, joined_parquet(shards, cache), tmp_path)  # accumulation 1: allowed
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 over a stream on 2 processes.*"
                                         "gradcache_chunk_size"):
        stage2_trainer(module_text_model, joined_parquet(shards, cache), tmp_path, gradient_accumulation_steps=2)


def test_a_stream_needs_max_steps(shards, cache, module_text_model, tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        stage2_trainer(module_text_model, joined_parquet(shards, cache), tmp_path, max_steps=-1)


def test_the_llm_in_the_loop_reads_streamed_captions_without_the_bad_rows(source, module_text_model, tmp_path):
    bad = source.map(lambda row, i: {"short_caption": "" if i == 5 else row["short_caption"]}, with_indices=True)
    bad.to_parquet(str(tmp_path / "train.parquet"))
    stream = with_key_row_index(load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train",
                                             streaming=True), "key")
    trainer = stage2_trainer(module_text_model, stream, tmp_path, embed_text_model=True, text_source="frozen",
                             max_steps=2)
    assert sorted(epoch_rows(trainer.get_train_dataloader(), 0)) == sorted(key_hashes(KEYS[:5] + KEYS[6:]).tolist())
    trainer.train()
    assert all(math.isfinite(loss) for loss in logged_losses(trainer))
    strict = stage2_trainer(module_text_model, stream, tmp_path, embed_text_model=True, text_source="frozen",
                            skip_bad_rows=False)
    with pytest.raises(ValueError, match="short_caption.*not a non-empty string"):
        epoch_rows(strict.get_train_dataloader(), 0)


def test_the_shuffle_buffer_size_is_a_setting(source, module_text_model, tmp_path):
    """One shard: a 1-row buffer keeps the file's order, the default 1000-row buffer does not."""
    source.to_parquet(str(tmp_path / "train.parquet"))
    stream = with_key_row_index(load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train",
                                             streaming=True), "key")
    file_order = key_hashes(KEYS).tolist()
    orders = {size: epoch_rows(stage2_trainer(module_text_model, stream, tmp_path, embed_text_model=True,
                                              text_source="frozen", stream_shuffle_buffer_size=size,
                                              dataloader_drop_last=False).get_train_dataloader(), 0)
              for size in (1, 1000)}
    assert orders[1] == file_order
    assert sorted(orders[1000]) == sorted(file_order) and orders[1000] != file_order


# ------------------------------------------------------------------------------------------------ epochs, workers
def test_rows_carry_the_epoch_into_persistent_dataloader_workers(shards):
    stream = training_stream(stream_of(shards, "parquet").select_columns(["key"]), seed=0, rank=0, world_size=1,
                             epoch_column="epoch")
    loader = torch.utils.data.DataLoader(stream, batch_size=5, num_workers=2, persistent_workers=True,
                                         collate_fn=list)
    orders = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        rows = [row for batch in loader for row in batch]
        assert sorted(row["key"] for row in rows) == KEYS and {row["epoch"] for row in rows} == {epoch}
        orders.append([row["key"] for row in rows])
    assert len({tuple(order) for order in orders}) == 3  # reshuffled each epoch


def test_two_dataloader_workers_read_every_row_once_per_epoch(shards, cache, module_text_model, tmp_path):
    """... and each row's crop is drawn from (seed, epoch, row): new in the next epoch, the same when an epoch is
    read again."""
    trainer = stage2_trainer(module_text_model, joined_parquet(shards, cache), tmp_path, dataloader_num_workers=2,
                             dataloader_persistent_workers=True, image_augmentation=True)
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        batches = list(loader)
        rows = [int(row) for batch in batches for row in batch[ROW_INDEX]]
        epochs.append((rows, dict(zip(rows, (pixels for batch in batches for pixels in batch["pixel_values"])))))
    (first, first_crops), (second, second_crops), (again, again_crops) = epochs
    assert sorted(first) == sorted(second) == ALL_ROWS and first != second and again == first
    assert all(torch.equal(first_crops[row], again_crops[row]) for row in first)
    # (boxes of 90-100% of a 40-pixel image: now and then two draws coincide)
    assert sum(torch.equal(first_crops[row], second_crops[row]) for row in first) <= 2


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.parametrize("num_shards", [4, 3])
def test_each_process_reads_its_own_part_of_every_epoch(num_shards, source, tmp_path):
    """4 shards: each of 2 processes reads 2 whole shards (a new assignment each epoch); 3 shards: each reads all
    and keeps every other row. Either way the parts are disjoint and cover the data."""
    shard_of = {}
    for shard in range(num_shards):
        part = source.select_columns(["key"]).shard(num_shards, shard, contiguous=True)
        part.to_parquet(str(tmp_path / f"train-{shard:05d}.parquet"))
        shard_of.update({key: shard for key in part["key"]})
    stream = load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train", streaming=True)
    for epoch in range(2):
        parts = []
        for rank in range(2):
            part = training_stream(stream, seed=0, rank=rank, world_size=2, epoch_column="epoch")
            part.set_epoch(epoch)
            parts.append([row["key"] for row in part])
        assert sorted(parts[0] + parts[1]) == KEYS
        read = [{shard_of[key] for key in part} for part in parts]
        assert (read[0].isdisjoint(read[1]) and len(read[0]) == 2) if num_shards == 4 else read[0] == read[1]


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_covering_the_data_each_epoch(shards, cache, tiny_llm_dir, tmp_path):
    cache.save_to_disk(str(tmp_path / "cache"))
    accelerate_launch([WORKER, tiny_llm_dir, shards / "parquet", tmp_path / "cache", tmp_path])
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    shard_of = dict(zip(key_hashes(KEYS).tolist(), [i // 8 for i in range(len(KEYS))]))
    for epoch in range(2):
        first, second = (ranks[rank]["epochs"][epoch] for rank in range(2))
        assert len(first) == len(second) == 16 and sorted(first + second) == ALL_ROWS
        assert {shard_of[row] for row in first}.isdisjoint(shard_of[row] for row in second)
    assert all(rank["finite"] and len(rank["losses"]) == 3 for rank in ranks)


# ------------------------------------------------------------------------------------------------ resuming
class StopAfter(TrainerCallback):
    """Stops training after ``steps`` optimizer steps (an interrupted run)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps


@pytest.mark.slow
def test_a_resumed_stream_run_rereads_and_skips_the_trained_batches(shards, cache, module_text_model, tmp_path):
    """Resuming re-reads the stream from the start of its first (seeded) pass and skips as many batches as steps
    were trained: within that pass, the rest of the run sees what the uninterrupted run saw. From a checkpoint in
    a later pass the skipping runs past the end of the first pass, and the resumed run starts the second pass over.
    With ignore_data_skip it starts the stream over. (4 batches a pass.)"""
    joined = joined_parquet(shards, cache)
    full = stage2_trainer(module_text_model, joined, tmp_path / "full", max_steps=10)
    full.train()
    interrupted = stage2_trainer(module_text_model, joined, tmp_path / "cut", max_steps=10, save_strategy="steps",
                                 save_steps=2)
    interrupted.add_callback(StopAfter(6))
    interrupted.train()
    assert interrupted.rows == full.rows[:6]

    def resume(step: int, **overrides) -> RecordingTrainer:
        trainer = stage2_trainer(module_text_model, joined, tmp_path / "cut", max_steps=10, **overrides)
        trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / f"checkpoint-{step}"))
        return trainer

    in_first_pass = resume(2)
    assert in_first_pass.rows == full.rows[2:]
    assert logged_losses(in_first_pass) == pytest.approx(logged_losses(full), rel=1e-5)  # history: checkpoint's
    assert resume(6).rows == full.rows[4:8]
    assert resume(2, ignore_data_skip=True).rows == full.rows[:8]
