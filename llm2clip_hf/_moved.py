"""Old import paths of the package (before its rooms were laid out, see docs/architecture.md), kept for one release:
importing one gives the module or object at its new place with a ``FutureWarning`` naming that place."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

REMOVAL = "the old path will be removed in the next release"

MOVED_MODULES = {
    "llm2clip_hf.convert": "llm2clip_hf.conversion",
    "llm2clip_hf.vision_sources": "llm2clip_hf.conversion.pretrained_vision",
    "llm2clip_hf.model_loading": "llm2clip_hf.conversion.model_loading",
    "llm2clip_hf.assets": "llm2clip_hf.conversion.assets",
    "llm2clip_hf.lora": "llm2clip_hf.conversion.lora_merge",
    "llm2clip_hf.training_run": "llm2clip_hf.cli.training_run",
    "llm2clip_hf.demo_report": "llm2clip_hf.demo.report",
    "llm2clip_hf.demo_data": "llm2clip_hf.demo.emoji_dataset",
    "llm2clip_hf.trainers.caption_pairs": "llm2clip_hf.data.text_pairs",
    "llm2clip_hf.trainers.clip_data": "llm2clip_hf.data.image_text_collator",
    "llm2clip_hf.trainers.masked_next_token": "llm2clip_hf.data.masked_next_token",
    "llm2clip_hf.trainers.data_statistics": "llm2clip_hf.data.data_statistics",
    "llm2clip_hf.trainers.epoch_sampling": "llm2clip_hf.data.epoch_sampling",
    "llm2clip_hf.trainers.mixed_sources": "llm2clip_hf.data.mixed_sources",
}

# (module, old name) -> "new.module:NewName", for names that moved to another room or were renamed.
MOVED_NAMES = {
    **{("llm2clip_hf.trainers", name): f"llm2clip_hf.data:{name}" for name in (
        "MaskedTextCollator", "SourceBatchSampler", "TextPairCollator", "ImageTextCollator", "build_caption_pairs",
        "build_mntp_texts", "text_pair_source")},
    **{("llm2clip_hf.data.loading", name): f"llm2clip_hf.data.captions:{name}" for name in (
        "caption_texts", "flatten_captions", "bad_caption_rows", "drop_bad_caption_rows")},
    **{("llm2clip_hf.data.embedding_cache", name): f"llm2clip_hf.data.embedding_cache_building:{name}"
       for name in ("precompute_text_embeddings", "build_embedding_cache")},
    **{(module, "CLIPCollator"): "llm2clip_hf.data:ImageTextCollator"
       for module in ("llm2clip_hf.trainers", "llm2clip_hf.data", "llm2clip_hf.data.image_text_collator")},
    **{(module, "CaptionPairCollator"): "llm2clip_hf.data:TextPairCollator"
       for module in ("llm2clip_hf.trainers", "llm2clip_hf.data", "llm2clip_hf.data.text_pairs")},
    # llm2clip_hf.vision_sources (now .pretrained_vision) also held the text side, now in .text_attachment.
    **{("llm2clip_hf.conversion.pretrained_vision", name): f"llm2clip_hf.conversion.text_attachment:{name}"
       for name in ("adapter_width_error", "attach_text_model", "replace_text_adapter")},
}


def moved_names(module: str) -> Callable[[str], Any]:
    """A module's ``__getattr__`` serving its old names (``__getattr__ = moved_names(__name__)``)."""
    return partial(moved_attribute, module)


def moved_attribute(module: str, name: str) -> Any:
    """The object an old ``module.name`` now is (warned), for a module's ``__getattr__``; else ``AttributeError``."""
    target = MOVED_NAMES.get((module, name))
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, new_name = target.split(":")
    warnings.warn(f"{module}.{name} is now {new_module}.{new_name}; {REMOVAL}.", FutureWarning, stacklevel=3)
    return getattr(importlib.import_module(new_module), new_name)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new place."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} is now {new}; {REMOVAL}.", FutureWarning, stacklevel=2)
        module = importlib.import_module(new)
        self.real_specs = {**getattr(self, "real_specs", {}), new: module.__spec__}
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new place is already executed; it keeps its own ``__spec__`` (importlib set the old
        path's), so its relative imports resolve from its real package."""
        module.__spec__ = self.real_specs[module.__name__]


def install() -> None:
    """Let the old module paths be imported (once per process)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
