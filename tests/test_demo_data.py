"""The shipped emoji image–caption dataset: layout, image sanity, captions, splits and label truthfulness."""

from __future__ import annotations

import json
import re
import unicodedata

import datasets
import numpy as np
import pytest

from llm2clip_hf.demo.emoji_dataset import EMOJI_SPLITS, emoji_dataset_dir, load_emoji_dataset

VS16 = "\ufe0f"


@pytest.fixture(scope="module")
def splits() -> datasets.DatasetDict:
    return load_emoji_dataset()


@pytest.fixture(scope="module")
def all_rows() -> datasets.Dataset:
    """Every row, as ``imagefolder`` itself loads them (one "train" split)."""
    return datasets.load_dataset("imagefolder", data_dir=str(emoji_dataset_dir()), split="train")


@pytest.fixture(scope="module")
def metadata() -> list[dict]:
    lines = (emoji_dataset_dir() / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_layout_and_row_count(all_rows, metadata):
    directory = emoji_dataset_dir()
    assert (directory / "ATTRIBUTION.md").is_file()
    assert len(all_rows) == len(metadata) > 500
    assert sorted(p.name for p in (directory / "images").iterdir()) == sorted(
        row["file_name"].split("/", 1)[1] for row in metadata
    )
    for column in ("image", "emoji", "name", "keywords", "short_caption", "long_caption", "dense_caption",
                   "caption_fr", "caption_de", "caption_es", "caption_zh", "category", "split"):
        assert column in all_rows.column_names


def test_file_names_encode_the_emoji(metadata):
    for row in metadata:
        stem = "-".join(f"{ord(char):x}" for char in row["emoji"].replace(VS16, ""))
        assert row["file_name"] == f"images/{stem}.png"


def test_images_are_small_rgb_and_not_blank(all_rows):
    for image in all_rows["image"]:
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image)
        assert pixels.min() < 200, "image is (nearly) uniformly white"


def test_captions_are_non_empty_strings(all_rows):
    for row in all_rows.remove_columns("image"):
        for column in ("emoji", "name", "short_caption", "long_caption", "dense_caption", "caption_fr", "caption_de",
                       "caption_es", "caption_zh", "category"):
            assert isinstance(row[column], str) and row[column].strip(), (column, row)
        # the dense caption is beyond CLIP's 77-token context, and what names the emoji comes after its first 77 words
        words = row["dense_caption"].split()
        assert len(words) > 77 and not re.search(rf"\b{re.escape(row['name'])}\b", " ".join(words[:77])), row["name"]
        assert row["short_caption"] == row["name"]
        assert row["name"] in row["long_caption"] or row["name"][0].upper() + row["name"][1:] in row["long_caption"]
        assert all(isinstance(k, str) and k and k != row["name"] for k in row["keywords"])


def test_splits_are_disjoint_and_cover_everything(splits, all_rows):
    assert set(splits) == set(EMOJI_SPLITS)
    train, test = set(splits["train"]["emoji"]), set(splits["test"]["emoji"])
    assert len(train) == len(splits["train"]) and len(test) == len(splits["test"])
    assert not train & test
    assert train | test == set(all_rows["emoji"])
    assert len(splits["train"]) + len(splits["test"]) == len(all_rows)
    assert 0.10 < len(test) / len(all_rows) < 0.20
    assert set(load_emoji_dataset("test")["emoji"]) == test
    with pytest.raises(ValueError):
        load_emoji_dataset("validation")


def test_names_agree_with_unicode_character_names(metadata):
    """Labels must describe the character they sit next to.

    CLDR short names are not the Unicode character names (e.g. "red heart" vs "heavy black heart"), so only about
    64% agree exactly, while about 93% share a word. A misaligned or shuffled labelling scores about 0% exactly and
    at most about 30% word overlap, so these thresholds fail on such data.
    """
    singles = [row for row in metadata if len(row["emoji"].replace(VS16, "")) == 1]
    assert len(singles) > 500
    unicode_names = [unicodedata.name(row["emoji"].replace(VS16, "")).lower() for row in singles]
    exact = np.mean([row["name"].lower() == name for row, name in zip(singles, unicode_names)])
    overlap = np.mean([bool(_words(row["name"]) & _words(name)) for row, name in zip(singles, unicode_names)])
    assert exact >= 0.60, exact
    assert overlap >= 0.90, overlap
