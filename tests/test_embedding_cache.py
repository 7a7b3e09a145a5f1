"""The embedding cache: a sharded, resumable, data-parallel job whose result is tied to the data and to what the text
encoder computes, joined to the source rows without copying them."""

import copy
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.data import (
    ROW_HASH_COLUMN,
    build_embedding_cache,
    check_cache_rows,
    check_embedding_cache,
    embedding_column,
    embeddings_as_float32,
    join_embeddings,
    precompute_text_embeddings,
    read_cache_metadata,
    text_model_fingerprint,
)
from llm2clip_hf.data.embedding_cache import METADATA_KEY
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

CAPTIONS = ["short_caption", "long_caption"]


def pairs(count):
    return Dataset.from_list(tiny_caption_pair_rows()[:count])


def test_a_cache_folder_is_never_reused_for_other_data(text_model, tmp_path):
    folder = tmp_path / "cache"
    first = precompute_text_embeddings(pairs(10), text_model, CAPTIONS, output_dir=folder)
    assert len(first) == 10 and read_cache_metadata(first)["num_rows"] == 10
    with pytest.raises(ValueError, match=r"other data \(10 rows.*\(20 rows.*another folder.*delete"):
        precompute_text_embeddings(pairs(20), text_model, CAPTIONS, output_dir=folder)
    edited = pairs(10).map(lambda row, i: {"short_caption": row["short_caption"] + (" here" if i == 3 else "")},
                           with_indices=True)
    with pytest.raises(ValueError, match="other data"):  # same row count, one caption changed
        precompute_text_embeddings(edited, text_model, CAPTIONS, output_dir=folder)
    assert len(load_from_disk(str(folder))) == 10  # nothing was overwritten
    # The same captions in a new Dataset object (another in-memory fingerprint) reuse the cache.
    again = precompute_text_embeddings(pairs(10), text_model, CAPTIONS, output_dir=folder)
    assert again["short_caption_llm_embedding"] == first["short_caption_llm_embedding"]


@pytest.mark.slow
def test_stage1_encoder_in_memory_and_saved_have_one_fingerprint(tiny_llm_dir, tmp_path):
    """After stage 1 the user's model holds LoRA layers; its fingerprint is that of the merged, saved encoder."""
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    untrained = text_model_fingerprint(text_model)
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "out"), stage="caption", max_steps=2,
                                     per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=0, use_cpu=True,
                                     save_strategy="no", disable_tqdm=True, report_to="none")
    trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=pairs(16))
    trainer.train()
    trainer.save_model(str(tmp_path / "encoder"))
    assert any("lora_A" in key for key in text_model.state_dict())  # the in-memory model carries the adapter
    in_memory = text_model_fingerprint(text_model)
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path / "encoder")
    assert in_memory == text_model_fingerprint(reloaded)
    assert in_memory != untrained  # training changed what it computes


@pytest.mark.parametrize("change", [
    lambda config: config.rope_parameters.update(rope_theta=config.rope_parameters["rope_theta"] * 2),
    lambda config: setattr(config, "rms_norm_eps", config.rms_norm_eps * 10),
    lambda config: setattr(config, "hidden_act", "gelu"),
])
def test_fingerprint_covers_llm_settings_that_change_embeddings(text_model, change):
    other = copy.deepcopy(text_model)
    change(other.config.llm_config)
    assert text_model_fingerprint(other) != text_model_fingerprint(text_model)


def test_fingerprint_ignores_bookkeeping(text_model, tmp_path):
    text_model.save_pretrained(tmp_path / "saved")
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path / "saved")  # other name, architectures, auto_map, dtype
    assert text_model_fingerprint(reloaded) == text_model_fingerprint(text_model)


def shard_files(folder):
    return sorted(p.name for p in folder.glob("data-*.arrow"))


def test_cache_is_sharded_in_row_order_apart_from_the_source_and_equals_direct_encoding(text_model, tmp_path):
    rows = tiny_caption_pair_rows()[:10]
    data = Dataset.from_list([  # long_caption: a list of captions per row, of varying length
        {**r, "long_caption": [r["long_caption"]] + ([r["short_caption"] + " again"] if i % 3 == 0 else [])}
        for i, r in enumerate(rows)])
    folder = tmp_path / "cache"
    joined = precompute_text_embeddings(data, text_model, CAPTIONS, output_dir=folder, rows_per_shard=3,
                                        batch_size=2)
    assert shard_files(folder) == [f"data-{i:05d}-of-00004.arrow" for i in range(4)]
    cache = load_from_disk(str(folder))
    # no source columns: the embeddings and the hash of the captions of each row
    assert cache.column_names == ["short_caption_llm_embedding", "long_caption_llm_embedding", ROW_HASH_COLUMN]
    assert len(cache) == 10 and joined.column_names == data.column_names + cache.column_names
    short = torch.tensor(cache["short_caption_llm_embedding"])
    torch.testing.assert_close(short, text_model.encode(data["short_caption"]), atol=1e-5, rtol=1e-5)
    for row in range(10):
        expected = text_model.encode(data[row]["long_caption"])
        torch.testing.assert_close(torch.tensor(cache[row]["long_caption_llm_embedding"]), expected,
                                   atol=1e-5, rtol=1e-5)
    assert not (folder / ".locks").exists() and not list(folder.glob(".*partial*"))


@pytest.mark.parametrize("storage_dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_storage_dtypes_hold_the_rounded_embeddings(text_model, tmp_path, storage_dtype, torch_dtype):
    data = pairs(6)
    cache = build_embedding_cache(data, text_model, CAPTIONS, tmp_path / "cache", storage_dtype=storage_dtype)
    stored = cache.with_format("numpy")[:]["short_caption_llm_embedding"]
    decoded = torch.from_numpy(embeddings_as_float32(stored))
    expected = text_model.encode(data["short_caption"]).to(torch_dtype).float()
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded.to(torch_dtype).float(), decoded)  # values of the storage type
    # within one unit in the last place (batches differ in padding, so a value may round to the neighbour)
    ulp = torch.finfo(torch_dtype).eps
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=ulp)
    assert read_cache_metadata(cache)["storage_dtype"] == storage_dtype
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        build_embedding_cache(data, text_model, CAPTIONS, tmp_path / "other", storage_dtype="int8")


SLOW_WRITER = """
import sys, time
from datasets import Dataset
from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.data import build_embedding_cache
model = LLM2CLIPTextModel.from_llm(sys.argv[1])
original = model.embed_items
def slow(items, *args, **kwargs):
    print("SHARD", flush=True)
    time.sleep(float(sys.argv[3]))
    return original(items, *args, **kwargs)
model.embed_items = slow
data = Dataset.from_list(tiny_caption_pair_rows()[:12])
out = build_embedding_cache(data, model, ["short_caption", "long_caption"], __import__("pathlib").Path(sys.argv[2]),
                            rows_per_shard=2)
print("ROWS", len(out), flush=True)
"""


def run_writer(script, llm_dir, folder, delay):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(llm_dir), str(folder), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_killed_job_keeps_its_shards_and_a_rerun_computes_only_the_missing_ones(tiny_llm_dir, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER)
    folder = tmp_path / "cache"
    first = run_writer(script, tiny_llm_dir, folder, 0.7)
    deadline = time.time() + 120
    while len(shard_files(folder)) < 2:
        assert time.time() < deadline and first.poll() is None, first.stderr.read()[-2000:] if first.poll() else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = shard_files(folder)
    assert 2 <= len(kept) < 6 and not (folder / "state.json").exists()
    with pytest.raises(FileNotFoundError):  # an unfinished folder is not a dataset
        load_from_disk(str(folder))
    second = run_writer(script, tiny_llm_dir, folder, 0.0)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-2000:]
    assert out.count("SHARD") == 6 - len(kept) and "ROWS 12" in out
    resumed = load_from_disk(str(folder))
    fresh = build_embedding_cache(pairs(12), LLM2CLIPTextModel.from_llm(tiny_llm_dir), CAPTIONS, tmp_path / "fresh",
                                  rows_per_shard=2)
    for column in resumed.column_names:
        torch.testing.assert_close(torch.tensor(resumed[column]), torch.tensor(fresh[column]), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_processes_sharing_a_folder_split_the_shards_between_them(tiny_llm_dir, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER)
    procs = [run_writer(script, tiny_llm_dir, tmp_path / "cache", 0.5) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    counts = [o[0].count("SHARD") for o in outputs]
    assert sum(counts) == 6 and min(counts) >= 1, counts  # each shard embedded once, by one of them
    assert all("ROWS 12" in o[0] for o in outputs)
    cached = load_from_disk(str(tmp_path / "cache"))
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    torch.testing.assert_close(torch.tensor(cached["long_caption_llm_embedding"]),
                               model.encode(pairs(12)["long_caption"]), atol=1e-5, rtol=1e-5)


def test_an_unfinished_cache_of_another_text_model_or_data_is_refused(text_model, tiny_llm_nobos_dir, tmp_path):
    folder = tmp_path / "cache"
    build_embedding_cache(pairs(6), text_model, CAPTIONS, folder, rows_per_shard=2)
    (folder / "state.json").unlink()  # as if killed before the end
    (folder / "data-00001-of-00003.arrow").unlink()
    other = LLM2CLIPTextModel.from_llm(tiny_llm_nobos_dir)
    with pytest.raises(ValueError, match="unfinished embedding cache of a different text model"):
        build_embedding_cache(pairs(6), other, CAPTIONS, folder, rows_per_shard=2)
    with pytest.raises(ValueError, match="other data"):
        build_embedding_cache(pairs(8), text_model, CAPTIONS, folder, rows_per_shard=2)
    assert shard_files(folder) == ["data-00000-of-00003.arrow", "data-00002-of-00003.arrow"]  # nothing lost
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an LLM2CLIP embedding cache"):
        build_embedding_cache(pairs(6), text_model, CAPTIONS, tmp_path / "stranger")
    assert len(build_embedding_cache(pairs(6), text_model, CAPTIONS, folder)) == 6  # resumes with its own shard size


def test_a_bad_caption_is_named_before_any_shard_is_written(text_model, tmp_path):
    rows = tiny_caption_pair_rows()[:6]
    rows[4]["long_caption"] = "  "
    with pytest.raises(ValueError, match=r"Row 4, column 'long_caption'"):
        build_embedding_cache(Dataset.from_list(rows), text_model, CAPTIONS, tmp_path / "cache", rows_per_shard=2)
    assert not shard_files(tmp_path / "cache") if (tmp_path / "cache").exists() else True


# ------------------------------------------------------------------------------------------------ row alignment
def with_caption_lists(data):
    """``data`` with long_caption a list of one or two captions per row (cells of several captions)."""
    return data.map(lambda row, i: {"long_caption": [row["long_caption"]] + ([row["short_caption"]] * (i % 2))},
                    with_indices=True)


def test_join_refuses_a_reordered_or_different_dataset_of_the_same_length(text_model, tmp_path):
    source = with_caption_lists(pairs(10))
    cache = build_embedding_cache(source, text_model, CAPTIONS, tmp_path / "cache")
    assert read_cache_metadata(cache)["row_hash_column"] == ROW_HASH_COLUMN
    joined = join_embeddings(source, cache)
    assert ROW_HASH_COLUMN in joined.column_names  # travels with the embeddings for later checks
    with pytest.raises(ValueError, match=r"Rows \[\d+(, \d+)*\] of the dataset carry cached embeddings of other "
                                         r"captions.*exact rows it was made from, in the same order.*rebuild"):
        join_embeddings(source.shuffle(seed=0), cache)
    other = with_caption_lists(Dataset.from_list(tiny_caption_pair_rows()[10:20]))
    with pytest.raises(ValueError, match=r"Rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]"):
        join_embeddings(other, cache)


def test_a_hand_made_misaligned_join_is_refused_naming_its_rows(text_model, tmp_path):
    source = pairs(12)
    cache = build_embedding_cache(source, text_model, CAPTIONS, tmp_path / "cache")
    shuffled = source.shuffle(seed=1)
    by_hand = concatenate_datasets([shuffled, cache], axis=1)
    moved = [i for i in range(12) if shuffled[i]["short_caption"] != source[i]["short_caption"]]
    assert moved and read_cache_metadata(by_hand) is not None
    with pytest.raises(ValueError, match=re.escape(f"Rows {moved[:10]} of the dataset")):
        check_cache_rows(by_hand, batch_size=5)  # found across batches
    embeddings_only = concatenate_datasets([shuffled, cache.select_columns([embedding_column(c) for c in CAPTIONS])],
                                           axis=1)
    with pytest.raises(ValueError, match=re.escape(f"needs the column(s) ['{ROW_HASH_COLUMN}']")):
        check_cache_rows(embeddings_only)


def test_reordered_and_subset_rows_of_a_joined_dataset_stay_aligned(text_model, tmp_path):
    source = with_caption_lists(pairs(16))
    joined = join_embeddings(source, build_embedding_cache(source, text_model, CAPTIONS, tmp_path / "cache"))
    split = joined.train_test_split(test_size=0.25, seed=0)
    for part in [joined.select([7, 2, 5, 11]), joined.shuffle(seed=3), split["train"], split["test"],
                 joined.filter(lambda caption: "circle" in caption, input_columns="short_caption")]:
        check_cache_rows(part, batch_size=3)  # the rows moved together, the hashes with the embeddings


def test_a_cache_without_row_hashes_is_checked_by_data_fingerprint(text_model, tmp_path, caplog):
    source = pairs(10)
    cache = build_embedding_cache(source, text_model, CAPTIONS, tmp_path / "cache")
    metadata = read_cache_metadata(cache)
    del metadata["row_hash_column"]  # the format of earlier versions
    old = cache.remove_columns(ROW_HASH_COLUMN)
    old.info.description = json.dumps({METADATA_KEY: metadata})
    joined = join_embeddings(source, old)
    assert ROW_HASH_COLUMN not in joined.column_names
    with pytest.raises(ValueError, match="not, row by row, those the embedding cache was made from"):
        join_embeddings(source.shuffle(seed=0), old)
    with pytest.raises(ValueError, match="not, row by row"):
        join_embeddings(Dataset.from_list(tiny_caption_pair_rows()[10:20]), old)
    with caplog.at_level(logging.WARNING, logger="llm2clip_hf.data.embedding_cache"):
        check_cache_rows(joined.select(range(4)))  # a subset: cannot be verified, only warned about
    assert "4 rows, not the cache's 10" in caplog.text and "cannot be verified" in caplog.text


def folder_state(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_finished_cache_refuses_another_storage_dtype_and_stays_as_it_is(text_model, tmp_path):
    folder = tmp_path / "cache"
    build_embedding_cache(pairs(6), text_model, CAPTIONS, folder)
    before = folder_state(folder)
    with pytest.raises(ValueError, match=r"stored as float32, not the float16 asked for\. Nothing was changed: use "
                                         r"storage_dtype='float32'.*another folder"):
        build_embedding_cache(pairs(6), text_model, CAPTIONS, folder, storage_dtype="float16")
    assert folder_state(folder) == before


def test_refusing_a_text_model_of_another_weight_dtype_names_both_dtypes(text_model, tmp_path):
    folder = tmp_path / "cache"
    cache = build_embedding_cache(pairs(6), text_model, CAPTIONS, folder, rows_per_shard=2)
    assert read_cache_metadata(cache)["text_model_dtype"] == "float32"
    bf16 = copy.deepcopy(text_model).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 weights\) than the one expected here \(.*bfloat16 weights\)\. "
                                         r"The weight dtypes differ.*--dtype float32"):
        build_embedding_cache(pairs(6), bf16, CAPTIONS, folder)
    with pytest.raises(ValueError, match=r"The weights or their dtype \(a bfloat16 LLM"):  # other side unknown
        check_embedding_cache(cache, CAPTIONS, expected_fingerprint=text_model_fingerprint(bf16))
    (folder / "state.json").unlink()  # unfinished: the same refusal
    with pytest.raises(ValueError, match=r"unfinished embedding cache of a different text model.*The weight dtypes "
                                         r"differ: the cache was made with float32 weights, this model's are bfloat16"):
        build_embedding_cache(pairs(6), bf16, CAPTIONS, folder, rows_per_shard=2)
