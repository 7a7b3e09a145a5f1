import pytest
import torch
from transformers import AutoModel, AutoTokenizer, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

from llm2clip_hf import TEXT_TEMPLATES, LLM2CLIPModel, LLM2CLIPProcessor, LLM2CLIPTextConfig, LLM2CLIPTextModel
from llm2clip_hf.modeling.caption_tokenization import tokenize_texts
from llm2clip_hf.modeling.llm2vec_naming import llm2vec_eos_text
from llm2clip_hf.modeling.processing_llm2clip import clip_image_processor
from llm2clip_hf.testing import _CORPUS, tiny_vision_config
from reference_impl import llm2vec_cut_text, llm2vec_encode, llm2vec_prepare_for_tokenization

INSTRUCTION = "Given a sentence, retrieve a detailed relevant sentence"


def _reference_llm(path, bidirectional=True):
    llm = AutoModel.from_pretrained(path).eval()
    llm.config.is_causal = not bidirectional
    return llm


def test_attention_is_bidirectional(text_model):
    ids = torch.tensor([[5, 17, 42, 9, 33, 21]])
    changed = ids.clone()
    changed[0, 4] = 77
    with torch.no_grad():
        a = text_model.llm(input_ids=ids).last_hidden_state
        b = text_model.llm(input_ids=changed).last_hidden_state
    assert (a[0, 1] - b[0, 1]).abs().max() > 1e-4  # a later token changes an earlier token's state


def test_causal_control_does_not_see_the_future(tiny_llm_dir):
    causal = LLM2CLIPTextModel.from_llm(tiny_llm_dir, bidirectional=False)
    ids = torch.tensor([[5, 17, 42, 9, 33, 21]])
    changed = ids.clone()
    changed[0, 4] = 77
    with torch.no_grad():
        a, b = (causal.llm(input_ids=x).last_hidden_state for x in (ids, changed))
    torch.testing.assert_close(a[0, :4], b[0, :4])


def test_padding_does_not_change_embeddings(text_model, captions):
    together = text_model.encode(captions, batch_size=len(captions))
    alone = torch.cat([text_model.encode([c]) for c in captions])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean"])
@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
@pytest.mark.parametrize("bos", [True, False])
def test_encode_equals_llm2vec_semantics(tiny_llm_dir, tiny_llm_nobos_dir, captions, pooling_mode, instruction, bos):
    path = tiny_llm_dir if bos else tiny_llm_nobos_dir
    model = LLM2CLIPTextModel.from_llm(path, pooling_mode=pooling_mode)
    got = model.encode(captions, instruction=instruction, batch_size=2)
    expected = llm2vec_encode(_reference_llm(path), AutoTokenizer.from_pretrained(path), captions,
                              instruction=instruction, pooling_mode=pooling_mode)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_template_wraps_text_and_pools_caption_plus_suffix(tiny_llm_dir, captions):
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, text_template="llama-3-instruct")
    assert model.config.text_template == TEXT_TEMPLATES["llama-3-instruct"]
    got = model.encode(captions, instruction=INSTRUCTION)
    expected = llm2vec_encode(_reference_llm(tiny_llm_dir), AutoTokenizer.from_pretrained(tiny_llm_dir), captions,
                              instruction=INSTRUCTION, template=TEXT_TEMPLATES["llama-3-instruct"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    batch = model.tokenize(["a dog"])
    eot = model.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pooled = batch["input_ids"][batch["pooling_mask"].bool()].tolist()
    assert pooled == model.tokenizer("a dog", add_special_tokens=False)["input_ids"] + [eot]


def test_pooling_excludes_instruction_and_padding(text_model, captions):
    # llm2vec's rule pools as many trailing tokens as the caption has when tokenized alone. With byte-level
    # BPE a first word can split differently alone ("the" vs " the"), moving the boundary by a token exactly as
    # in the official code; these captions start with words whose count does not change.
    captions = [c for c in captions if c.split()[0] in ("a", "two")]
    batch = text_model.tokenize(captions, instruction=INSTRUCTION)
    for row, caption in enumerate(captions):
        pooled_ids = batch["input_ids"][row][batch["pooling_mask"][row].bool()].tolist()
        # llm2vec counts the caption's tokens alone; in context its first word carries the joining space.
        assert len(pooled_ids) == len(text_model.tokenizer(caption, add_special_tokens=False)["input_ids"])
        assert text_model.tokenizer.decode(pooled_ids).strip() == caption
        assert not (batch["pooling_mask"][row].bool() & ~batch["attention_mask"][row].bool()).any()
    with torch.no_grad():
        hidden = text_model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        embeds = text_model(**batch).text_embeds
    row = 1
    n = int(batch["pooling_mask"][row].sum())
    torch.testing.assert_close(embeds[row], hidden[row, -n:].mean(0))


def test_last_token_and_eos_pooling(tiny_llm_dir):
    last = LLM2CLIPTextModel.from_llm(tiny_llm_dir, pooling_mode="last_token")
    batch = last.tokenize(["a dog", "a photo of a cat"])
    with torch.no_grad():
        hidden = last.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(last(**batch).text_embeds, hidden[:, -1])
    eos = LLM2CLIPTextModel.from_llm(tiny_llm_dir, pooling_mode="eos_token")
    batch = eos.tokenize(["a dog", "a photo of a cat"])
    assert (batch["input_ids"][:, -1] == eos.tokenizer.eos_token_id).all()


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
@pytest.mark.parametrize("bos", [True, False])
def test_eos_pooling_equals_llm2vec(tiny_llm_dir, tiny_llm_nobos_dir, captions, instruction, bos):
    """llm2vec appends the *text* " </s>" for Llama configs (not the eos id): the pooled last token and the
    truncation follow from that string."""
    path = tiny_llm_dir if bos else tiny_llm_nobos_dir
    model = LLM2CLIPTextModel.from_llm(path, pooling_mode="eos_token")
    assert model.config.eos_text == " </s>"
    texts = captions + [" trailing spaces  "]
    got = model.encode(texts, instruction=instruction, batch_size=2)
    expected = llm2vec_encode(_reference_llm(path), AutoTokenizer.from_pretrained(path), texts,
                              instruction=instruction, pooling_mode="eos_token")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config_class", [LlamaConfig, MistralConfig, Qwen2Config, GemmaConfig])
@pytest.mark.parametrize("name", [None, "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"])
def test_eos_text_follows_llm2vec_for_each_architecture(config_class, name):
    config = config_class()
    prepared = llm2vec_prepare_for_tokenization("a dog ", "eos_token", config, name)
    if name == "meta-llama/Meta-Llama-3-8B-Instruct":  # its chat wrapper, which our text_template preset gives
        assert llm2vec_eos_text(config.model_type, name) == "" and prepared.endswith("a dog<|eot_id|>")
    else:
        eos_text = llm2vec_eos_text(config.model_type, name)
        assert prepared == ("a dog" + eos_text if eos_text else "a dog ")  # stripped only where text is appended


def test_encode_keeps_input_order_and_returns_fp32_cpu(text_model, captions):
    embeddings = text_model.encode(captions, batch_size=2)
    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    for index in (0, 2, 4):
        torch.testing.assert_close(embeddings[index], text_model.encode([captions[index]])[0], rtol=0, atol=1e-5)


def test_plain_tokenizer_inputs_are_retokenized_like_encode(tiny_llm_dir, captions):
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, text_template="llama-3-instruct")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    tokenizer.padding_side = "right"
    tokenizer.pad_token = tokenizer.eos_token
    plain = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).text_embeds
    torch.testing.assert_close(got, model.encode(captions), rtol=0, atol=1e-5)


def test_save_and_reload_round_trip(text_model, captions, tmp_path):
    text_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.encode(captions), text_model.encode(captions), rtol=0, atol=1e-6)
    assert reloaded.config.llm_config.is_causal is False


def test_from_llm_refuses_a_saved_text_model(text_model, tmp_path):
    text_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_pretrained"):
        LLM2CLIPTextModel.from_llm(tmp_path)


def test_official_llama_bi_model_checkpoint_loads_into_llama(tiny_llm_dir, tmp_path, captions):
    import json
    import shutil

    shutil.copytree(tiny_llm_dir, tmp_path / "bi", dirs_exist_ok=True)
    config = json.loads((tmp_path / "bi" / "config.json").read_text())
    config["architectures"] = ["LlamaBiModel"]
    config["auto_map"] = {"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"}
    (tmp_path / "bi" / "config.json").write_text(json.dumps(config))
    model = LLM2CLIPTextModel.from_llm(tmp_path / "bi")
    assert type(model.llm).__name__ == "LlamaModel"
    torch.testing.assert_close(model.encode(captions), LLM2CLIPTextModel.from_llm(tiny_llm_dir).encode(captions))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"pooling_mode": "max"}, "Unknown pooling_mode 'max'"),
        ({"text_template": "no placeholder"}, "exactly once"),
        ({"max_length": 1}, "max_length"),
        ({"doc_max_length": 0}, "doc_max_length must be None .* or a positive integer"),
        ({"doc_max_length": 400.0}, "doc_max_length must be None .* or a positive integer"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM2CLIPTextConfig(**kwargs)


def test_bad_texts_are_refused_naming_the_entry(text_model):
    with pytest.raises(ValueError, match="index 1 is empty"):
        text_model.encode(["a dog", "   "])
    with pytest.raises(TypeError, match="index 0 is NoneType"):
        text_model.encode([None])
    with pytest.raises(ValueError, match="2 instructions for 1 texts"):
        tokenize_texts(text_model.tokenizer, ["a"], ["x", "y"])


def test_missing_tokenizer_is_explained(text_model):
    text_model.tokenizer = None
    with pytest.raises(ValueError, match="has no tokenizer"):
        text_model.encode(["a dog"])


# ------------------------------------------------------------------------ upstream llm2vec doc_max_length word cut
# 600 words the tiny tokenizer knows (about 1,100 tokens): past max_length=512, so the count the cut starts from
# is the truncated 512 and the cut takes several rounds, as upstream's does.
LONG_CAPTION = " ".join(_CORPUS.split()[i % len(_CORPUS.split())] for i in range(600))
# A short caption (unchanged by the cut, spaces kept) and a long one with irregular spacing (re-joined by " ").
DOC_CAPTIONS = [LONG_CAPTION, "a  dog runs on green grass ", "two people walk\n" + LONG_CAPTION.replace(" of ", "  of ")]


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_doc_max_length_400_equals_upstream_llm2vec(tiny_llm_dir, instruction):
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=512, doc_max_length=400)
    assert model.config.doc_max_length == 400
    got = model.encode(DOC_CAPTIONS, instruction=instruction, batch_size=2)
    expected = llm2vec_encode(_reference_llm(tiny_llm_dir), AutoTokenizer.from_pretrained(tiny_llm_dir), DOC_CAPTIONS,
                              instruction=instruction, max_length=512, doc_max_length=400)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The cut matters here: without it (LLM2CLIP's setting) the long captions embed differently.
    model.config.doc_max_length = None
    uncut = model.encode(DOC_CAPTIONS, instruction=instruction, batch_size=2)
    assert (got[0] - uncut[0]).abs().max() > 1e-3 and (got[2] - uncut[2]).abs().max() > 1e-3
    torch.testing.assert_close(got[1], uncut[1], rtol=0, atol=1e-5)


def test_doc_max_length_none_equals_llm2clip_setting_512(tiny_llm_dir):
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=512)
    assert model.config.doc_max_length is None
    got = model.encode(DOC_CAPTIONS, instruction=INSTRUCTION, batch_size=2)
    expected = llm2vec_encode(_reference_llm(tiny_llm_dir), AutoTokenizer.from_pretrained(tiny_llm_dir), DOC_CAPTIONS,
                              instruction=INSTRUCTION, max_length=512, doc_max_length=512)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_doc_max_length_tokens_are_those_of_the_cut_text(text_model):
    tokenizer = text_model.tokenizer
    cut = llm2vec_cut_text(tokenizer, LONG_CAPTION, max_length=512, doc_max_length=400)
    count = len(tokenizer(cut, add_special_tokens=False)["input_ids"])
    assert count <= 400 and len(cut.split()) < 600
    # A single round from the truncated count would keep int(600 * 400 / 512) = 468 words, still too long.
    assert len(tokenizer(" ".join(LONG_CAPTION.split()[:468]), add_special_tokens=False)["input_ids"]) > 400
    items = tokenize_texts(tokenizer, [LONG_CAPTION, "a  dog "], max_length=512, doc_max_length=400)
    assert items[0].input_ids == tokenizer(cut)["input_ids"] and items[0].num_pooled == count
    assert items[1].input_ids == tokenizer("a  dog ")["input_ids"]
    # doc_max_length >= max_length can never trigger (the count is truncated at max_length).
    for limit in (None, 512, 600):
        items = tokenize_texts(tokenizer, [LONG_CAPTION], max_length=512, doc_max_length=limit)
        assert items[0].input_ids == tokenizer(LONG_CAPTION, truncation=True, max_length=512)["input_ids"]


def test_doc_max_length_refuses_a_cut_to_nothing(text_model):
    with pytest.raises(ValueError, match="cut to no words by doc_max_length=3"):
        tokenize_texts(text_model.tokenizer, ["a", "sunset" * 10], doc_max_length=3)


def test_doc_max_length_config_round_trip(tiny_llm_dir, tmp_path):
    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, doc_max_length=400)
    model.save_pretrained(tmp_path)
    assert LLM2CLIPTextConfig.from_pretrained(tmp_path).doc_max_length == 400
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path)
    assert reloaded.config.doc_max_length == 400
    torch.testing.assert_close(reloaded.encode(DOC_CAPTIONS), model.encode(DOC_CAPTIONS), rtol=0, atol=1e-6)
    assert LLM2CLIPTextConfig().doc_max_length is None


def test_doc_max_length_processor_round_trip(tiny_llm_dir, tmp_path):
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, doc_max_length=400)
    expected = text_model.tokenize(DOC_CAPTIONS, instruction=INSTRUCTION)
    # Built by LLM2CLIPModel.build_processor and saved with the model.
    clip = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config())
    assert clip.build_processor().doc_max_length == 400
    clip.save_pretrained(tmp_path / "clip")
    assert LLM2CLIPModel.from_pretrained(tmp_path / "clip").config.text_config.doc_max_length == 400
    # Built directly, saved and loaded alone.
    direct = LLM2CLIPProcessor(clip_image_processor(32), text_model.tokenizer, doc_max_length=400)
    direct.save_pretrained(tmp_path / "direct")
    for path in (tmp_path / "clip", tmp_path / "direct"):
        processor = LLM2CLIPProcessor.from_pretrained(path)
        assert processor.doc_max_length == 400
        batch = processor(text=DOC_CAPTIONS, instruction=INSTRUCTION)
        for key in ("input_ids", "attention_mask", "pooling_mask"):
            assert torch.equal(batch[key], expected[key]), key
    assert LLM2CLIPProcessor(clip_image_processor(32), text_model.tokenizer).doc_max_length is None
    with pytest.raises(ValueError, match="doc_max_length"):
        LLM2CLIPProcessor(clip_image_processor(32), text_model.tokenizer, doc_max_length=-1)


def test_a_config_saved_before_eos_text_keeps_appending_the_eos_id(tiny_llm_dir, tmp_path, captions):
    """Issue 33 item 3: an eos_token encoder saved before eos_text existed (its config has neither eos_text nor
    config_version) appended the tokenizer's eos id after truncating to max_length - 1; it must keep doing so,
    through the text model and through the processor saved with it, and be migrated to config_version 2."""
    import json

    from llm2clip_hf import LLM2CLIPProcessor
    from llm2clip_hf.modeling.configuration_llm2clip_text import CONFIG_VERSION

    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, pooling_mode="eos_token", max_length=12)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config_version"] == CONFIG_VERSION
    old = {k: v for k, v in config.items() if k not in ("eos_text", "config_version", "append_eos_token_id")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    reloaded = LLM2CLIPTextModel.from_pretrained(tmp_path)
    assert reloaded.config.append_eos_token_id and reloaded.config.config_version == CONFIG_VERSION
    batch = reloaded.tokenize(captions)
    eos_id = reloaded.tokenizer.eos_token_id
    assert (batch["input_ids"][:, -1] == eos_id).all() and batch["input_ids"].shape[1] <= 12
    # the old rule by hand: the caption tokens cut at max_length - 1, then the eos id, pooled with the tail
    ids = reloaded.tokenizer(captions[2], truncation=True, max_length=11)["input_ids"] + [eos_id]
    assert batch["input_ids"][2, -len(ids):].tolist() == ids
    from llm2clip_hf.modeling.processing_llm2clip import clip_image_processor

    processor = LLM2CLIPProcessor(clip_image_processor(32), reloaded.tokenizer, pooling_mode="eos_token",
                                  max_length=12)
    processor_dict = processor.to_dict()
    processor_dict = {k: v for k, v in processor_dict.items() if k not in ("eos_text", "config_version",
                                                                            "append_eos_token_id", "tokenizer")}
    migrated = LLM2CLIPProcessor.from_dict(processor_dict, image_processor=clip_image_processor(32),
                                           tokenizer=reloaded.tokenizer)
    assert migrated.append_eos_token_id
    torch.testing.assert_close(migrated(text=captions)["input_ids"], batch["input_ids"], rtol=0, atol=0)


def test_a_config_from_a_newer_release_is_refused(tiny_llm_dir, tmp_path):
    import json

    model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "config_version": 99}))
    with pytest.raises(ValueError, match="newer llm2clip-hf"):
        LLM2CLIPTextModel.from_pretrained(tmp_path)
