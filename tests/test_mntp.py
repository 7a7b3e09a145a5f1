"""Stage "mntp" (llm2vec's masked next-token prediction): the collator's masking, the loss against transformers'
own causal-LM loss on the same weights and labels, training, saving, and the CLI path into stage "caption"."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from llm2clip_hf import LLM2CLIPTextModel, load_lm_head
from llm2clip_hf.testing import make_tiny_llm, tiny_caption_pair_rows
from llm2clip_hf.data import MaskedTextCollator
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.data.masked_next_token import LABELS, TEXT, scorable_caption_tokens
from llm2clip_hf.modeling.caption_tokenization import collate_left_padded

TEXTS = ["a red bicycle leaning on a brick wall", "two dogs running across a snowy field at dusk",
         "a bowl of ramen with an egg", "the lighthouse on a cliff above a stormy sea"]


@pytest.fixture(scope="module")
def tied_llm_dir(tmp_path_factory):
    """A tiny causal LM whose output layer is its input embeddings (as SmolLM2's)."""
    return make_tiny_llm(tmp_path_factory.mktemp("tied"), causal_lm=True, tie_word_embeddings=True, add_bos=False)


@pytest.fixture(scope="module")
def untied_llm_dir(tmp_path_factory):
    """A tiny causal LM with its own lm_head (as Llama-3-8B)."""
    return make_tiny_llm(tmp_path_factory.mktemp("untied"), causal_lm=True, seed=3)


def mntp_args(tmp_path, **overrides) -> LLM2CLIPTrainingArguments:
    settings = dict(output_dir=str(tmp_path / "out"), stage="mntp", caption_columns=["short_caption", "long_caption"],
                    per_device_train_batch_size=8, max_steps=2, save_strategy="no", report_to="none",
                    use_cpu=True, disable_tqdm=True, seed=0, lora_dropout=0.0, logging_steps=1)
    settings.update(overrides)
    return LLM2CLIPTrainingArguments(**settings)


def reference_loss(llm_dir, batch) -> torch.Tensor:
    """transformers' LlamaForCausalLM, bidirectional, on the same masked inputs: its loss shifts the labels (the
    label of token i is predicted from the output at i - 1) and averages over the labels that are not -100."""
    reference = LlamaForCausalLM.from_pretrained(llm_dir)
    reference.config.is_causal = False
    reference.model.config.is_causal = False
    return reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch[LABELS]).loss


def our_loss(trainer, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pooling_mask", LABELS)}
    return trainer.compute_loss(trainer.model, inputs)


def test_the_collator_masks_a_fifth_of_the_text_tokens_only(tied_llm_dir):
    text_model = LLM2CLIPTextModel.from_llm(tied_llm_dir, text_template="Caption: {text}")
    tokenizer = text_model.tokenizer
    assert tokenizer.mask_token is None
    torch.manual_seed(0)
    batch = MaskedTextCollator(text_model, mlm_probability=0.2)([{TEXT: t} for t in TEXTS * 25])
    assert tokenizer.mask_token is None  # the encoder's own tokenizer is not changed
    original = text_model.tokenize(TEXTS * 25)
    chosen = batch[LABELS] != -100
    text_tokens = original["pooling_mask"].bool()
    assert not (chosen & ~text_tokens).any()  # never the template ("Caption:"), padding or special tokens
    assert 0.17 < chosen.sum() / text_tokens.sum() < 0.23
    assert torch.equal(batch[LABELS][chosen], original["input_ids"][chosen])
    blank = tokenizer.convert_tokens_to_ids("_")
    replaced = (batch["input_ids"][chosen] == blank).float().mean()
    assert 0.72 < replaced < 0.88  # 80 % mask token, 10 % random, 10 % kept
    assert torch.equal(batch["input_ids"][~chosen], original["input_ids"][~chosen])


def test_labels_are_caption_tokens_with_a_real_previous_position(tied_llm_dir):
    """No BOS token (as SmolLM2): a left-padded row's first token would be predicted from padding, and the longest
    row's from nothing; a template's tokens (here the suffix " [END]") are no caption. Checked against the caption
    tokenized alone, and over masked batches: no label ever sits after padding, at position 0, or on the template."""
    tokenizer = LLM2CLIPTextModel.from_llm(tied_llm_dir).tokenizer
    assert tokenizer.bos_token_id is None or tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id
    for template, first_scored in ((None, 1), ("Caption: {text} [END]", 0)):
        text_model = LLM2CLIPTextModel.from_llm(tied_llm_dir, text_template=template)
        items = text_model.tokenize_items(TEXTS, caption_spans=True)
        batch = collate_left_padded(items, tokenizer.pad_token_id)
        scorable = scorable_caption_tokens(items, batch["attention_mask"])
        for row, text in enumerate(TEXTS):
            alone = tokenizer(text, add_special_tokens=False)["input_ids"]
            scored = tokenizer.decode(batch["input_ids"][row][scorable[row]])
            assert scored.strip() == tokenizer.decode(alone[first_scored:]).strip(), (template, scored)
        collator = MaskedTextCollator(text_model, mlm_probability=0.5)
        torch.manual_seed(0)
        for _ in range(20):
            batch = collator([{TEXT: t} for t in TEXTS])
            chosen = batch[LABELS] != -100
            assert not chosen[:, 0].any()
            assert not (chosen[:, 1:] & (batch["attention_mask"][:, :-1] == 0)).any()
            if template:
                end = tokenizer(" [END]", add_special_tokens=False)["input_ids"]
                assert not chosen[:, -len(end):].any()


def test_a_mask_token_outside_the_vocabulary_is_refused(tied_llm_dir):
    text_model = LLM2CLIPTextModel.from_llm(tied_llm_dir)
    with pytest.raises(ValueError, match="not one token"):
        MaskedTextCollator(text_model, mask_token="<no such token>")


def test_mntp_loss_equals_transformers_causal_lm_loss_with_tied_embeddings(tied_llm_dir, tmp_path):
    text_model = LLM2CLIPTextModel.from_llm(tied_llm_dir)
    trainer = LLM2CLIPTrainer(model=text_model, args=mntp_args(tmp_path),
                              train_dataset=Dataset.from_list(tiny_caption_pair_rows()[:16]))
    torch.manual_seed(1)
    batch = trainer.data_collator([{TEXT: t} for t in TEXTS])
    assert (batch[LABELS] != -100).sum() > 0
    expected = reference_loss(tied_llm_dir, batch)
    torch.testing.assert_close(our_loss(trainer, batch), expected, rtol=1e-5, atol=1e-6)


def test_an_untied_llm_needs_its_lm_head_which_load_lm_head_reads(untied_llm_dir, tmp_path):
    text_model = LLM2CLIPTextModel.from_llm(untied_llm_dir)
    data = Dataset.from_list(tiny_caption_pair_rows()[:16])
    with pytest.raises(ValueError, match="load_lm_head"):
        LLM2CLIPTrainer(model=text_model, args=mntp_args(tmp_path), train_dataset=data)
    head = load_lm_head(str(untied_llm_dir))
    reference_head = LlamaForCausalLM.from_pretrained(untied_llm_dir).lm_head.weight
    assert torch.equal(head.weight, reference_head) and not head.weight.requires_grad
    assert not torch.equal(head.weight, text_model.get_input_embeddings().weight[: head.weight.shape[0]])
    trainer = LLM2CLIPTrainer(model=text_model, args=mntp_args(tmp_path), train_dataset=data, lm_head=head)
    torch.manual_seed(2)
    batch = trainer.data_collator([{TEXT: t} for t in TEXTS])
    torch.testing.assert_close(our_loss(trainer, batch), reference_loss(untied_llm_dir, batch), rtol=1e-5, atol=1e-6)


def test_load_lm_head_refuses_a_checkpoint_without_one_from_its_files_alone(tied_llm_dir, tmp_path, monkeypatch):
    """make_tiny_llm saves the base model (no next-token head) with untied embeddings in its config: transformers
    would build a random head and only log it; load_lm_head names the problem instead, and tells it apart from a
    tied head, from the safetensors listing and the config without loading the model (an 8B one is 15 GB)."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    folder = make_tiny_llm(tmp_path / "base-only")
    assert not LlamaConfig.from_pretrained(folder).tie_word_embeddings
    with pytest.raises(ValueError, match="no lm_head weights"):
        load_lm_head(str(folder))
    assert LlamaConfig.from_pretrained(tied_llm_dir).tie_word_embeddings
    with pytest.raises(ValueError, match="no separate lm_head"):
        load_lm_head(str(tied_llm_dir))


def test_mntp_trains_lora_only_and_saves_a_text_model_for_stage_caption(tied_llm_dir, tmp_path):
    text_model = LLM2CLIPTextModel.from_llm(tied_llm_dir)
    before = {k: v.clone() for k, v in text_model.state_dict().items()}
    data = Dataset.from_list(tiny_caption_pair_rows()[:32])
    trainer = LLM2CLIPTrainer(model=text_model, args=mntp_args(tmp_path, max_steps=6, learning_rate=1e-2),
                              train_dataset=data)
    assert len(trainer.train_dataset) == 64  # one row per caption of both columns
    trainer.train()
    trainer.save_model()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    saved = LLM2CLIPTextModel.from_pretrained(tmp_path / "out")
    assert saved.config.bidirectional and saved.tokenizer.mask_token is None
    changed = [k for k, v in saved.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("proj" in k for k in changed)  # the LoRA'd projections, merged; embeddings untouched
    card = (tmp_path / "out" / "README.md").read_text()
    assert "masked next-token prediction" in card and "mlm_probability" in card
    caption = LLM2CLIPTrainer(model=saved, args=mntp_args(tmp_path / "c", stage="caption", max_steps=1),
                              train_dataset=data)
    caption.train()


def test_cli_mntp_then_caption_stage_from_its_output(untied_llm_dir, tmp_path, capsys):
    """`train --stage mntp` on an LLM with its own lm_head (read by load_lm_head), then `train --stage caption`
    with the MNTP output as --text-model."""
    import json

    from llm2clip_hf.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny_caption_pair_rows()[:24]))
    common = ["--dataset", str(data), "--max-steps", "2", "--per-device-train-batch-size", "8", "--use-cpu",
              "--save-strategy", "no", "--report-to", "none"]
    assert main(["train", "--stage", "mntp", "--text-model", str(untied_llm_dir), "--output-dir",
                 str(tmp_path / "mntp"), "--caption-columns", "short_caption", "long_caption", *common]) == 0
    mntp = LLM2CLIPTextModel.from_pretrained(tmp_path / "mntp")
    original = LLM2CLIPTextModel.from_llm(untied_llm_dir)
    assert any(not torch.equal(v, original.state_dict()[k]) for k, v in mntp.state_dict().items())
    assert main(["train", "--stage", "caption", "--text-model", str(tmp_path / "mntp"), "--output-dir",
                 str(tmp_path / "caption"), *common]) == 0
    metrics = json.loads((tmp_path / "caption" / "metrics.json").read_text())
    assert metrics["stage"] == "caption"
    capsys.readouterr()
