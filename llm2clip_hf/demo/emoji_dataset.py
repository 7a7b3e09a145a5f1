"""The demo's emoji image–caption dataset, shipped with the package so the demo and tests run offline.

``emoji/`` holds 64x64 RGB renderings of Noto Color Emoji glyphs with CLDR English names and keywords as captions
(see ``emoji/ATTRIBUTION.md``; rebuilt by ``scripts/build_emoji_dataset.py``). Its ``metadata.jsonl`` carries a
``split`` column ("train" / "test"), fixed by a hash of each emoji's code points.
"""

from __future__ import annotations

from pathlib import Path

import datasets

EMOJI_SPLITS = ("train", "test")

__all__ = ["EMOJI_SPLITS", "emoji_dataset_dir", "load_emoji_dataset"]


def emoji_dataset_dir() -> Path:
    """Directory of the emoji ``imagefolder`` dataset (``metadata.jsonl`` and ``images/*.png``)."""
    return Path(__file__).resolve().parent / "emoji"


def load_emoji_dataset(split: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    """Load the emoji image–caption dataset with the ``imagefolder`` builder (no network access needed).

    ``imagefolder`` puts every row in a single "train" split; the real split lives in the ``split`` column.
    With ``split`` ("train" or "test") return the rows of that split as a ``Dataset``; with ``None`` return a
    ``DatasetDict`` with both. Columns: ``image`` (PIL, 64x64 RGB), ``emoji``, ``name``, ``keywords``,
    ``short_caption``, ``long_caption``, ``dense_caption`` (97-117 words: beyond CLIP's 77-token context, with what
    tells the emoji apart at the end), ``caption_fr`` / ``caption_de`` / ``caption_es`` / ``caption_zh`` (CLDR's
    human translations of the name), ``category``, ``subcategory``, ``split``.
    """
    if split is not None and split not in EMOJI_SPLITS:
        raise ValueError(f"split must be one of {EMOJI_SPLITS} or None, got {split!r}")
    rows = datasets.load_dataset("imagefolder", data_dir=str(emoji_dataset_dir()), split="train")

    def select(name: str) -> datasets.Dataset:
        # input_columns keeps the images undecoded while filtering.
        return rows.filter(lambda value: value == name, input_columns="split", desc=f"Selecting {name} rows")

    if split is not None:
        return select(split)
    return datasets.DatasetDict({name: select(name) for name in EMOJI_SPLITS})
