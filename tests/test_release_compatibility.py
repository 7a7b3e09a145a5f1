"""A saved model keeps giving what it gave when saved (issue 33 item 3).

Every folder under ``tests/release_fixtures/`` holds tiny models saved by one release's code
(``scripts/make_release_fixtures.py`` run in a worktree of that release), the inputs, the outputs they gave then
(``outputs.safetensors``) and a ``manifest.json`` saying how each output is computed. Each model is loaded as a user
loads it, two ways:

- ``package``: the classes of ``llm2clip_hf`` as in this working tree (``LLM2CLIPTextModel.from_pretrained``,
  ``LLM2CLIPModel.from_pretrained``, ``LLM2CLIPProcessor.from_pretrained``): today's code on an old folder;
- ``remote_code``: ``AutoModel`` / ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``: the code saved
  in the folder, under today's transformers and torch (what a user without the package gets). This runs in one
  separate Python process in which ``llm2clip_hf`` cannot be imported: where it is imported, transformers prefers its
  registered classes to the folder's code,

and every output is recomputed with the manifest's operation (the same function the generator used,
``make_release_fixtures.OPS``) and compared with the stored one.

Tolerance: token ids, masks and other integer outputs must be identical. Float outputs are fp32 on CPU, compared at
1e-5 absolute (times the output's largest magnitude where that exceeds 1: logits reach ~15;
``make_release_fixtures.tolerance``): recomputing on another CPU, thread count or torch build changes the order of
floating-point sums, which moves values by ~1e-7 to 1e-6 of their magnitude (logits recomputed in a fresh process:
1.4e-6), while any change of behaviour (one token more or less, another pooling, other preprocessing) moves them by
1e-2 or more (the ``eos_token`` change of commit 1a8fbdc: 0.4 on text embeddings, 6 on logits).

Fixtures of a new release: see the docstring of ``scripts/make_release_fixtures.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig
from transformers.utils import logging as hf_logging

import llm2clip_hf

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "release_fixtures"

_spec = importlib.util.spec_from_file_location("make_release_fixtures", ROOT / "scripts" / "make_release_fixtures.py")
fixture_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_script)

LOADERS = ("package", "remote_code")

# Outputs known to differ today, by (fixture folder, model, output, loader). Strict: one that starts to pass fails the
# run, so the entry must then be removed.
KNOWN_FAILURES: dict[tuple[str, str, str, str], str] = {
    # Emptied by the config-version-2 migration (CHANGELOG 0.2.0). Before it, the pre-eos-text set failed with the
    # package classes: no eos_text in its configs, so today's code appended the text " </s>" (a space token, then
    # the eos token) where the saved model appended the eos *id*, and its processor appended nothing. Measured with
    # the code of 06cc1b4: text embeddings 0.39 max abs, text features 0.48 (processor) / 0.03 (encode), logits 6.0.
}


def fixture_folders() -> list[Path]:
    return sorted(path.parent for path in FIXTURES.glob("*/manifest.json"))


@functools.cache
def manifest(version: str) -> dict:
    return json.loads((FIXTURES / version / "manifest.json").read_text())


@functools.cache
def inputs(version: str) -> dict:
    return fixture_script.load_inputs(FIXTURES / version, manifest(version))


@functools.cache
def stored_outputs(version: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / version / "outputs.safetensors"))


@functools.cache
def loaded_with_package(version: str, model: str):
    return fixture_script.load_package(FIXTURES / version / model, manifest(version)["models"][model])


_remote_code_run: list = []


def remote_code_results() -> dict[str, tuple[dict, dict]]:
    """All outputs of all folders recomputed through their remote code, in one fresh process without llm2clip_hf
    (where it is imported, transformers prefers its registered classes to the folder's code)."""
    if not _remote_code_run:
        _remote_code_run.append(fixture_script.RecomputeRun(fixture_folders(), "remote_code"))
    return _remote_code_run[0].results()


@pytest.fixture(scope="module", autouse=True)
def _start_the_remote_code_run_early(request):
    """Start the remote-code process with the module's first test when remote-code cases are selected, so that it
    runs while the package cases (ordered first) run here."""
    if any("remote_code" in item.name for item in request.session.items) and not _remote_code_run:
        _remote_code_run.append(fixture_script.RecomputeRun(fixture_folders(), "remote_code"))
    yield


def recomputed(version: str, model: str, output: str, loader: str) -> dict[str, torch.Tensor]:
    spec = manifest(version)["models"][model]["outputs"][output]
    if loader == "package":
        net, processor = loaded_with_package(version, model)
        value = fixture_script.compute_output(spec, net, processor, inputs(version))
        return fixture_script.flatten(f"{model}/{output}", value)
    tensors, errors = remote_code_results()[version]
    where = f"{model}/{output}"
    if where in errors:
        pytest.fail(f"{version}/{where} through the remote code: {errors[where]}")
    return {key: tensors[key] for key in tensors if key == where or key.startswith(where + "/")}


def output_cases():
    for loader in LOADERS:  # package cases first: the remote-code process runs meanwhile
        for folder in fixture_folders():
            version = folder.name
            for model, entry in manifest(version)["models"].items():
                for output in entry["outputs"]:
                    key = (version, model, output, loader)
                    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[key])] if key in KNOWN_FAILURES \
                        else []
                    yield pytest.param(*key, id="/".join(key), marks=marks)


def model_cases():
    return [pytest.param(folder.name, model, id=f"{folder.name}/{model}")
            for folder in fixture_folders() for model in manifest(folder.name)["models"]]


def test_fixtures_exist_and_name_their_code():
    folders = fixture_folders()
    assert folders, f"no release fixtures under {FIXTURES}"
    for folder in folders:
        data = manifest(folder.name)
        assert data["format"] == fixture_script.FORMAT, folder
        assert re.fullmatch(r"[0-9a-f]{40}", data["git_commit"]) and not data["git_dirty"], folder
        assert folder.name.startswith(data["package_version"]), (folder.name, data["package_version"])
        keys = {key for entry in data["models"].values() for spec in entry["outputs"].values() for key in spec["keys"]}
        assert keys == set(stored_outputs(folder.name)), f"{folder}: manifest and outputs.safetensors disagree"


def test_known_failures_name_existing_cases():
    """Every KNOWN_FAILURES entry is a real case (a renamed fixture must not leave a stale entry behind)."""
    cases = {tuple(param.values) for param in output_cases()}
    assert set(KNOWN_FAILURES) <= cases, sorted(set(KNOWN_FAILURES) - cases)


# ------------------------------------------------------------------------------------------- saved configs
_IGNORED_WORDS = re.compile(r"unused|not used|unrecogni[sz]ed|unexpected|ignored|will not have any effect|"
                            r"not (a )?valid|deprecated", re.IGNORECASE)
# Keys transformers itself writes into every config.json / processor_config.json.
_TRANSFORMERS_KEYS = {"architectures", "auto_map", "dtype", "transformers_version", "processor_class",
                      "image_processor", "_name_or_path"}
OUR_CONFIGS = {cls.model_type: cls for cls in (llm2clip_hf.LLM2CLIPConfig, llm2clip_hf.LLM2CLIPTextConfig,
                                                  llm2clip_hf.EVA02VisionConfig)}


def _known_keys(cls: type[PretrainedConfig]) -> set[str]:
    """The keys today's config class reads: its ``__init__`` arguments and ``PretrainedConfig``'s attributes."""
    return set(inspect.signature(cls.__init__).parameters) | set(PretrainedConfig().to_dict()) | _TRANSFORMERS_KEYS


def _unknown_config_keys(saved: dict, where: str) -> list[str]:
    """Keys of a saved config (and of its nested configs of ours) that today's classes do not read."""
    cls = OUR_CONFIGS.get(saved.get("model_type"))
    if cls is None:  # a transformers config (the LLM's, a CLIP / SigLIP tower's): transformers' business
        return []
    unknown = [f"{where}.{key}" for key in sorted(set(saved) - _known_keys(cls) - {"model_type"})]
    # LLM2CLIPTextConfig stores its max_length as max_seq_length, which __init__ reads from kwargs.
    if cls is llm2clip_hf.LLM2CLIPTextConfig:
        unknown = [key for key in unknown if not key.endswith(".max_seq_length")]
    for key, value in saved.items():
        if isinstance(value, dict) and "model_type" in value:
            unknown += _unknown_config_keys(value, f"{where}.{key}")
    return unknown


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("version, model", model_cases())
def test_saved_config_has_no_key_that_todays_code_ignores(version, model):
    """Loading an old folder with today's classes reads every key saved in it: no key is silently dropped (a renamed
    or removed setting needs a migration), and no warning about unused keys is logged."""
    folder = FIXTURES / version / model
    saved = json.loads((folder / "config.json").read_text())
    unknown = _unknown_config_keys(saved, "config")
    processor_file = folder / "processor_config.json"
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
        accepted = set(inspect.signature(llm2clip_hf.LLM2CLIPProcessor.__init__).parameters) | _TRANSFORMERS_KEYS
        unknown += [f"processor_config.{key}" for key in sorted(set(processor) - accepted)]
    assert not unknown, f"{version}/{model}: saved keys today's code does not read: {unknown}"

    handler = _Records()
    roots = [hf_logging.get_logger(), logging.getLogger("llm2clip_hf")]
    for root in roots:
        root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fixture_script.load_package(folder, manifest(version)["models"][model])
    finally:
        for root in roots:
            root.removeHandler(handler)
    messages = [record.getMessage() for record in handler.records] + [str(w.message) for w in caught]
    flagged = [message for message in messages if _IGNORED_WORDS.search(message)]
    assert not flagged, f"{version}/{model}: loading warns about keys: {flagged}"


# ------------------------------------------------------------------------------------------- saved outputs
@pytest.mark.parametrize("version, model, output, loader", list(output_cases()))
def test_saved_model_gives_the_saved_output(version, model, output, loader):
    spec = manifest(version)["models"][model]["outputs"][output]
    got = recomputed(version, model, output, loader)
    expected = stored_outputs(version)
    assert sorted(got) == spec["keys"], f"{spec['call']} now returns {sorted(got)}, saved {spec['keys']}"
    problems = []
    for key in spec["keys"]:
        new, old = got[key].detach().cpu(), expected[key]
        if new.dtype != old.dtype or new.shape != old.shape:
            problems.append(f"{key}: now {new.dtype} {tuple(new.shape)}, saved {old.dtype} {tuple(old.shape)}")
        elif old.is_floating_point():
            diff, allowed = fixture_script.max_abs_difference(new, old), fixture_script.tolerance(old)
            if not diff <= allowed:
                problems.append(f"{key}: max abs difference {diff:.3g} > {allowed:.3g}")
        elif not torch.equal(new, old):
            rows = (new != old).any(dim=-1).nonzero().flatten().tolist() if old.dim() > 1 else "all"
            problems.append(f"{key}: integers differ (rows {rows})\n  now   {new.tolist()}\n  saved {old.tolist()}")
    assert not problems, (f"{version}/{model}: {spec['call']} ({loader} loader) no longer gives what it gave when "
                          f"saved by llm2clip_hf {manifest(version)['package_version']} at "
                          f"{manifest(version)['git_commit'][:10]}:\n" + "\n".join(problems))
