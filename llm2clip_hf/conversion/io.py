"""Reading checkpoints safely: ``.pt`` / ``.pth`` / ``.bin`` with ``torch.load(weights_only=True)``, ``.safetensors``
with safetensors, folders (the weight files of a Hugging Face repo, sharded or not, with its ``config.json``) and Hub
ids (``snapshot_download``, never when ``HF_HUB_OFFLINE=1``). No code from a checkpoint is ever run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Wrappers that training scripts put around the state dict (eva_clip's factory reads "model|module|state_dict").
WRAPPER_KEYS = ("state_dict", "module", "model")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
# Weight files of a Hugging Face folder, in order of preference (an eva_clip .pt beats the HF export: the
# authors' EVA02 model cards load the .pt, their HF conversion has "precision mismatches").
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointConversionError(ValueError):
    """The checkpoint does not match a known LLM2CLIP layout; the message lists what is missing or unexpected."""


@dataclass
class LoadedCheckpoint:
    """The tensors of a checkpoint (wrappers and ``module.`` prefixes removed) and where they came from."""

    state: dict[str, torch.Tensor]
    source: str
    kind: str  # "file", "folder" or "hub"
    files: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the folder's config.json, when it has one


def strip_module_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load one checkpoint file safely and strip ``state_dict`` / ``module`` / ``model`` wrappers and ``module.``
    prefixes: ``.safetensors`` with safetensors, anything else with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise
        except Exception as error:
            raise CheckpointConversionError(f"Could not read {path} as safetensors: {error}") from error
        return {strip_module_prefix(k): v for k, v in state.items()}
    try:
        try:  # memory-mapped: tensors that are dropped (an LLM kept in the file) are never read
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) serialisation
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle refusing arbitrary objects lands here
        raise CheckpointConversionError(
            f"Could not load {path} with torch.load(weights_only=True): {error}. Only plain tensor checkpoints are "
            "read; re-save it as a dict of tensors (torch.save(model.state_dict(), ...)) from a trusted environment."
        ) from error
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if wrapper is None:
            raise CheckpointConversionError(
                f"{path} holds no tensors at its top level nor under {list(WRAPPER_KEYS)}; top-level keys: "
                f"{sorted(map(str, state))[:20]}."
            )
        state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return {strip_module_prefix(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def weight_files_of_folder(folder: Path) -> list[Path]:
    """The weight files to read from a folder: an eva_clip ``.pt`` / ``.pth`` when there is exactly one, else
    ``model.safetensors`` / ``pytorch_model.bin`` (or their sharded index)."""
    torch_files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".pt", ".pth"))
    if len(torch_files) == 1:
        return torch_files
    if len(torch_files) > 1:
        raise CheckpointConversionError(
            f"{folder} holds several .pt/.pth checkpoints ({[p.name for p in torch_files]}); pass the one to convert "
            "as a file."
        )
    for index_name in _INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            absent = [name for name in shards if not (folder / name).is_file()]
            if absent:
                raise CheckpointConversionError(f"{folder}: {index_name} names shards that are absent: {absent}.")
            return [folder / name for name in shards]
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise CheckpointConversionError(
        f"{folder} holds no checkpoint: expected one eva_clip .pt/.pth, model.safetensors, pytorch_model.bin or a "
        f"sharded index; found {present}."
    )


def read_folder(folder: str | os.PathLike, source: str | None = None, kind: str = "folder") -> LoadedCheckpoint:
    folder = Path(folder)
    files = weight_files_of_folder(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_official_state_dict(path))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return LoadedCheckpoint(state=state, source=source or str(folder), kind=kind,
                            files=[str(p) for p in files], config=config)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
            and not name.endswith(CHECKPOINT_SUFFIXES))


def download_hub_repo(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                      cache_dir: str | None = None) -> Path:
    """A local snapshot of a Hub repo with its config and the weight files the converter reads (from the cache
    only when ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import list_repo_files, snapshot_download

    from .model_loading import _missing_model_error, hub_is_offline

    kwargs = {k: v for k, v in dict(revision=revision, token=token, cache_dir=cache_dir).items() if v is not None}
    try:
        if hub_is_offline():
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        names = list_repo_files(repo_id, **{k: v for k, v in kwargs.items() if k != "cache_dir"})
        wanted = _hub_weight_files(names)
        patterns = ["config.json", "*.index.json", *wanted]
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
    except CheckpointConversionError:
        raise
    except Exception as error:  # offline cache miss, unknown repo, no network, gated repo
        raise _missing_model_error(repo_id, "checkpoint", error) from error


def _hub_weight_files(names: list[str]) -> list[str]:
    top = [n for n in names if "/" not in n]
    torch_files = [n for n in top if n.endswith((".pt", ".pth"))]
    if len(torch_files) == 1:
        return torch_files
    if len(torch_files) > 1:
        raise CheckpointConversionError(f"The repo holds several .pt/.pth checkpoints ({torch_files}); download the "
                                        "one to convert and pass it as a file.")
    for index_name in _INDEX_FILES:
        if index_name in top:
            stem = "model-" if index_name.startswith("model.") else "pytorch_model-"
            return [index_name, *[n for n in top if n.startswith(stem)]]
    found = [n for n in _SINGLE_FILES if n in top]
    if found:
        return found[:1]
    raise CheckpointConversionError(f"The repo holds no checkpoint file the converter reads; its files: {top[:20]}.")


def load_checkpoint_source(source: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                           cache_dir: str | None = None) -> LoadedCheckpoint:
    """Read a checkpoint file, a folder or a Hub id (see the module docstring)."""
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        return LoadedCheckpoint(state=load_official_state_dict(path), source=name, kind="file", files=[str(path)])
    if path.is_dir():
        return read_folder(path, source=name)
    if name.endswith(CHECKPOINT_SUFFIXES) or not looks_like_hub_id(name):
        raise FileNotFoundError(f"Checkpoint {name} does not exist (not a file, a folder, nor an owner/name Hub id).")
    folder = download_hub_repo(name, revision=revision, token=token, cache_dir=cache_dir)
    return read_folder(folder, source=name, kind="hub")
