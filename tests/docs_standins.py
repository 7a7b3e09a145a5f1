"""Tiny offline stand-ins for what the documentation's examples name, so that every example runs as written.

Hub models: a Hugging Face cache (``HF_HOME/hub``) holding a tiny model under each Hub id the pages name, in the
layout the real repo has (a plain LLM, an llm2vec ``-mntp`` folder with its ``-supervised`` adapter, a published
``LLM2CLIP-Openai-*`` folder, an eva_clip ``.pt``, a transformers ``CLIPModel``), so that examples load them by repo
id with ``HF_HUB_OFFLINE=1`` as a user with the repos in the cache does. What is emulated is only the download.

A user's files: ``my_images/`` (an imagefolder with ``metadata.jsonl``: ``file_name``, ``short_caption``,
``long_caption``, ``label``), ``my_test/`` (held-out rows, same columns), ``pairs.jsonl`` (caption pairs for stage 1),
``cat.png`` (an image), ``shards/`` (the training rows as four parquet shards with a ``__key__`` column, a
stream's layout), ``msmarco.jsonl`` / ``nq.jsonl`` (general text pairs), ``my-text-encoder/`` (a saved ``LLM2CLIPTextModel``) and ``my-llm2clip/`` (a saved
``LLM2CLIPModel`` with its text encoder embedded). The pages say what each is (``docs/data-formats.md``).

``HUB_STANDINS`` lists every Hub id a page may name; ``tests/test_docs.py`` fails on a page that names another.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"
FIXTURES = Path(__file__).parent / "fixtures"
LLM2VEC = FIXTURES / "llm2vec_official" / "llama3-instruct"  # official llm2vec 0.2.3 layout (issue 33 fixtures)
LLM_WIDTH = 64  # hidden size of the tiny LLMs; the published image sides' adapters take this width
OPENAI = dict(width=128, depth=2, patch=8, grid=4, mlp=256, proj=24, llm_dim=LLM_WIDTH)
EVA02 = dict(width=64, depth=2, patch=8, grid=4, mlp=170, proj=24, llm_dim=LLM_WIDTH)
SIGLIP = dict(width=128, depth=2, patch=8, grid=4, mlp=200, llm_dim=LLM_WIDTH)


def _plain_llm(folder: Path, seed: int) -> None:
    from llm2clip_hf.testing import make_tiny_llm

    make_tiny_llm(folder, hidden_size=LLM_WIDTH, seed=seed, causal_lm=True, tie_word_embeddings=True)


def _llm2vec(part: str):
    def build(folder: Path, seed: int) -> None:
        shutil.copytree(LLM2VEC / part, folder, dirs_exist_ok=True)
        adapter = folder / "adapter_config.json"
        if part == "supervised":  # the published -supervised adapter names the -mntp repo as its base
            settings = json.loads(adapter.read_text())
            settings["base_model_name_or_path"] = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"
            adapter.write_text(json.dumps(settings, indent=2))
    return build


def _openai_repo(folder: Path, seed: int) -> None:
    from safetensors.torch import save_file

    from reference_impl import hf_openai_config, hf_openai_state_dict, openai_clip_state_dict

    official = openai_clip_state_dict(**OPENAI, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_openai_config(official, num_heads=2)))
    save_file({k: v.contiguous() for k, v in hf_openai_state_dict(official).items()}, str(folder / "model.safetensors"))


def _eva_clip_pt(name: str, family: str = "eva02"):
    def build(folder: Path, seed: int) -> None:
        from reference_impl import official_state_dict, timm_siglip_state_dict

        folder.mkdir(parents=True, exist_ok=True)
        state = official_state_dict(**EVA02, seed=seed) if family == "eva02" else timm_siglip_state_dict(**SIGLIP,
                                                                                                         seed=seed)
        torch.save(state, folder / name)
        # the published EVA02 repos also hold a Hugging Face export; its config.json names the eva_clip model
        (folder / "config.json").write_text(json.dumps({"architectures": ["EvaCLIPModel"], "model_type": "evaclip"}))
    return build


def _transformers_clip(folder: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                max_position_embeddings=16)
    CLIPModel(CLIPConfig(vision_config=tower, text_config=text, projection_dim=24)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


# Hub id -> builder of its tiny stand-in (called with the snapshot folder and a seed).
HUB_STANDINS = {
    # plain LLMs (stage 1 starts from one; LLM2CLIP's published text encoders are Llama checkpoints)
    "meta-llama/Llama-3.2-1B-Instruct": _plain_llm,
    "meta-llama/Meta-Llama-3-8B-Instruct": _llm2vec("base"),
    "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned": _plain_llm,
    "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned": _plain_llm,
    # llm2vec's published encoders: an -mntp folder (config + LoRA adapter) and a -supervised adapter on it
    "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp": _llm2vec("mntp"),
    "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised": _llm2vec("supervised"),
    # LLM2CLIP's published image sides: a Hugging Face CLIP folder, eva_clip .pt files (EVA02, timm SigLIP2)
    "microsoft/LLM2CLIP-Openai-L-14-336": _openai_repo,
    "microsoft/LLM2CLIP-Openai-B-16": _openai_repo,
    "microsoft/LLM2CLIP-EVA02-L-14-336": _eva_clip_pt("LLM2CLIP-EVA02-L-14-336.pt"),
    "microsoft/LLM2CLIP-Llama3.2-1B-EVA02-L-14-336": _eva_clip_pt("LLM2CLIP-Llama3.2-1B-EVA02-L-14-336.pt"),
    # pretrained CLIPs to post-train
    "openai/clip-vit-base-patch16": _transformers_clip,
    "openai/clip-vit-large-patch14-336": _transformers_clip,
}


def build_hub_cache(hub: Path) -> Path:
    """A Hugging Face hub cache (``models--<org>--<name>/refs/main``, ``snapshots/<rev>/``) of every stand-in."""
    for seed, (repo_id, build) in enumerate(sorted(HUB_STANDINS.items())):
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
        build(repo / "snapshots" / REVISION, seed)
    return hub


def _image_folder(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        row["image"].save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "short_caption": row["short_caption"],
                                 "long_caption": row["long_caption"], "label": row["short_caption"].split()[-1]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _parquet_shards(folder: Path, rows: list[dict], shards: int = 4) -> None:
    """The rows as parquet shards with a ``__key__`` column (a stream's rows, as webdataset names them)."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    table = Dataset.from_list([{"__key__": f"{i:03d}", "image": row["image"], "short_caption": row["short_caption"],
                                "long_caption": row["long_caption"]} for i, row in enumerate(rows)])
    for index in range(shards):
        table.shard(shards, index, contiguous=True).to_parquet(str(folder / f"train-{index:05d}.parquet"))


def _text_pairs(folder: Path) -> None:
    """General text-pair sources for mixed stage-1 data: ``msmarco.jsonl`` (query, positive, negative) and
    ``nq.jsonl`` (question, answer, hard_negative)."""
    from llm2clip_hf.testing import tiny_caption_pair_rows

    pairs = tiny_caption_pair_rows()
    others = pairs[1:] + pairs[:1]
    (folder / "msmarco.jsonl").write_text("".join(json.dumps(
        {"query": p["short_caption"], "positive": p["long_caption"], "negative": o["long_caption"]}) + "\n"
        for p, o in zip(pairs, others)))
    (folder / "nq.jsonl").write_text("".join(json.dumps(
        {"question": f"what does {p['short_caption']} look like?", "answer": p["long_caption"],
         "hard_negative": o["long_caption"]}) + "\n" for p, o in zip(pairs, others)))


def build_user_files(folder: Path, hub: Path) -> Path:
    """The files a page's examples take as the user's own (see the module docstring)."""
    from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
    from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config

    folder.mkdir(parents=True, exist_ok=True)
    rows = tiny_image_caption_rows()
    _image_folder(folder / "my_images", rows[:24])
    _image_folder(folder / "my_test", tiny_image_caption_rows()[24:])
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tiny_caption_pair_rows()))
    _parquet_shards(folder / "shards", rows[:24])
    _text_pairs(folder)
    rows[0]["image"].save(folder / "cat.png")
    llm = hub / "models--meta-llama--Llama-3.2-1B-Instruct" / "snapshots" / REVISION
    torch.manual_seed(0)
    text_model = LLM2CLIPTextModel.from_llm(str(llm), text_template="llama-3-instruct")
    text_model.save_pretrained(folder / "my-text-encoder")
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(image_size=32), projection_dim=32)
    model.save_pretrained(folder / "my-llm2clip")
    return folder


def build_world(root: Path) -> dict[str, Path]:
    """``{"hf_home": ..., "user_files": ...}``: the hub cache under ``hf_home/hub`` and the user's files."""
    hf_home = root / "hf_home"
    hub = build_hub_cache(hf_home / "hub")
    return {"hf_home": hf_home, "user_files": build_user_files(root / "user_files", hub)}
