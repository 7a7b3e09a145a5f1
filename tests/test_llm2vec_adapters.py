"""Text encoders published as PEFT adapters, in llm2vec's layouts (tiny stand-ins): an ``-mntp`` folder (the base
LLM's config and tokenizer beside a LoRA adapter naming its base), a ``-supervised`` adapter alone on top, further
adapters (LLM2CLIP's ``extra_model_name_or_path``), ``adapter_model.bin``, ``llm2vec_config.json``. Embeddings
are checked against an independent re-derivation of ``LLM2Vec.from_pretrained`` + ``encode``
(tests/reference_impl.py), which uses transformers and peft directly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoTokenizer

from llm2clip_hf import LLM2CLIPTextModel, load_text_model
from reference_impl import llm2vec_encode, llm2vec_load

CAPTIONS = ["a red bicycle leaning on a brick wall", "two dogs running across a snowy field at dusk",
            "a bowl of ramen with an egg", "the lighthouse on a cliff above a stormy sea"]
INSTRUCTION = "Given a caption, retrieve a detailed description"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model, directory, seed, base_name, safe_serialization=True):
    """A LoRA adapter with random (non-zero) A and B on ``model`` (a transformers base model), saved alone."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_name)
    peft_model.save_pretrained(directory, safe_serialization=safe_serialization)
    return peft_model.merge_and_unload()


@pytest.fixture(scope="module")
def llm2vec_layout(tiny_llm_nobos_dir, tmp_path_factory):
    """base/ (a plain LLM), mntp/ (config + tokenizer + adapter on base/), supervised/ and extra/ (adapters alone;
    supervised names mntp/ as its base, as the published one names the mntp model), bin/ (adapter_model.bin)."""
    root = tmp_path_factory.mktemp("llm2vec")
    base = tiny_llm_nobos_dir
    mntp, supervised, extra, binary = (root / name for name in ("mntp", "supervised", "extra", "bin"))
    merged = save_adapter(AutoModel.from_pretrained(base), mntp, 1, base)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, mntp / name)
    merged = save_adapter(merged, extra, 2, base)
    save_adapter(merged, supervised, 3, mntp)
    save_adapter(AutoModel.from_pretrained(base), binary, 4, base, safe_serialization=False)
    assert (binary / "adapter_model.bin").exists() and not (mntp / "model.safetensors").exists()
    return {"base": base, "mntp": mntp, "supervised": supervised, "extra": extra, "bin": binary}


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "eos_token"])
@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_mntp_plus_supervised_equals_llm2vec(llm2vec_layout, pooling_mode, instruction):
    paths = llm2vec_layout
    model = LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=paths["supervised"],
                                       pooling_mode=pooling_mode)
    assert model.config.doc_max_length == 400 and model.config.max_seq_length == 512  # llm2vec's defaults
    got = model.encode(CAPTIONS, instruction=instruction, batch_size=2)
    reference, tokenizer = llm2vec_load(paths["mntp"], paths["supervised"])  # supervised unmerged, as llm2vec
    with torch.no_grad():
        expected = llm2vec_encode(reference, tokenizer, CAPTIONS, instruction=instruction, pooling_mode=pooling_mode,
                                  doc_max_length=400)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the adapters changed the embeddings (a loader that dropped one would not pass)
    plain = LLM2CLIPTextModel.from_llm(paths["base"], pooling_mode=pooling_mode).encode(CAPTIONS, instruction)
    assert (plain - got).abs().max() > 1e-2


def test_an_adapter_only_folder_and_further_adapters(llm2vec_layout):
    paths = llm2vec_layout
    # supervised/ alone names mntp/ as its base, which names base/: the chain is followed
    alone = LLM2CLIPTextModel.from_llm(paths["supervised"]).encode(CAPTIONS)
    stacked = LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=[paths["supervised"]]).encode(CAPTIONS)
    torch.testing.assert_close(alone, stacked, rtol=0, atol=1e-6)
    # LLM2CLIP's fork: extra adapters merged before the last one
    got = LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=[paths["extra"], paths["supervised"]])
    reference, tokenizer = llm2vec_load(paths["mntp"], paths["supervised"], extra_dirs=[paths["extra"]])
    with torch.no_grad():
        expected = llm2vec_encode(reference, tokenizer, CAPTIONS, doc_max_length=400)
    torch.testing.assert_close(got.encode(CAPTIONS), expected, rtol=0, atol=1e-5)


def test_adapter_model_bin_on_a_plain_llm(llm2vec_layout):
    """A plain LLM plus an adapter saved as adapter_model.bin (read with weights_only=True), as the SigLIP2 model's
    Llama-3.1-8B text side ships."""
    paths = llm2vec_layout
    got = load_text_model(str(paths["base"]), peft_model_name_or_path=str(paths["bin"])).encode(CAPTIONS)
    base = AutoModel.from_pretrained(paths["base"])
    base.config.is_causal = False
    model = PeftModel.from_pretrained(base, str(paths["bin"])).merge_and_unload().eval()
    with torch.no_grad():
        expected = llm2vec_encode(model, AutoTokenizer.from_pretrained(paths["base"]), CAPTIONS, doc_max_length=400)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_llm2vec_config_settings_explicit_ones_win_and_the_saved_encoder_needs_no_adapter(llm2vec_layout, tmp_path):
    paths = llm2vec_layout
    supervised = tmp_path / "supervised"
    shutil.copytree(paths["supervised"], supervised)
    (supervised / "llm2vec_config.json").write_text(json.dumps(
        {"pooling_mode": "weighted_mean", "max_length": 64, "doc_max_length": 16, "skip_instruction": True}))
    model = LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=supervised)
    assert (model.config.pooling_mode, model.config.max_seq_length, model.config.doc_max_length) == (
        "weighted_mean", 64, 16)
    explicit = LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=supervised, pooling_mode="mean")
    assert explicit.config.pooling_mode == "mean" and explicit.config.max_seq_length == 64
    model.save_pretrained(tmp_path / "saved")
    assert not any((tmp_path / "saved").glob("adapter_*"))
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.encode(CAPTIONS), model.encode(CAPTIONS), rtol=0, atol=1e-6)
    (supervised / "llm2vec_config.json").write_text(json.dumps({"skip_instruction": False}))
    with pytest.raises(ValueError, match="skip_instruction=false"):
        LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=supervised)


def test_an_adapter_without_its_base_says_how_to_give_it(llm2vec_layout, tmp_path):
    orphan = tmp_path / "orphan"
    shutil.copytree(llm2vec_layout["bin"], orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no base_model_name_or_path.*--text-peft-model"):
        LLM2CLIPTextModel.from_llm(orphan)


def test_cli_embeds_and_trains_stage1_from_an_llm2vec_model(llm2vec_layout, tmp_path, capsys):
    """`--text-model <mntp> --text-peft-model <supervised>`: embed writes llm2vec's embeddings, and stage 1 trains LoRA
    on the merged model and saves a merged encoder that reloads alone."""
    from datasets import Dataset, load_from_disk

    from llm2clip_hf.cli import main
    from llm2clip_hf.data import embeddings_as_float32
    from llm2clip_hf.testing import tiny_caption_pair_rows

    paths = llm2vec_layout
    Dataset.from_list(tiny_caption_pair_rows()[:16]).to_json(tmp_path / "pairs.jsonl")
    source = ["--text-model", str(paths["mntp"]), "--text-peft-model", str(paths["supervised"])]
    code = main(["embed", *source, "--dataset", str(tmp_path / "pairs.jsonl"), "--caption-columns", "short_caption",
                 "--output-dir", str(tmp_path / "cache")])
    assert code == 0
    cached = load_from_disk(str(tmp_path / "cache")).with_format("numpy")[:]
    reference, tokenizer = llm2vec_load(paths["mntp"], paths["supervised"])
    texts = [row["short_caption"] for row in tiny_caption_pair_rows()[:16]]
    with torch.no_grad():
        expected = llm2vec_encode(reference, tokenizer, texts, doc_max_length=400)
    torch.testing.assert_close(torch.from_numpy(embeddings_as_float32(cached["short_caption_llm_embedding"])),
                               expected, rtol=0, atol=1e-5)
    code = main(["train", "--stage", "caption", *source, "--dataset", str(tmp_path / "pairs.jsonl"),
                 "--caption-columns", "short_caption", "long_caption", "--output-dir", str(tmp_path / "stage1"),
                 "--max-steps", "2", "--per-device-train-batch-size", "4", "--use-cpu", "--save-strategy", "no",
                 "--disable-tqdm", "true"])
    assert code == 0
    trained = LLM2CLIPTextModel.from_pretrained(tmp_path / "stage1")
    assert trained.config.doc_max_length == 400 and not any((tmp_path / "stage1").glob("adapter_*"))
    assert (trained.encode(texts) - expected).abs().max() > 1e-4  # trained from there


def test_the_siglip2_model_end_to_end_from_its_published_parts(llm2vec_layout, tmp_path):
    """LLM2CLIP-Llama3.1-8B-siglip2 in miniature: its .pt (timm SigLIP tower, adapter under text.text_proj) converted,
    its text side an adapter_model.bin on the base LLM, assembled by the CLI into one model that the zero-shot
    pipeline runs."""
    from transformers import pipeline

    from llm2clip_hf import LLM2CLIPModel
    from llm2clip_hf.cli import main
    from llm2clip_hf.testing import tiny_image_caption_rows
    from reference_impl import timm_siglip_state_dict

    paths = llm2vec_layout
    torch.save(timm_siglip_state_dict(width=128, depth=2, patch=8, grid=4, mlp=200, llm_dim=64), tmp_path / "s.pt")
    assert main(["convert", str(tmp_path / "s.pt"), str(tmp_path / "image_side")]) == 0
    assert main(["assemble", "--model", str(tmp_path / "image_side"), "--text-model", str(paths["base"]),
                 "--text-peft-model", str(paths["bin"]), "--output-dir", str(tmp_path / "full")]) == 0
    labels, template = ["cat", "dog", "red square"], "a photo of a {}"
    image = tiny_image_caption_rows()[0]["image"]
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path / "full"), trust_remote_code=True)
    scores = {s["label"]: s["score"] for s in classify(image, candidate_labels=labels, hypothesis_template=template)}
    full = LLM2CLIPModel.from_pretrained(tmp_path / "full").eval()
    text_side = load_text_model(str(paths["base"]), peft_model_name_or_path=str(paths["bin"]))
    prompts = [template.format(label) for label in labels]
    processor = full.build_processor()
    with torch.no_grad():
        pixels = processor(images=image)["pixel_values"]
        image_features = torch.nn.functional.normalize(full.get_image_features(pixels), dim=-1)
        text_features = torch.nn.functional.normalize(full.get_text_features(text_side.encode(prompts)), dim=-1)
        logits = full.logit_scale.exp() * image_features @ text_features.T + full.logit_bias
    probs = logits.softmax(-1)[0]
    for index, label in enumerate(labels):
        assert scores[label] == pytest.approx(probs[index].item(), abs=1e-5)


def _copy_with_config_name(source, target, name):
    """A copy of a model folder whose config.json carries ``_name_or_path`` as published llm2vec folders do."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "_name_or_path": name}))
    return target


@pytest.mark.parametrize("name, template", [("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-instruct"),
                                            ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-instruct"),
                                            ("google/gemma-2-9b-it", "gemma-2-instruct"),
                                            ("Qwen/Qwen2-7B-Instruct", "qwen2-instruct"),
                                            ("McGill-NLP/some-other-base", None)])
def test_a_downloaded_mntp_folder_gets_the_wrapper_its_config_name_gives(llm2vec_layout, tmp_path, name, template):
    """llm2vec decides by the _name_or_path of a local folder's config.json (issue 33 item 1: a local copy of the
    Llama-3-8B-Instruct -mntp folder got no wrapper and differed by 5.3 max abs). The wrapper changes the
    embeddings, so a loader that ignored it would not pass the second assertion."""
    from llm2clip_hf.modeling.caption_tokenization import TEXT_TEMPLATES

    paths = llm2vec_layout
    mntp = _copy_with_config_name(paths["mntp"], tmp_path / "mntp", name)
    model = LLM2CLIPTextModel.from_llm(mntp, peft_model_name_or_path=paths["supervised"])
    assert model.config.text_template == (TEXT_TEMPLATES[template] if template else None)
    unnamed = LLM2CLIPTextModel.from_llm(paths["mntp"], peft_model_name_or_path=paths["supervised"])
    difference = (model.encode(CAPTIONS) - unnamed.encode(CAPTIONS)).abs().max()
    assert (difference > 1e-3) if template else (difference == 0)


@pytest.mark.parametrize("folder", ["LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
                                    "models--microsoft--LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned/snapshots/0a1b"])
def test_published_llm2clip_text_models_get_their_official_usages_wrapper(tiny_llm_nobos_dir, tmp_path, folder):
    """Official usage sets llm2vec's name to meta-llama/Meta-Llama-3-8B-Instruct for LLM2CLIP's own encoders: the
    Llama-3 wrapper and, under eos_token pooling, nothing appended. Found by folder name or Hub-cache folder."""
    from llm2clip_hf.modeling.caption_tokenization import TEXT_TEMPLATES

    copy = tmp_path / folder
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_llm_nobos_dir, copy)
    model = LLM2CLIPTextModel.from_llm(copy, pooling_mode="eos_token")
    assert model.config.text_template == TEXT_TEMPLATES["llama-3-instruct"] and model.config.eos_text == ""
    explicit = LLM2CLIPTextModel.from_llm(copy, text_template="none")
    assert explicit.config.text_template is None


def test_an_explicit_wrapper_wins_over_the_name(llm2vec_layout, tmp_path):
    from llm2clip_hf.modeling.caption_tokenization import TEXT_TEMPLATES

    mntp = _copy_with_config_name(llm2vec_layout["mntp"], tmp_path / "mntp", "meta-llama/Meta-Llama-3-8B-Instruct")
    explicit = LLM2CLIPTextModel.from_llm(mntp, text_template="mistral-instruct")
    assert explicit.config.text_template == TEXT_TEMPLATES["mistral-instruct"]


def test_a_connection_error_surfaces_instead_of_dropping_llm2vec_config(monkeypatch):
    """Issue 33 item 7: a network failure while looking for llm2vec_config.json of a Hub adapter must raise, not
    read as "no such file" (llm2vec's defaults would then apply silently); a file the repo lacks is still None."""
    from huggingface_hub import constants

    from llm2clip_hf.conversion import llm2vec_adapters
    from llm2clip_hf.modeling import hub_files

    def unreachable(*args, **kwargs):
        raise ConnectionError("network unreachable")

    def no_such_file(*args, **kwargs):
        raise hub_files.EntryNotFoundError("no such file")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_files, "hf_hub_download", unreachable)
    with pytest.raises(ConnectionError):
        llm2vec_adapters.llm2vec_settings("some-org/some-llm2vec-adapter", [], {})
    monkeypatch.setattr(hub_files, "hf_hub_download", no_such_file)
    assert llm2vec_adapters.llm2vec_settings("some-org/some-llm2vec-adapter", [], {}) == {}
