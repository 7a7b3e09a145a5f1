#!/usr/bin/env python3
"""Save the release-compatibility fixtures of one release: tiny seeded models saved by that release's code, the
inputs they are run on and the outputs they give, for ``tests/test_release_compatibility.py``, which loads every
saved model with the code of the working tree and checks that the outputs are still the same.

Run it with the code *as released*, never with a working tree being edited: from a clean checkout of the release
(a git worktree), with ``PYTHONPATH`` pointing at it so that ``import llm2clip_hf`` resolves there::

    git worktree add --detach /tmp/release-X.Y.Z vX.Y.Z            # or the release commit
    cp scripts/make_release_fixtures.py /tmp/release-X.Y.Z/scripts/   # this script, as committed now
    cd /tmp/release-X.Y.Z && HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/release-X.Y.Z \\
        python3 scripts/make_release_fixtures.py --out /path/to/main/tests/release_fixtures/X.Y.Z
    git -C /path/to/main worktree remove --force /tmp/release-X.Y.Z

The script refuses to run when ``llm2clip_hf`` is not imported from a git checkout whose ``llm2clip_hf/`` is clean
(``--allow-dirty`` overrides that, for trying the script out only), and refuses to overwrite an existing folder.

Layout of ``--out``::

    manifest.json          what was saved, by which code (package version, git commit), the inputs, and for every
                           model each output: the operation (``op``, one of OPS below) and its arguments
    outputs.safetensors    the outputs, keys ``<model>/<output>`` (or ``<model>/<output>/<field>`` for dicts)
    inputs/                captions etc. are in the manifest; images as PNG files, tensors in tensors.safetensors
    <model>/               one folder per model, written by ``save_pretrained`` (weights, config, remote code,
                           tokenizer / processor)

The outputs are computed on the saved folder reloaded with the release's own classes (what a user of the release
got), and the script checks that they equal the model in memory and the folder loaded through its remote code.

The operations in OPS are part of the fixture format: the test recomputes every output with the same function, so an
existing operation must never change meaning. Add a new one (and a new ``FORMAT`` if needed) instead.

``--set pre-eos-text`` saves the two models of the case recorded for issue 33 item 3 with the code from before commit
1a8fbdc (``eos_token`` pooling appended the tokenizer's eos *id*; no ``eos_text`` in configs): an ``eos_token`` text
encoder and an LLM2CLIP model with it embedded, and its processor::

    git worktree add --detach /tmp/release-pre-eos 1a8fbdc^
    cp scripts/make_release_fixtures.py /tmp/release-pre-eos/scripts/
    cd /tmp/release-pre-eos && HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/release-pre-eos python3 \\
        scripts/make_release_fixtures.py --set pre-eos-text \
        --out /path/to/main/tests/release_fixtures/0.1.0-pre-eos-text
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

FORMAT = 1
CAPTIONS = [
    "a photo of a cat sitting on a red sofa near the window",
    "a dog",
    "two people walk along a sandy beach at sunset while waves roll in, and a detailed close-up of a flower",
    "a bowl of fresh fruit",
    "the quick brown fox jumps over the lazy dog",
]
INSTRUCTION = "Given a sentence, retrieve a detailed relevant sentence"
IMAGE_FILES = ["image_0.png", "image_1.png", "image_2.png"]
TENSOR_FILE = "tensors.safetensors"
LLM_WIDTH = 32  # hidden size of every tiny LLM, so the input width of every text adapter


# ------------------------------------------------------------------------------------------------ operations
# Each takes (model, processor, inputs, spec) and returns a tensor or a dict of tensors. `inputs` holds "captions",
# "instruction", "images" (PIL images, in IMAGE_FILES order) and "tensors" (dict). FROZEN: see the module docstring.

def _instruction(inputs: dict[str, Any], spec: dict[str, Any]) -> str | None:
    return inputs["instruction"] if spec.get("instruction") else None


def _text_batch(batch) -> dict[str, Any]:
    return {key: batch[key] for key in ("input_ids", "attention_mask", "pooling_mask")}


def _op_text_tokenize(model, processor, inputs, spec):
    return dict(model.tokenize(inputs["captions"], instruction=_instruction(inputs, spec)))


def _op_text_encode(model, processor, inputs, spec):
    return model.encode(inputs["captions"], instruction=_instruction(inputs, spec))


def _op_text_forward_tokenizer_output(model, processor, inputs, spec):
    batch = model.tokenizer(inputs["captions"], padding=True, return_tensors="pt")
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds


def _op_processor_text(model, processor, inputs, spec):
    return _text_batch(processor(text=inputs["captions"], instruction=_instruction(inputs, spec)))


def _op_processor_images(model, processor, inputs, spec):
    return processor(images=inputs["images"], return_tensors="pt")["pixel_values"]


def _op_image_features(model, processor, inputs, spec):
    return model.get_image_features(pixel_values=inputs["tensors"]["pixel_values"])


def _op_image_features_from_processor(model, processor, inputs, spec):
    pixels = processor(images=inputs["images"], return_tensors="pt")["pixel_values"]
    return model.get_image_features(pixel_values=pixels)


def _op_text_features_from_embeddings(model, processor, inputs, spec):
    return model.get_text_features(inputs["tensors"]["llm_embeddings"])


def _op_text_features_from_processor(model, processor, inputs, spec):
    batch = processor(text=inputs["captions"], instruction=_instruction(inputs, spec))
    return model.get_text_features(**_text_batch(batch))


def _op_text_features_from_encode(model, processor, inputs, spec):
    return model.get_text_features(model.text_model.encode(inputs["captions"], instruction=_instruction(inputs, spec)))


def _op_logits_from_embeddings(model, processor, inputs, spec):
    tensors = inputs["tensors"]
    return model(pixel_values=tensors["pixel_values"], llm_embeddings=tensors["llm_embeddings"]).logits_per_image


def _op_logits_from_processor(model, processor, inputs, spec):
    batch = processor(text=inputs["captions"], images=inputs["images"])
    return model(pixel_values=batch["pixel_values"], **_text_batch(batch)).logits_per_image


OPS: dict[str, tuple[Callable[..., Any], str]] = {
    "text_tokenize": (_op_text_tokenize, "model.tokenize(captions{instruction})"),
    "text_encode": (_op_text_encode, "model.encode(captions{instruction})"),
    "text_forward_tokenizer_output": (
        _op_text_forward_tokenizer_output,
        "model(**model.tokenizer(captions, padding=True)).text_embeds (plain tokenizer output, re-tokenized)"),
    "processor_text": (_op_processor_text, "processor(text=captions{instruction}) (input_ids, attention_mask, "
                                           "pooling_mask)"),
    "processor_images": (_op_processor_images, "processor(images=PNGs)['pixel_values']"),
    "image_features": (_op_image_features, "model.get_image_features(pixel_values=tensors['pixel_values'])"),
    "image_features_from_processor": (_op_image_features_from_processor,
                                      "model.get_image_features(processor(images=PNGs)['pixel_values'])"),
    "text_features_from_embeddings": (_op_text_features_from_embeddings,
                                      "model.get_text_features(tensors['llm_embeddings'])"),
    "text_features_from_processor": (_op_text_features_from_processor,
                                     "model.get_text_features(**processor(text=captions{instruction}))"),
    "text_features_from_encode": (_op_text_features_from_encode,
                                  "model.get_text_features(model.text_model.encode(captions{instruction}))"),
    "logits_from_embeddings": (
        _op_logits_from_embeddings,
        "model(pixel_values=tensors['pixel_values'], llm_embeddings=tensors['llm_embeddings']).logits_per_image"),
    "logits_from_processor": (_op_logits_from_processor,
                              "model(**processor(text=captions, images=PNGs)).logits_per_image"),
}


def compute_output(spec: dict[str, Any], model, processor, inputs: dict[str, Any]):
    """Run one manifest output ``spec`` (``{"op": ..., "instruction": bool}``) on a loaded model."""
    import torch

    if spec["op"] not in OPS:
        raise KeyError(f"Unknown fixture operation {spec['op']!r}; known: {sorted(OPS)}.")
    with torch.no_grad():
        return OPS[spec["op"]][0](model, processor, inputs, spec)


def describe(spec: dict[str, Any]) -> str:
    """The call an output spec stands for, in words (written into the manifest)."""
    return OPS[spec["op"]][1].format(instruction=", instruction=instruction" if spec.get("instruction") else "")


def flatten(name: str, value) -> dict[str, Any]:
    """``{"<name>": tensor}`` or ``{"<name>/<field>": tensor}`` for a dict output (as stored in outputs.safetensors)."""
    if isinstance(value, dict):
        return {f"{name}/{field}": tensor for field, tensor in value.items()}
    return {name: value}


def load_inputs(folder: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """The inputs a manifest names: captions, instruction, PNG images and the tensors file."""
    from PIL import Image
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = manifest["inputs"]
    images = []
    for name in spec["images"]:
        with Image.open(folder / "inputs" / name) as image:
            images.append(image.convert("RGB"))
    return {"captions": list(spec["captions"]), "instruction": spec["instruction"], "images": images,
            "tensors": load_file(str(folder / "inputs" / spec["tensors_file"]))}


# ------------------------------------------------------------------------------------------------ loading
def load_package(folder: Path, entry: dict[str, Any]):
    """The model and processor of a saved folder, loaded with ``llm2clip_hf``'s own classes (no remote code)."""
    import llm2clip_hf
    from transformers import AutoImageProcessor

    model = getattr(llm2clip_hf, entry["model_class"]).from_pretrained(folder).eval()
    processor = None
    if entry["processor"] == "LLM2CLIPProcessor":
        processor = llm2clip_hf.LLM2CLIPProcessor.from_pretrained(folder)
    elif entry["processor"] == "image_processor":
        processor = AutoImageProcessor.from_pretrained(folder)
    return model, processor


def load_remote_code(folder: Path, entry: dict[str, Any]):
    """The model and processor loaded as a user without the package does: ``AutoModel`` / ``AutoProcessor`` with
    ``trust_remote_code=True``, so the code saved in the folder runs. Only meaningful where ``llm2clip_hf`` is not
    imported (it registers its own classes for these model types, which transformers then prefers): see
    :func:`recompute_in_subprocess`."""
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    if sys.modules.get("llm2clip_hf") is not None:
        raise RuntimeError("llm2clip_hf is imported in this process, so AutoModel would load its classes, not the "
                           "folder's code; use recompute_in_subprocess().")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = None
    if entry["processor"] == "LLM2CLIPProcessor":
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    elif entry["processor"] == "image_processor":
        processor = AutoImageProcessor.from_pretrained(folder)
    return model, processor


LOADERS = {"package": load_package, "remote_code": load_remote_code}


def recompute(folder: str | os.PathLike, loader: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Every output of a fixture folder recomputed with ``loader``: ``(tensors by outputs.safetensors key, errors by
    "<model>/<output>")`` (a model that fails to load gives an error for each of its outputs)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    inputs = load_inputs(folder, manifest)
    tensors: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, entry in manifest["models"].items():
        try:
            model, processor = LOADERS[loader](folder / name, entry)
        except Exception as error:  # noqa: BLE001 - reported per output by the caller
            errors.update({f"{name}/{output}": f"loading failed: {error!r}" for output in entry["outputs"]})
            continue
        for output, spec in entry["outputs"].items():
            try:
                value = compute_output(spec, model, processor, inputs)
            except Exception as error:  # noqa: BLE001
                errors[f"{name}/{output}"] = repr(error)
                continue
            tensors.update({key: tensor.detach().cpu().contiguous()
                            for key, tensor in flatten(f"{name}/{output}", value).items()})
    return tensors, errors


class RecomputeRun:
    """:func:`recompute` of fixture folders running in a fresh Python process in which ``llm2clip_hf`` cannot be
    imported (so ``trust_remote_code`` runs the code saved in the folders); :meth:`results` waits for it."""

    def __init__(self, folders: list[Path], loader: str = "remote_code") -> None:
        self.folders = [Path(folder) for folder in folders]
        self._to = tempfile.TemporaryDirectory()
        self.command = [sys.executable, str(Path(__file__).resolve()), "--recompute", *map(str, self.folders),
                        "--loader", loader, "--to", self._to.name]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = Path(self._to.name) / "log.txt"
        with open(self._log, "w") as log:  # a file, not a pipe: a full pipe would stall the process until waited for
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             cwd=self._to.name)
        self._results: dict[str, tuple[dict, dict]] | None = None

    def results(self, timeout: float = 600) -> dict[str, tuple[dict, dict]]:
        """``{folder name: (tensors by outputs.safetensors key, errors by "<model>/<output>")}``."""
        if self._results is None:
            from safetensors.torch import load_file

            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                raise
            if self._process.returncode != 0:
                raise RuntimeError(f"{' '.join(self.command)} failed:\n{self._log.read_text()[-4000:]}")
            to = Path(self._to.name)
            errors = json.loads((to / "errors.json").read_text())
            self._results = {f.name: (load_file(str(to / f"{f.name}.safetensors")), errors[f.name])
                             for f in self.folders}
            self._to.cleanup()
        return self._results


def recompute_in_subprocess(folders: list[Path], loader: str = "remote_code") -> dict[str, tuple[dict, dict]]:
    """:class:`RecomputeRun` of ``folders``, waited for."""
    return RecomputeRun(folders, loader).results()


def _recompute_main(folders: list[Path], loader: str, to: Path) -> None:
    from safetensors.torch import save_file

    if loader == "remote_code":
        sys.modules["llm2clip_hf"] = None  # importing the package must fail: only the folders' own code runs
    errors = {}
    for folder in folders:
        tensors, errors[folder.name] = recompute(folder, loader)
        save_file(tensors, str(to / f"{folder.name}.safetensors"))
    (to / "errors.json").write_text(json.dumps(errors, indent=2))


# ------------------------------------------------------------------------------------------------ models
def _tiny_eva02():
    from llm2clip_hf.testing import tiny_vision_config

    return tiny_vision_config(hidden_size=32, num_attention_heads=1, num_hidden_layers=2)


TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
OFFICIAL = dict(width=32, depth=2, patch=8, grid=4, mlp=85, proj=16, llm_dim=LLM_WIDTH)

TEXT_OUTPUTS = {"tokens": {"op": "text_tokenize"}, "embeds": {"op": "text_encode"}}
# Preprocessed pixels are stored once per image-processor family (the largest outputs); elsewhere the image features
# of the PNGs cover preprocessing.
CLIP_TEXT_OUTPUTS = {
    "processor_text": {"op": "processor_text"},
    "image_features": {"op": "image_features"},
    "image_features_from_pngs": {"op": "image_features_from_processor"},
    "text_features_from_processor": {"op": "text_features_from_processor"},
    "text_features_from_encode": {"op": "text_features_from_encode"},
    "logits_from_processor": {"op": "logits_from_processor"},
}
PIXEL_OUTPUTS = {"processor_images": {"op": "processor_images"}}
TOWER_OUTPUTS = {
    "image_features": {"op": "image_features"},
    "image_features_from_pngs": {"op": "image_features_from_processor"},
    "text_features": {"op": "text_features_from_embeddings"},
    "logits": {"op": "logits_from_embeddings"},
}


def _text_model(llm: str, **settings):
    import torch
    from llm2clip_hf import LLM2CLIPTextModel

    torch.manual_seed(0)
    return LLM2CLIPTextModel.from_llm(llm, **settings)


def _call(name: str, *args, **kwargs) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def text_encoder(llm: str, extra_outputs: dict | None = None, **settings):
    """A saved-text-encoder case: ``LLM2CLIPTextModel.from_llm(llm, **settings)``."""
    def build(out: Path):
        _text_model(llm, **settings).save_pretrained(out)
    return {"kind": "text_encoder", "model_class": "LLM2CLIPTextModel", "processor": None, "build": build,
            "built_with": _call("LLM2CLIPTextModel.from_llm", llm, **settings),
            "outputs": {**TEXT_OUTPUTS, **(extra_outputs or {})}}


def clip_with_text_encoder(llm: str, projection_dim: int = 16, adapter_num_blocks: int = 4, store_pixels: bool = False,
                           **settings):
    """``LLM2CLIPModel.from_text_model(text_model, <tiny EVA02>, embed_text_model=True)``: processor saved too."""
    def build(out: Path):
        import torch
        from llm2clip_hf import LLM2CLIPModel

        text_model = _text_model(llm, **settings)
        torch.manual_seed(1)
        model = LLM2CLIPModel.from_text_model(text_model, _tiny_eva02(), embed_text_model=True,
                                              projection_dim=projection_dim, adapter_num_blocks=adapter_num_blocks)
        model.save_pretrained(out)
    return {"kind": "clip", "model_class": "LLM2CLIPModel", "processor": "LLM2CLIPProcessor", "build": build,
            "built_with": (f"LLM2CLIPModel.from_text_model({_call('LLM2CLIPTextModel.from_llm', llm, **settings)}, "
                           f"tiny_vision_config(hidden_size=32, num_attention_heads=1, num_hidden_layers=2), "
                           f"embed_text_model=True, projection_dim={projection_dim}, adapter_num_blocks="
                           f"{adapter_num_blocks}) after torch.manual_seed(1)"),
            "outputs": {**CLIP_TEXT_OUTPUTS, **(PIXEL_OUTPUTS if store_pixels else {})}}


def _official_checkpoint(path: Path) -> Path:
    """A fake official eva_clip ``.pt`` (random tensors under the official key names), as tests/test_convert.py."""
    import torch

    tests = Path(__import__("llm2clip_hf").__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    from reference_impl import official_state_dict

    torch.save(official_state_dict(**OFFICIAL), path)
    return path


def official_converted():
    def build(out: Path):
        from llm2clip_hf.conversion import convert_eva_clip_checkpoint

        convert_eva_clip_checkpoint(_official_checkpoint(Path("official_eva02.pt"))).save_pretrained(out)
    return {"kind": "clip", "model_class": "LLM2CLIPModel", "processor": "image_processor", "build": build,
            "built_with": f"convert_eva_clip_checkpoint('official_eva02.pt') of tests/reference_impl.py "
                          f"official_state_dict({', '.join(f'{k}={v}' for k, v in OFFICIAL.items())})",
            "outputs": dict(TOWER_OUTPUTS)}


def official_assembled(llm: str, **settings):
    def build(out: Path):
        from llm2clip_hf.conversion import assemble

        assemble(_official_checkpoint(Path("official_eva02.pt")), _text_model(llm, **settings), out)
    return {"kind": "clip", "model_class": "LLM2CLIPModel", "processor": "LLM2CLIPProcessor", "build": build,
            "built_with": f"llm2clip_hf.conversion.assemble('official_eva02.pt' (as official_converted), "
                          f"{_call('LLM2CLIPTextModel.from_llm', llm, **settings)}, out)",
            "outputs": {**CLIP_TEXT_OUTPUTS, "text_features_from_embeddings": {"op": "text_features_from_embeddings"}}}


def tower_model(family: str, store_pixels: bool = False):
    """A random LLM2CLIPModel on transformers' own CLIP or SigLIP vision tower, as tests/test_vision_towers.py."""
    settings: dict[str, Any] = dict(text_embedding_dim=LLM_WIDTH, adapter_num_blocks=1)
    if family == "clip":
        settings["projection_dim"] = 16
    else:
        settings.update(logit_scale_init_value=math.log(10.0), logit_bias_init_value=-10.0)

    def build(out: Path):
        import torch
        from transformers import CLIPVisionConfig, SiglipVisionConfig
        from llm2clip_hf import LLM2CLIPConfig, LLM2CLIPModel

        vision = (CLIPVisionConfig if family == "clip" else SiglipVisionConfig)(**TOWER)
        torch.manual_seed(2)
        LLM2CLIPModel(LLM2CLIPConfig(vision_config=vision, **settings)).save_pretrained(out)
    vision_name = "CLIPVisionConfig" if family == "clip" else "SiglipVisionConfig"
    return {"kind": "clip", "model_class": "LLM2CLIPModel", "processor": "image_processor", "build": build,
            "built_with": f"LLM2CLIPModel(LLM2CLIPConfig(vision_config={_call(vision_name, **TOWER)}, "
                          f"{', '.join(f'{k}={v!r}' for k, v in settings.items())})) after torch.manual_seed(2)",
            "outputs": {**TOWER_OUTPUTS, **(PIXEL_OUTPUTS if store_pixels else {})}}


LLMS = {  # relative folder names (the script works in a temporary directory), so no path of this machine is saved
    "tiny-llama": dict(hidden_size=LLM_WIDTH, num_hidden_layers=1, num_attention_heads=2, seed=0),
    "tiny-llama-nobos": dict(hidden_size=LLM_WIDTH, num_hidden_layers=1, num_attention_heads=2, add_bos=False,
                             seed=1),
}


def model_sets() -> dict[str, dict[str, Callable[[], dict[str, Any]]]]:
    instructed = {"tokens_with_instruction": {"op": "text_tokenize", "instruction": True},
                  "embeds_with_instruction": {"op": "text_encode", "instruction": True}}
    release = {
        "text_mean": lambda: text_encoder(
            "tiny-llama", pooling_mode="mean",
            extra_outputs={"embeds_from_tokenizer_output": {"op": "text_forward_tokenizer_output"}}),
        "text_weighted_mean": lambda: text_encoder("tiny-llama", pooling_mode="weighted_mean", doc_max_length=6),
        "text_eos_token": lambda: text_encoder("tiny-llama", pooling_mode="eos_token"),
        "text_last_token": lambda: text_encoder("tiny-llama-nobos", pooling_mode="last_token", max_length=12,
                                                bidirectional=False),
        "text_llama3_instruct": lambda: text_encoder("tiny-llama", pooling_mode="mean",
                                                     text_template="llama-3-instruct", extra_outputs=instructed),
        "clip_eva02_embedded": lambda: clip_with_text_encoder("tiny-llama", pooling_mode="mean",
                                                              text_template="llama-3-instruct", adapter_num_blocks=1,
                                                              store_pixels=True),
        "official_converted": official_converted,
        "official_assembled": lambda: official_assembled("tiny-llama", pooling_mode="eos_token"),
        "clip_openai_tower": lambda: tower_model("clip"),
        "siglip_tower": lambda: tower_model("siglip", store_pixels=True),
    }
    pre_eos_text = {
        "text_eos_token": lambda: text_encoder("tiny-llama", pooling_mode="eos_token"),
        "clip_eva02_eos_token_embedded": lambda: clip_with_text_encoder("tiny-llama", pooling_mode="eos_token"),
    }
    return {"release": release, "pre-eos-text": pre_eos_text}


# ------------------------------------------------------------------------------------------------ main
def _git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def provenance(allow_dirty: bool) -> dict[str, Any]:
    import llm2clip_hf
    import safetensors
    import tokenizers
    import torch
    import transformers

    package = Path(llm2clip_hf.__file__).resolve().parent
    checkout = package.parent
    try:
        commit = _git(checkout, "rev-parse", "HEAD")
        dirty = _git(checkout, "status", "--porcelain", "--", "llm2clip_hf")
        describe = _git(checkout, "log", "-1", "--format=%cI %s")
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"llm2clip_hf is imported from {package}, which is not in a git checkout ({error}); run "
                         "with PYTHONPATH pointing at a worktree of the release.") from error
    if dirty and not allow_dirty:
        raise SystemExit(f"{checkout}/llm2clip_hf has uncommitted changes:\n{dirty}\nFixtures must be saved by the "
                         "code as released: run in a clean worktree of the release (see the module docstring).")
    print(f"llm2clip_hf {llm2clip_hf.__version__} from {package} at {commit}" + (" (DIRTY)" if dirty else ""))
    return {"package_version": llm2clip_hf.__version__, "git_commit": commit, "git_commit_line": describe,
            "git_dirty": bool(dirty),
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                            "safetensors": safetensors.__version__}}


def write_inputs(out: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from llm2clip_hf.testing import tiny_image_caption_rows

    folder = out / "inputs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),  # landscape: resize + crop
              tiny_image_caption_rows(image_size=48)[5]["image"],  # a drawn shape
              Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8))]  # portrait
    for name, image in zip(IMAGE_FILES, images):
        image.save(folder / name)
    generator = torch.Generator().manual_seed(0)
    tensors = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
               "llm_embeddings": torch.randn(3, LLM_WIDTH, generator=generator)}
    save_file(tensors, str(folder / TENSOR_FILE))
    return {"captions": CAPTIONS, "instruction": INSTRUCTION, "images": IMAGE_FILES, "tensors_file": TENSOR_FILE,
            "tensors": {name: {"shape": list(t.shape), "made_with": "torch.Generator().manual_seed(0); randn, "
                               "pixel_values first"} for name, t in tensors.items()}}


ATOL = 1e-5


def tolerance(saved) -> float:
    """How far a recomputed float output may be from the saved one: 1e-5 absolute for outputs of order 1, and 1e-5
    times the largest magnitude for larger ones (logits, up to ~15). Float outputs are fp32 on CPU: another CPU,
    thread count or torch build sums in another order, which moves them by ~1e-7 to 1e-6 of their magnitude (logits
    of one process and a fresh one: 1.4e-6 when these fixtures were saved), while any change of behaviour (a token
    more or less, another pooling, other preprocessing) moves them by 1e-2 or more."""
    largest = saved.abs().max().item() if saved.numel() else 0.0
    return ATOL * max(1.0, largest)


def max_abs_difference(new, old) -> float:
    """Largest absolute difference of two tensors (``inf`` when shapes or dtypes differ)."""
    if new.shape != old.shape or new.dtype != old.dtype:
        return math.inf
    return (new.double() - old.double()).abs().max().item() if old.numel() else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="tests/release_fixtures/<version> (must not exist)")
    parser.add_argument("--set", dest="model_set", default="release", choices=sorted(model_sets()),
                        help="release: every model (default); pre-eos-text: the two models of the pre-1a8fbdc case")
    parser.add_argument("--only", nargs="*", help="save only these models of the set (for trying the script out)")
    parser.add_argument("--allow-dirty", action="store_true", help="allow uncommitted changes in llm2clip_hf/")
    parser.add_argument("--recompute", nargs="+", type=Path, metavar="FOLDER",
                        help="instead of saving: recompute the outputs of fixture folders (used by the test)")
    parser.add_argument("--loader", choices=sorted(LOADERS), default="remote_code", help="with --recompute")
    parser.add_argument("--to", type=Path, help="with --recompute: folder for <name>.safetensors and errors.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.recompute:
        if args.to is None:
            parser.error("--recompute needs --to")
        _recompute_main(args.recompute, args.loader, args.to)
        return
    if args.out is None:
        parser.error("--out is required")

    import torch
    from safetensors.torch import save_file
    from llm2clip_hf.testing import make_tiny_llm

    torch.set_num_threads(1)
    out = args.out.resolve()
    if out.exists():
        raise SystemExit(f"{out} exists; fixtures of a release are never overwritten (remove it first if it was "
                         "made by mistake).")
    info = provenance(args.allow_dirty)
    if args.model_set == "pre-eos-text":
        from llm2clip_hf import LLM2CLIPTextConfig

        if hasattr(LLM2CLIPTextConfig(), "eos_text"):
            raise SystemExit("--set pre-eos-text needs the code from before commit 1a8fbdc (no eos_text); this "
                             "llm2clip_hf has it.")
    chosen = model_sets()[args.model_set]
    if args.only:
        unknown = sorted(set(args.only) - set(chosen))
        if unknown:
            raise SystemExit(f"Unknown models {unknown}; the set {args.model_set!r} has {sorted(chosen)}.")
        chosen = {name: chosen[name] for name in args.only}

    out.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "format": FORMAT, **info, "set": args.model_set,
        "saved_by": f"scripts/make_release_fixtures.py --set {args.model_set} --out tests/release_fixtures/{out.name}"
                    + (f" --only {' '.join(args.only)}" if args.only else ""),
        "inputs": write_inputs(out), "llms": {}, "models": {},
    }
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        try:
            for llm, settings in LLMS.items():
                make_tiny_llm(llm, **settings)
                manifest["llms"][llm] = f"llm2clip_hf.testing.make_tiny_llm({llm!r}, " + ", ".join(
                    f"{k}={v!r}" for k, v in settings.items()) + ")"
            for name, make in chosen.items():
                case = make()
                case["build"](out / name)
                entry = {key: case[key] for key in ("kind", "model_class", "processor", "built_with")}
                entry["outputs"] = {output: {**spec, "call": describe(spec)}
                                    for output, spec in case["outputs"].items()}
                config = json.loads((out / name / "config.json").read_text())
                text_config = config.get("text_config") if entry["model_class"] == "LLM2CLIPModel" else config
                if text_config:
                    entry["text_settings"] = {key: text_config.get(key, "<absent>") for key in (
                        "pooling_mode", "text_template", "max_seq_length", "bidirectional", "doc_max_length",
                        "eos_text")}
                manifest["models"][name] = entry
                print(f"saved {name}")
        finally:
            os.chdir(cwd)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    # The outputs: the saved folders reloaded with this release's classes, as its users loaded them.
    outputs, errors = recompute(out, "package")
    if errors:
        raise SystemExit(f"computing outputs failed: {errors}")
    # The same folders through their remote code alone (a fresh process without llm2clip_hf) must agree.
    remote, remote_errors = recompute_in_subprocess([out])[out.name]
    for name, entry in manifest["models"].items():
        for output, spec in entry["outputs"].items():
            keys = sorted(key for key in outputs if key.startswith(f"{name}/{output}/") or key == f"{name}/{output}")
            spec["keys"] = keys
            spec["dtype"] = sorted({str(outputs[key].dtype).removeprefix("torch.") for key in keys})
            where = f"{name}/{output}"
            if where in remote_errors or any(key not in remote for key in keys):
                raise SystemExit(f"{where}: the remote-code load fails: {remote_errors.get(where)}")
            for key in keys:
                difference = max_abs_difference(remote[key], outputs[key])
                if not difference <= (tolerance(outputs[key]) if outputs[key].is_floating_point() else 0):
                    raise SystemExit(f"{key}: the remote-code load differs from the package load by {difference:.3g}")
            difference = max(max_abs_difference(remote[key], outputs[key]) for key in keys)
            spec["remote_code_max_abs_difference_when_saved"] = difference
    save_file(outputs, str(out / "outputs.safetensors"), metadata={"git_commit": info["git_commit"],
                                                                   "package_version": info["package_version"]})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB, {len(manifest['models'])} models, {len(outputs)} tensors)")


if __name__ == "__main__":
    main()
