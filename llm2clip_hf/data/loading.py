"""Open the datasets users point the CLI at: a Hub name, a local ``imagefolder`` (with a metadata file, or one
subfolder of images per class as ImageNet is laid out), a ``save_to_disk`` folder, or jsonl / json / csv / parquet
files (image paths in them are resolved against the file's folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from .._moved import moved_names

ROW_INDEX = "__llm2clip_row__"  # the row's position in the dataset the user gave, carried through batches
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tar": "webdataset"}
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def load_dataset_from_spec(spec: str, split: str = "train", image_column: str | None = None,
                           streaming: bool = False) -> Dataset | IterableDataset:
    """One split of the dataset named by ``spec``.

    ``spec`` is a local folder (``imagefolder`` with metadata.jsonl / .csv, or with one subfolder of images per
    class, read as ``datasets`` does: an ``image`` column and a ``label`` ClassLabel of the folder names; a
    ``save_to_disk`` folder; or a folder of jsonl / csv / parquet / webdataset .tar files), a data file, or a Hub
    dataset name. String values of ``image_column`` in data files are paths relative to the file and are decoded as
    images. ``streaming=True`` returns a ``datasets.IterableDataset`` read shard by shard (not for ``save_to_disk``
    folders).

    Example:
        ```python
        from llm2clip_hf.data import load_dataset_from_spec

        images = load_dataset_from_spec("my_images/")  # imagefolder: image, short_caption, long_caption, label
        pairs = load_dataset_from_spec("pairs.jsonl")
        ```
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        loaded, base = _load_folder(path, streaming), path
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Cannot read {path}: use one of {sorted(FILE_BUILDERS)} files or a dataset folder.")
        loaded, base = load_dataset(builder, data_files=str(path), streaming=streaming), path.parent
    else:
        loaded, base = _load_hub(spec, split, streaming), None
    dataset = _pick_split(loaded, split, spec)
    if image_column is not None and image_column in (dataset.column_names or []) and base is not None:
        dataset = _decode_image_paths(dataset, image_column, base)
    return dataset


def _load_folder(path: Path, streaming: bool = False) -> Dataset | DatasetDict:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        if streaming:
            raise ValueError(f"{path} is a save_to_disk folder, which cannot be streamed; drop --streaming (it is "
                             "memory-mapped already) or stream the parquet / webdataset shards it was made from.")
        return load_from_disk(str(path))
    if any(next(path.rglob(name), None) is not None for name in IMAGEFOLDER_METADATA):
        return load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
    for suffix, builder in FILE_BUILDERS.items():
        files = sorted(str(p) for p in path.glob(f"*{suffix}"))
        if files:
            return load_dataset(builder, data_files=files, streaming=streaming)
    if _has_images_in_subfolders(path):  # ImageNet's layout: labels from the folder names
        return load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
    raise ValueError(
        f"{path} is no dataset folder: neither an imagefolder (a {' / '.join(IMAGEFOLDER_METADATA)} next to the "
        "images, or one subfolder per class holding its images, as ImageNet is laid out), a save_to_disk folder, "
        f"nor a folder of {sorted(FILE_BUILDERS)} files. Arrange it in one of these layouts, or point at a data file."
    )


def _has_images_in_subfolders(path: Path) -> bool:
    """Whether a subfolder of ``path`` (at any depth) holds an image file ``datasets``' imagefolder reads."""
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    for folder, _, files in os.walk(path):
        if folder != str(path) and any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return True
    return False


def _load_hub(name: str, split: str, streaming: bool = False) -> Dataset | DatasetDict:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or datasets.config.HF_HUB_OFFLINE
    try:
        return load_dataset(name, split=split, streaming=streaming)
    except FileNotFoundError as error:
        hint = (" HF_HUB_OFFLINE is set, so only datasets already in the local cache can be opened by name; "
                "download it where the Hub is reachable, or pass a local path.") if offline else ""
        raise FileNotFoundError(f"Dataset {name!r} is not a local path and could not be loaded by name: {error}.{hint}")
    except ConnectionError as error:
        raise ConnectionError(
            f"Could not reach the Hub for dataset {name!r} ({error}). Pass a local path, or set HF_HUB_OFFLINE=1 to "
            "use the local cache only."
        ) from error


def _pick_split(loaded, split: str, spec: str) -> Dataset | IterableDataset:
    if isinstance(loaded, (Dataset, IterableDataset)):
        return loaded
    if split not in loaded:
        raise ValueError(f"{spec} has no split {split!r}; it has {list(loaded)}. Choose one with --split.")
    return loaded[split]


def _decode_image_paths(dataset: Dataset | IterableDataset, image_column: str, base: Path):
    feature = dataset.features[image_column] if dataset.features is not None else None
    if isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) not in ("string", "large_string"):
        return dataset

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        return {image_column: [value if value is None or os.path.isabs(value) else str(base / value)
                               for value in batch[image_column]]}

    progress = {"desc": "Resolving image paths"} if isinstance(dataset, Dataset) else {}
    features = datasets.Features({**dataset.features, image_column: datasets.Image()})
    return dataset.map(resolve, batched=True, features=features, **progress)


def require_columns(dataset: Dataset, columns: Sequence[str], purpose: str) -> None:
    """Raise a ``ValueError`` naming missing columns and listing the columns that exist."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{purpose} needs the column(s) {missing}, but the dataset has {dataset.column_names}. "
            "Rename the columns or point the arguments (e.g. --caption-columns) at the right ones."
        )


def with_row_index(dataset: Dataset) -> Dataset:
    """``dataset`` with a ``ROW_INDEX`` column (0..n-1) unless it has one, so batches can name their rows."""
    return dataset if ROW_INDEX in dataset.column_names else dataset.add_column(ROW_INDEX, list(range(len(dataset))))


__getattr__ = moved_names(__name__)  # old names, warned (llm2clip_hf/_moved.py)
