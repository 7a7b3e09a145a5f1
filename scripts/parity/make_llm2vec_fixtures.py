"""Parity fixtures made by the OFFICIAL llm2vec 0.2.3 (PyPI), for tests/test_llm2vec_official.py.

Run with a separate environment that holds the official stack (not the package's), e.g.::

    python3 -m venv /work/venv-llm2vec
    /work/venv-llm2vec/bin/pip install torch==2.13.0            # the CPU wheel; never an unpinned torch
    echo torch==2.13.0 > /tmp/c.txt
    /work/venv-llm2vec/bin/pip install -c /tmp/c.txt transformers==4.44.2 peft==0.12.0 accelerate==0.33.0
    /work/venv-llm2vec/bin/pip install --no-deps llm2vec==0.2.3  # numpy and tqdm come with the above
    /work/venv-llm2vec/bin/python scripts/parity/make_llm2vec_fixtures.py

It rewrites ``tests/fixtures/llm2vec_official/``:

* ``<family>/base/``: a tiny random ``*ForCausalLM`` (float32, tied embeddings), the stand-in for the base LLM
  published under ``BASE_ID`` (no tokenizer: llm2vec and the package take it from the mntp folder).
* ``<family>/mntp/``: llm2vec's published ``-mntp`` layout: the base's ``config.json`` with ``_name_or_path`` =
  ``BASE_ID`` (as the published mntp folders carry it), the tokenizer, and a LoRA adapter (random non-zero A and
  B) whose ``adapter_config.json`` names ``BASE_ID`` as ``base_model_name_or_path`` (as published).
* ``<family>/supervised/``: a second LoRA adapter alone (trained "on top of" the merged mntp model), naming the
  mntp repo id as its base (never read by llm2vec).
* ``embeddings.safetensors`` (one float32 ``(len(CAPTIONS), hidden)`` tensor per case) and ``manifest.json``
  (every case: family, loading, folders, pooling, instruction, embedding key, and what llm2vec fed the
  tokenizer: the ``prepare_for_tokenization`` strings, their token ids and pooled-token counts).

Two ways of loading are recorded, each with the committed folders materialised in a temporary directory:

* ``local``: ``LLM2Vec.from_pretrained(<tmp>/<family>/mntp, peft_model_name_or_path=<tmp>/<family>/supervised)``
  with the mntp adapter's ``base_model_name_or_path`` rewritten to the absolute path of ``<tmp>/<family>/base``
  (a local base, offline). transformers 4.44 then loads config and weights from that path, so its config's
  ``_name_or_path`` is the local path; llm2vec 0.2.3 replaces it by the ``_name_or_path`` of
  ``mntp/config.json`` (``BASE_ID``), which therefore chooses the chat wrapper and eos text, as for a downloaded
  copy of the published folder.
* ``hub`` (``mean`` and ``eos_token`` pooling only: what a name decides): by repo id, from a Hugging Face cache
  built in the temporary directory (``models--org--name/refs/main`` + ``snapshots/<rev>/``) with
  ``HF_HUB_OFFLINE=1``: ``LLM2Vec.from_pretrained(MNTP_ID, peft_model_name_or_path=SUPERVISED_ID)``; the adapter's
  base ``BASE_ID`` resolves from the same cache and its config's ``_name_or_path`` is ``BASE_ID`` (no local folder,
  so llm2vec does not override it). peft 0.12 asks the Hub whether an adapter repo has
  ``adapter_model.safetensors`` even offline; that one question is answered from the cache
  (``answer_file_exists_from_cache``).

Families (each an architecture llm2vec 0.2.3 has a bidirectional class for: Llama, Mistral, Gemma (1), Qwen2):
``llama`` (a base name outside llm2vec's wrapper table), ``llama3`` (``meta-llama/Meta-Llama-3-8B``: the
``<|end_of_text|>`` eos rule), ``llama3-instruct``, ``mistral-instruct``, ``gemma-instruct`` (a GemmaConfig
model named ``google/gemma-2-9b-it``: llm2vec 0.2.3's wrapper table names Gemma-2 but its bidirectional classes
take GemmaConfig only), ``qwen2-instruct``. The mntp folder of ``llama`` also holds an ``llm2vec_config.json``
with ``doc_max_length`` 8, so llm2vec's word cut runs for its mntp-only cases (with a supervised adapter,
llm2vec reads ``llm2vec_config.json`` from the supervised folder, which has none: default 400).

Two properties of the official code show in the fixtures (the manifest records both):

* llm2vec 0.2.3 reads ``llm2vec_config.json`` with ``os.path.exists``, so only from a local folder: loaded by repo
  id, the ``llama`` mntp folder's ``doc_max_length`` 8 is not applied (``local_vs_hub_differences``).
* llm2vec 0.2.3's ``Qwen2BiModel`` does not override ``_update_causal_mask``, so under transformers 4.44.2 it
  attends causally, like the plain ``Qwen2Model`` (``families.<f>.official_attention``, measured here).

Tokenizers are built with the ``tokenizers`` library (BPE trained on a few sentences, the families' special
tokens added) and saved as ``tokenizer.json`` with ``tokenizer_class`` ``PreTrainedTokenizerFast``, which
transformers 4.44 and 5.x both load from that file as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="llm2vec-fixtures-"))
# the Hub cache of the "hub" loading; set before transformers / huggingface_hub read their settings
os.environ["HF_HUB_CACHE"] = str(WORK / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "llm2vec_official"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # the snapshot name in the emulated Hub cache

CAPTIONS = [
    "a red bicycle leaning on a brick wall",
    "two dogs running across a snowy field at dusk while the sun sets behind the hills",
    "a bowl of ramen",
    "the lighthouse on a cliff above a stormy sea",
]
INSTRUCTION = "Given a caption, retrieve a detailed description"
POOLINGS = ["mean", "weighted_mean", "eos_token", "last_token"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOADINGS = ["local", "hub"]
# by repo id, only what the name decides: the wrapper (every pooling) and the eos text (eos_token pooling)
POOLINGS_BY_LOADING = {"local": POOLINGS, "hub": ["mean", "eos_token"]}

# family: base Hub id (decides llm2vec's wrapper), architecture, tokenizer style, special tokens, bos/eos
FAMILIES = {
    "llama": dict(base_id="princeton-nlp/Sheared-LLaMA-1.3B", arch="llama", style="metaspace",
                  specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>",
                  llm2vec_config={"pooling_mode": "mean", "max_length": 512, "doc_max_length": 8,
                                  "skip_instruction": True}),
    "llama3": dict(base_id="meta-llama/Meta-Llama-3-8B", arch="llama", style="bytelevel",
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>"),
    "llama3-instruct": dict(base_id="meta-llama/Meta-Llama-3-8B-Instruct", arch="llama", style="bytelevel",
                            specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>",
                            eos="<|eot_id|>"),
    "mistral-instruct": dict(base_id="mistralai/Mistral-7B-Instruct-v0.2", arch="mistral", style="metaspace",
                             specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>"),
    "gemma-instruct": dict(base_id="google/gemma-2-9b-it", arch="gemma", style="gemma",
                           specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                           bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>"),
    "qwen2-instruct": dict(base_id="Qwen/Qwen2-1.5B-Instruct", arch="qwen2", style="bytelevel",
                           specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                           eos="<|im_end|>", pad="<|endoftext|>"),
}
# Llama-3-Instruct's published tokenizer has eos <|eot_id|>; Meta-Llama-3-8B's <|end_of_text|>. Qwen2-Instruct's
# eos is <|im_end|> (pad <|endoftext|>); llm2vec sets pad = eos either way.


def mntp_id(family: str) -> str:
    return f"llm2vec-fixture/LLM2Vec-{FAMILIES[family]['base_id'].split('/')[1]}-mntp"


def supervised_id(family: str) -> str:
    return mntp_id(family) + "-supervised"


# ----------------------------------------------------------------------------------------------- tokenizers
def corpus() -> list[str]:
    lines = list(CAPTIONS) + [INSTRUCTION, "[INST] user [/INST]", "user\n\nuser\n", "a photo of a dog . , ! ?",
                              "the quick brown fox jumps over the lazy dog", "Given a query retrieve passages",
                              "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 []/\\<>|_-:;'\""]
    return lines * 3


def build_tokenizer(spec: dict, directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = spec["specials"]
    if spec["style"] == "bytelevel":  # Llama-3 / Qwen2: byte-level BPE
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # Llama-2 / Mistral (sentencepiece-like, "▁" prefix on the first word) and Gemma (no prefix)
        tok = Tokenizer(models.BPE(unk_token=spec["unk"]))
        if spec["style"] == "gemma":
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
            tok.decoder = decoders.Replace("▁", " ")
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if spec["bos"] is not None:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024, "clean_up_tokenization_spaces":
              False, "eos_token": spec["eos"], "model_input_names": ["input_ids", "attention_mask"]}
    for key in ("bos", "unk", "pad"):
        if spec.get(key):
            config[f"{key}_token"] = spec[key]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- models
def build_config(spec: dict, vocab_size: int, tokenizer_dir: Path):
    from transformers import AutoTokenizer, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  torch_dtype="float32")
    if spec["arch"] == "llama":
        return LlamaConfig(**common)
    if spec["arch"] == "mistral":
        return MistralConfig(**common, sliding_window=4096)
    if spec["arch"] == "gemma":
        return GemmaConfig(**common, head_dim=8, pad_token_id=tokenizer.pad_token_id)
    return Qwen2Config(**common, use_sliding_window=False)


def bidirectional_base(llm2vec_cls, path: str):
    """The bidirectional base model llm2vec would build (its BiModel class), from a folder with plain weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return llm2vec_cls._get_model_class(config.__class__.__name__, enable_bidirectional=True).from_pretrained(path)


def save_lora(model, directory: Path, seed: int, base_name: str):
    """A LoRA adapter with random non-zero A and B on ``model`` (a base model: keys ``base_model.model.layers...``
    as in the published mntp adapters), saved alone; returns the merged model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                                  init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(str(directory))
    (directory / "README.md").unlink(missing_ok=True)
    config_file = directory / "adapter_config.json"  # peft keeps target_modules as a set: sort it, for stable files
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return peft_model.merge_and_unload()


def build_family(family: str, spec: dict, root: Path, llm2vec_cls) -> None:
    from transformers import AutoModelForCausalLM

    fam = root / family
    build_tokenizer(spec, fam / "mntp")
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(fam / "mntp" / "tokenizer.json")).get_vocab_size()
    config = build_config(spec, vocab, fam / "mntp")
    torch.manual_seed(sorted(FAMILIES).index(family))
    causal = AutoModelForCausalLM.from_config(config)
    causal.save_pretrained(str(fam / "base"), safe_serialization=True)
    (fam / "base" / "generation_config.json").unlink(missing_ok=True)
    # mntp: the base config with _name_or_path = the base's Hub id (as published), tokenizer, adapter on the base
    base_config = json.loads((fam / "base" / "config.json").read_text())
    base_config["_name_or_path"] = spec["base_id"]
    (fam / "mntp" / "config.json").write_text(json.dumps(base_config, indent=2, sort_keys=True) + "\n")
    merged = save_lora(bidirectional_base(llm2vec_cls, str(fam / "base")), fam / "mntp", 100 + len(family),
                       spec["base_id"])
    if "llm2vec_config" in spec:
        (fam / "mntp" / "llm2vec_config.json").write_text(json.dumps(spec["llm2vec_config"], indent=4) + "\n")
    save_lora(merged, fam / "supervised", 200 + len(family), mntp_id(family))


# ----------------------------------------------------------------------------------------------- materialising
def materialise(root: Path, family: str, loading: str, work: Path) -> tuple[str, str]:
    """The (mntp, supervised) names to load for ``loading``, with the committed folders of ``family`` copied
    under ``work``: ``local`` rewrites the mntp adapter's base to the absolute path of the base copy; ``hub``
    lays them out as a Hugging Face cache (``work`` is then HF_HUB_CACHE)."""
    src = root / family
    if loading == "local":
        dst = work / family
        if not dst.exists():
            shutil.copytree(src, dst)
            adapter = dst / "mntp" / "adapter_config.json"
            data = json.loads(adapter.read_text())
            data["base_model_name_or_path"] = str((dst / "base").resolve())
            adapter.write_text(json.dumps(data, indent=2) + "\n")
        return str(dst / "mntp"), str(dst / "supervised")
    for folder, repo_id in (("base", FAMILIES[family]["base_id"]), ("mntp", mntp_id(family)),
                            ("supervised", supervised_id(family))):
        repo = work / ("models--" + repo_id.replace("/", "--"))
        if not repo.exists():
            (repo / "refs").mkdir(parents=True)
            (repo / "refs" / "main").write_text(REVISION)
            shutil.copytree(src / folder, repo / "snapshots" / REVISION)
    return mntp_id(family), supervised_id(family)


# ----------------------------------------------------------------------------------------------- official runs
def answer_file_exists_from_cache() -> None:
    """peft 0.12's ``load_peft_weights`` asks the Hub whether a repo has ``adapter_model.safetensors``
    (``huggingface_hub.file_exists``, a network call that raises under HF_HUB_OFFLINE) before it downloads it. Here
    that question is answered from the emulated cache, as the Hub would answer it for these repos; everything
    else (config, weights, tokenizer, adapters) resolves through the cache by transformers / peft themselves."""
    from huggingface_hub import try_to_load_from_cache
    from peft.utils import save_and_load

    def file_exists(repo_id, filename, revision=None, repo_type=None, token=None):
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type), str)

    save_and_load.file_exists = file_exists


def official_case(llm2vec_cls, mntp: str, supervised: str | None, pooling: str, instruction: str | None):
    model = llm2vec_cls.from_pretrained(mntp, peft_model_name_or_path=supervised, pooling_mode=pooling)
    sentences = [[instruction, c] for c in CAPTIONS] if instruction else list(CAPTIONS)
    with torch.no_grad():
        embeddings = model.encode(sentences, show_progress_bar=False, device="cpu")
    # what encode fed the tokenizer, text by text (encode itself batches them sorted by length)
    converted = [model._convert_to_str(instruction or "", c) for c in CAPTIONS]
    prepared = [model.prepare_for_tokenization(s) for s in converted]
    input_ids, pooled = [], []
    for s in prepared:
        features = model.tokenize([s])
        input_ids.append(features["input_ids"][0].tolist())
        pooled.append(int(features["embed_mask"][0].sum()))
    info = dict(name_or_path=model.model.config._name_or_path, doc_max_length=model.doc_max_length,
                max_length=model.max_length, converted=converted, prepared=prepared, input_ids=input_ids,
                num_pooled=pooled, peft_model=type(model.model).__name__)
    return embeddings.float(), info


def check_merge(llm2vec_cls, mntp_local: str) -> float:
    """Sanity: llm2vec's mntp load (transformers' adapter integration, then PeftModel + merge) equals the base
    with the adapter merged once, as peft does it directly."""
    from peft import PeftModel

    official = llm2vec_cls.from_pretrained(mntp_local).model
    base = json.loads((Path(mntp_local) / "adapter_config.json").read_text())["base_model_name_or_path"]
    manual = PeftModel.from_pretrained(bidirectional_base(llm2vec_cls, base), mntp_local).merge_and_unload()
    ref = manual.state_dict()
    return max((v - ref[k]).abs().max().item() for k, v in official.state_dict().items())


def official_attention(llm2vec_cls, base: str) -> str:
    """Whether llm2vec's bidirectional class for this architecture really attends both ways under the installed
    transformers: its output on a padded batch compared with the plain (causal) ``AutoModel``'s. (llm2vec 0.2.3's
    ``Qwen2BiModel`` does not override ``_update_causal_mask``, so under transformers 4.44.2 it stays causal.)"""
    from transformers import AutoModel

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 5, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        bi = bidirectional_base(llm2vec_cls, base).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        causal = AutoModel.from_pretrained(base).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    return "causal" if (bi - causal)[:, 2:].abs().max().item() < 1e-6 else "bidirectional"


def compact_json(manifest: dict) -> str:
    """JSON with one line per case / tokenization / family (readable, and small enough to commit)."""
    parts = []
    for key, value in manifest.items():
        if isinstance(value, dict) and key in ("families", "tokenizations", "local_vs_hub_differences"):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items())
            parts.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        elif isinstance(value, list) and key == "cases":
            inner = ",\n".join(f"  {json.dumps(v, ensure_ascii=False)}" for v in value)
            parts.append(f" {json.dumps(key)}: [\n{inner}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from importlib.metadata import version

    from llm2vec import LLM2Vec

    answer_file_exists_from_cache()
    versions = {name: version(name) for name in ("llm2vec", "transformers", "peft", "torch", "tokenizers")}
    if versions["llm2vec"] != "0.2.3" or versions["transformers"] != "4.44.2":
        sys.exit(f"Run this with llm2vec 0.2.3 and transformers 4.44.2 (found {versions}).")

    torch.set_num_threads(1)  # tiny models: faster, and the same on any machine
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for family, spec in FAMILIES.items():
        build_family(family, spec, out, LLM2Vec)

    cases, tensors, sanity, attention = [], {}, {}, {}
    for family in FAMILIES:
        for loading in LOADINGS:
            work = WORK / "hub" if loading == "hub" else WORK / "local"
            mntp, supervised = materialise(out, family, loading, work)
            if loading == "local":
                sanity[family] = check_merge(LLM2Vec, mntp)
                attention[family] = official_attention(LLM2Vec, str(out / family / "base"))
            for with_supervised in (False, True):
                for pooling in POOLINGS_BY_LOADING[loading]:
                    for instruction in (None, INSTRUCTION):
                        adapters = "mntp+supervised" if with_supervised else "mntp"
                        case_id = f"{family}/{loading}/{adapters}/{pooling}/" + \
                                  ("instruction" if instruction else "no-instruction")
                        emb, info = official_case(LLM2Vec, mntp, supervised if with_supervised else None,
                                                  pooling, instruction)
                        tensors[case_id] = emb.contiguous()
                        case = dict(id=case_id, family=family, loading=loading, adapters=adapters,
                                    mntp="mntp" if loading == "local" else mntp_id(family),
                                    supervised=("supervised" if loading == "local" else supervised_id(family))
                                    if with_supervised else None,
                                    pooling_mode=pooling, instruction=instruction, embedding_key=case_id,
                                    scale=float(emb.abs().max()))
                        case.update(info)
                        cases.append(case)
                        print(f"{case_id}: name_or_path={info['name_or_path']!r} |emb|max={case['scale']:.3f}")

    # the adapters matter: mntp-only and mntp+supervised differ, so a loader that dropped one would fail
    for case in cases:
        if case["adapters"] == "mntp":
            other = case["id"].replace("/mntp/", "/mntp+supervised/")
            if case["family"] != "llama" or case["instruction"] is not None:
                assert (tensors[case["id"]] - tensors[other]).abs().max() > 1e-2, case["id"]
    # both loadings give the same wrapper and the same numbers (llm2vec's "which name decides"), except where
    # llm2vec_config.json matters: llm2vec 0.2.3 reads it with os.path.exists, so from a local folder only
    local_vs_hub = {}
    for case in cases:
        if case["loading"] == "local":
            hub = next((c for c in cases if c["id"] == case["id"].replace("/local/", "/hub/")), None)
            if hub is None:
                continue
            diff = (tensors[case["id"]] - tensors[hub["id"]]).abs().max().item()
            if case["prepared"] != hub["prepared"] or diff > 1e-6:
                local_vs_hub[case["id"]] = dict(doc_max_length=[case["doc_max_length"], hub["doc_max_length"]],
                                                max_abs_diff=diff)
            if "llm2vec_config" not in FAMILIES[case["family"]]:
                assert case["id"] not in local_vs_hub, case["id"]
    print("local vs hub differences:", json.dumps(local_vs_hub, indent=1))
    # what llm2vec fed the tokenizer, stored once per distinct tokenization and named by the cases
    tokenizations = {}
    for case in cases:
        key = "{}/{}/{}/doc_max_length={}".format(case["family"], "eos" if case["pooling_mode"] == "eos_token"
                                                  else "no-eos", "instruction" if case["instruction"] else
                                                  "no-instruction", case["doc_max_length"])
        entry = {k: case.pop(k) for k in ("converted", "prepared", "input_ids", "num_pooled")}
        assert tokenizations.setdefault(key, entry) == entry, key
        case["tokenization"] = key
    save_file(tensors, str(out / "embeddings.safetensors"))
    manifest = {
        "generator": "scripts/parity/make_llm2vec_fixtures.py",
        "versions": versions,
        "captions": CAPTIONS,
        "instruction": INSTRUCTION,
        "hub_revision": REVISION,
        "families": {f: dict(base_id=s["base_id"], mntp_id=mntp_id(f), supervised_id=supervised_id(f),
                             architecture=s["arch"], official_attention=attention[f],
                             mntp_merge_max_abs_diff_vs_peft=sanity[f])
                     for f, s in FAMILIES.items()},
        "local_vs_hub_differences": local_vs_hub,
        "tokenizations": tokenizations,
        "cases": cases,
    }
    (out / "manifest.json").write_text(compact_json(manifest) + "\n")
    shutil.rmtree(WORK, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {total / 1e6:.2f} MB in {out}")
    print("mntp merge vs plain peft merge, max abs diff per family:", sanity)
    print("attention of llm2vec's model class per family:", attention)


if __name__ == "__main__":
    main()
