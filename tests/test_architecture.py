"""The package's rooms import only downwards (docs/architecture.md): a module of one room may import its own room and
the rooms below it, never one above. The remote code (modeling/) imports only the standard library, torch and
transformers (huggingface_hub, which transformers requires, for optional Hub files in modeling/hub_files.py;
sentence-transformers in the module that only sentence-transformers loads)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm2clip_hf"

# Lowest first. `testing` (tiny models for tests) stands on modeling only; `_moved` (old import paths) is imported
# lazily by any room and imports nothing of the package itself.
ROOMS = ("_moved", "modeling", "testing", "conversion", "data", "evaluation", "trainers", "demo", "cli")
FACADE = "__init__"  # llm2clip_hf/__init__.py: the top-level names, above every room
REMOTE_CODE_IMPORTS = {"torch", "transformers", "huggingface_hub", "sentence_transformers", "__future__"}


def room_of(module: str) -> str:
    """``llm2clip_hf.data.loading`` -> ``data``; ``llm2clip_hf`` -> the facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module ``path`` (the module ``module``) imports, anywhere in it (also inside functions), absolute,
    with its line; ``from X import name`` counts as ``X.name`` when ``name`` is a module of the package."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                found.append((node.lineno, candidate if is_module else source))
    return found


def violations(path: Path, module: str) -> list[str]:
    """The imports of ``module`` against the order of the rooms."""
    room = room_of(module)
    problems = []
    for line, target in imported_modules(path, module):
        top = target.split(".")[0]
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        if room == "modeling" and top != "llm2clip_hf" and top not in REMOTE_CODE_IMPORTS and \
                top not in sys.stdlib_module_names:
            problems.append(f"{where}: the remote code imports only the standard library, torch and transformers")
        if top != "llm2clip_hf" or room == FACADE:
            continue
        target_room = room_of(target)
        if target_room == FACADE:
            problems.append(f"{where}: a room never imports the package's top level (import from the room)")
        elif room == "modeling" and target_room != "modeling":
            problems.append(f"{where}: the remote code imports only its own files")
        elif ROOMS.index(target_room) > ROOMS.index(room):
            problems.append(f"{where}: {room} is below {target_room}")
    return problems


def package_modules() -> list[tuple[Path, str]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules.append((path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)))
    return modules


def test_every_module_imports_only_its_room_and_the_rooms_below():
    unknown = sorted({room_of(m) for _, m in package_modules()} - set(ROOMS) - {FACADE})
    assert not unknown, f"modules outside the known rooms {ROOMS}: {unknown} (add them to docs/architecture.md)"
    problems = [problem for path, module in package_modules() for problem in violations(path, module)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, module, expected", [
    ("from ..trainers import LLM2CLIPTrainer\n", "llm2clip_hf.data.fake", "data is below trainers"),
    ("def f():\n    from ..cli.commands import main\n", "llm2clip_hf.evaluation.fake", "evaluation is below cli"),
    ("import llm2clip_hf.demo\n", "llm2clip_hf.conversion.fake", "conversion is below demo"),
    ("from ..cli import main\n", "llm2clip_hf.demo.fake", "demo is below cli"),
    ("from .. import load_text_model\n", "llm2clip_hf.data.fake", "never imports the package's top level"),
    ("import datasets\n", "llm2clip_hf.modeling.fake", "only the standard library, torch and transformers"),
    ("from ..data import ROW_INDEX\n", "llm2clip_hf.modeling.fake", "imports only its own files"),
])
def test_the_check_catches_upward_imports(tmp_path, source, expected, module):
    path = PACKAGE / module.split(".")[1] / "fake.py"  # a path inside the room (the file itself is read from tmp)
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    problems = violations_of_source(fake, path, module)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("source, module", [
    ("from ..modeling import LLM2CLIPModel\nfrom .loading import ROW_INDEX\n", "llm2clip_hf.data.fake"),
    ("from ..data import ROW_INDEX\nfrom ..evaluation import evaluate_retrieval\n", "llm2clip_hf.trainers.fake"),
    ("import torch\nfrom transformers import PreTrainedModel\nfrom .pooling import pool\n", "llm2clip_hf.modeling.fake"),
])
def test_the_check_accepts_downward_imports(tmp_path, source, module):
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    assert violations_of_source(fake, PACKAGE / module.split(".")[1] / "fake.py", module) == []


def violations_of_source(source: Path, path_in_package: Path, module: str) -> list[str]:
    """:func:`violations` of the code in ``source`` as if it were ``path_in_package`` (module ``module``)."""
    text = source.read_text()
    original = Path.read_text
    try:
        Path.read_text = lambda self, *a, **k: text if self == path_in_package else original(self, *a, **k)
        return violations(path_in_package, module)
    finally:
        Path.read_text = original


OLD_PATHS = [
    ("llm2clip_hf.convert", "convert_checkpoint", "llm2clip_hf.conversion"),
    ("llm2clip_hf.vision_sources", "attach_text_model", "llm2clip_hf.conversion"),
    ("llm2clip_hf.model_loading", "load_text_model", "llm2clip_hf.conversion"),
    ("llm2clip_hf.lora", "merged_state_dict", "llm2clip_hf.conversion"),
    ("llm2clip_hf.demo_data", "load_emoji_dataset", "llm2clip_hf.demo"),
    ("llm2clip_hf.trainers.clip_data", "CLIPCollator", "llm2clip_hf.data"),
    ("llm2clip_hf.trainers.caption_pairs", "CaptionPairCollator", "llm2clip_hf.data"),
    ("llm2clip_hf.trainers", "SourceBatchSampler", "llm2clip_hf.data"),
    ("llm2clip_hf.data.loading", "caption_texts", "llm2clip_hf.data"),
    ("llm2clip_hf.data.embedding_cache", "precompute_text_embeddings", "llm2clip_hf.data"),
]


def test_old_import_paths_still_work_with_a_warning_naming_the_new_place():
    """In a fresh interpreter (no old module imported yet): each old name is the object at its new place (a renamed
    class: the new class), and importing it warns (FutureWarning) naming where it went."""
    import subprocess

    renamed = {"CLIPCollator": "ImageTextCollator", "CaptionPairCollator": "TextPairCollator"}
    code = """import importlib, sys, warnings
warnings.simplefilter("error", ImportWarning)
for old_module, name, new_module, new_name in eval(sys.argv[1]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        old = getattr(importlib.import_module(old_module), name)
    new = getattr(importlib.import_module(new_module), new_name)
    assert old is new, (old_module, name, old, new)
    messages = [str(w.message) for w in caught if w.category is FutureWarning]
    assert messages and all(" is now " + new_module in m for m in messages), (old_module, name, messages)
"""
    table = [(old, name, new, renamed.get(name, name)) for old, name, new in OLD_PATHS]
    result = subprocess.run([sys.executable, "-c", code, repr(table)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
