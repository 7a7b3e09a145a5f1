"""The one caption rule (llm2clip_hf/data/captions.py): a usable cell is one non-empty string or a non-empty list of
non-empty strings, and every reader of caption cells (map-style drop, stream filter, flattening) applies it alike."""

from __future__ import annotations

import pytest
from datasets import Dataset

from llm2clip_hf.data import ROW_INDEX, drop_bad_caption_rows, drop_bad_stream_caption_rows, with_row_index
from llm2clip_hf.data.captions import bad_caption_rows, caption_problem, caption_texts, flatten_captions

CELLS = {
    "a good string": ("a cat on a mat", True),
    "white space only": ("   ", False),
    "None": (None, False),
    "a number": (3, False),
    "an empty list": ([], False),
    "a list with one empty string": ([""], False),
    "a good list": (["a cat", "a cat on a mat"], True),
}


def one_row(cell) -> Dataset:
    return with_row_index(Dataset.from_dict({"caption": [cell]}))


@pytest.mark.parametrize("name", CELLS)
def test_the_rule(name):
    cell, usable = CELLS[name]
    problem = caption_problem(cell)
    assert (problem is None) == usable, problem
    assert problem is None or isinstance(problem, str) and problem


@pytest.mark.parametrize("name", CELLS)
def test_every_reader_of_captions_applies_the_rule(name):
    cell, usable = CELLS[name]
    dataset = one_row(cell)
    assert dataset["caption"] == [cell]  # the cell reaches the readers as it is

    assert len(drop_bad_caption_rows(dataset, ["caption"], skip=True)) == int(usable)
    assert bad_caption_rows(dataset, ["caption"]) == ([] if usable else [0])
    stream = drop_bad_stream_caption_rows(dataset.to_iterable_dataset(), ["caption"], skip=True)
    assert [row[ROW_INDEX] for row in stream] == ([0] if usable else [])

    texts = [cell] if isinstance(cell, str) else cell
    if usable:
        assert flatten_captions([cell], "caption") == (texts, [0] * len(texts))
        assert caption_texts(dataset, ["caption"]) == (texts, [0] * len(texts))
        assert drop_bad_caption_rows(dataset, ["caption"], skip=False) is dataset
        assert len(list(drop_bad_stream_caption_rows(dataset.to_iterable_dataset(), ["caption"], skip=False))) == 1
        return
    with pytest.raises(ValueError, match="Row 7, column 'caption'"):
        flatten_captions(["fine", cell], "caption", first_row=6)
    with pytest.raises(ValueError, match="Row 0, column 'caption'"):
        caption_texts(dataset, ["caption"])
    with pytest.raises(ValueError, match="Row 0 has an empty, missing or non-string caption"):
        drop_bad_caption_rows(dataset, ["caption"], skip=False)
    with pytest.raises(ValueError, match="Row 0, column 'caption'"):
        list(drop_bad_stream_caption_rows(dataset.to_iterable_dataset(), ["caption"], skip=False))
