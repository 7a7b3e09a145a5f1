"""LLM2CLIPTrainer end to end on tiny models: learning, saving, cache checks, resuming, Hub pushes."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModel, TrainerCallback

from llm2clip_hf import LLM2CLIPModel, LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments, layer_decay_parameter_groups
from llm2clip_hf.data import precompute_text_embeddings

CAPTIONS = ["short_caption", "long_caption"]


def caption_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), stage="caption", per_device_train_batch_size=16, max_steps=20,
                    learning_rate=2e-3, warmup_steps=0, logging_steps=1, save_strategy="no", use_cpu=True,
                    disable_tqdm=True, seed=0)
    settings.update(overrides)
    return LLM2CLIPTrainingArguments(**settings)


def clip_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), stage="clip", per_device_train_batch_size=16, max_steps=30,
                    learning_rate=2e-3, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                    seed=0, layer_decay=0.9)
    settings.update(overrides)
    return LLM2CLIPTrainingArguments(**settings)


def top1_accuracy(queries, keys):
    """Share of queries whose most similar key is the key with the same index."""
    scores = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).t()
    return (scores.argmax(dim=1) == torch.arange(len(queries))).float().mean().item()


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture()
def pairs():
    return Dataset.from_list(tiny_caption_pair_rows())


@pytest.fixture(scope="module")
def images():
    return Dataset.from_list(tiny_image_caption_rows())


@pytest.fixture()
def cached(images, text_model, tmp_path):
    return precompute_text_embeddings(images, text_model, CAPTIONS, output_dir=tmp_path / "cache")


def clip_model(text_model, embed=False):
    torch.manual_seed(0)
    return LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=embed, projection_dim=32)


# ------------------------------------------------------------------------------------------------ stage 1
def test_caption_stage_lowers_loss_and_raises_caption_retrieval(text_model, pairs, tmp_path):
    short, long = list(pairs["short_caption"]), list(pairs["long_caption"])
    before = top1_accuracy(text_model.encode(short), text_model.encode(long))
    trainer = LLM2CLIPTrainer(model=text_model, args=caption_args(tmp_path), train_dataset=pairs)
    trainer.train()
    losses = logged_losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    after = top1_accuracy(text_model.encode(short), text_model.encode(long))
    assert after >= before + 0.25, (before, after)


def test_caption_stage_saves_merged_model_that_reloads_with_remote_code(text_model, pairs, tmp_path):
    trainer = LLM2CLIPTrainer(model=text_model, args=caption_args(tmp_path, max_steps=3), train_dataset=pairs)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "modeling_llm2clip_text.py", "README.md", "tokenizer.json"} <= files
    assert "adapter_model.safetensors" not in files
    assert not [k for k in load_file(out / "model.safetensors") if "lora" in k]
    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    captions = pairs["long_caption"][:6]
    assert torch.allclose(reloaded.encode(captions), trainer.model.get_base_model().encode(captions), atol=1e-5)
    card = (out / "README.md").read_text()
    assert "stage | caption" in card and str(text_model.name_or_path) in card


def test_caption_stage_refuses_wrong_model_and_columns(text_model, pairs, tmp_path, images):
    with pytest.raises(TypeError, match="LLM2CLIPTextModel"):
        LLM2CLIPTrainer(model=clip_model(text_model), args=caption_args(tmp_path), train_dataset=pairs)
    with pytest.raises(ValueError, match=r"\['caption'\].*short_caption"):
        LLM2CLIPTrainer(model=text_model, args=caption_args(tmp_path, caption_columns=["short_caption", "caption"]),
                        train_dataset=pairs)


# ------------------------------------------------------------------------------------------------ stage 2
def test_clip_stage_on_cached_embeddings_learns(text_model, cached, tmp_path):
    model = clip_model(text_model)
    args = clip_args(tmp_path, image_augmentation=False, max_steps=40, learning_rate=5e-4)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=cached, text_model=text_model)

    def in_batch_accuracy():
        batch = trainer.data_collator([dict(row, __llm2clip_row__=i) for i, row in enumerate(cached)])  # evaluation
        batch = {k: v for k, v in batch.items() if not k.startswith("__llm2clip")}  # row indices, statistics
        with torch.no_grad():
            out = model(**batch)
        return top1_accuracy(out.image_embeds, out.text_embeds)

    before = in_batch_accuracy()
    trainer.train()
    losses = logged_losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.4 * sum(losses[:3]) / 3, losses
    assert in_batch_accuracy() >= before + 0.4
    assert model.config.text_model_fingerprint is not None


def test_clip_stage_clamps_logit_scale_after_each_step(text_model, cached, tmp_path):
    model = clip_model(text_model)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above ln(100) = 4.605: an explicit bound (the default would keep 5.0)
    trainer = LLM2CLIPTrainer(model=model, args=clip_args(tmp_path, max_steps=1, logit_scale_max=math.log(100.0)),
                              train_dataset=cached)
    trainer.train()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


@pytest.mark.parametrize("text_source", ["frozen", "lora"])
def test_clip_stage_with_llm_in_the_loop(text_model, images, tmp_path, text_source):
    model = clip_model(text_model, embed=True)
    llm_before = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    args = clip_args(tmp_path, text_source=text_source, max_steps=4, lora_dropout=0.0)
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=images)
    trainer.train()
    trained_llm = {k: v for k, v in model.text_model.state_dict().items() if "lora_" not in k}
    lora = {k: v for k, v in model.text_model.state_dict().items() if "lora_B" in k}
    if text_source == "frozen":
        assert not lora
        assert all(torch.equal(trained_llm[k], v) for k, v in llm_before.items())
    else:
        assert lora and any(v.abs().sum() > 0 for v in lora.values())
    trainer.save_model()
    reloaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    tokens = model.text_model.tokenize(["a red circle", "a photo of a blue square"])
    with torch.no_grad():
        expected = model.get_text_features(**tokens)
        got = reloaded.get_text_features(**tokens)
    assert torch.allclose(got, expected, atol=1e-5)


def test_clip_stage_refuses_cache_of_another_text_model(text_model, cached, tmp_path, tiny_llm_dir):
    other = LLM2CLIPTextModel.from_llm(tiny_llm_dir, pooling_mode="weighted_mean")
    with pytest.raises(ValueError, match="different text model"):
        LLM2CLIPTrainer(model=clip_model(text_model), args=clip_args(tmp_path), train_dataset=cached,
                        text_model=other)
    model = clip_model(text_model)
    model.config.text_model_fingerprint = "0" * 32  # a model trained on another text model's embeddings
    with pytest.raises(ValueError, match="different text model"):
        LLM2CLIPTrainer(model=model, args=clip_args(tmp_path), train_dataset=cached)
    wide = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False)
    wide.config.text_embedding_dim = 2 * text_model.config.hidden_size
    with pytest.raises(ValueError, match="dimensional"):
        LLM2CLIPTrainer(model=wide, args=clip_args(tmp_path), train_dataset=cached)


def test_clip_stage_needs_cache_or_text_encoder(text_model, images, tmp_path):
    with pytest.raises(ValueError, match="no LLM2CLIP embedding cache"):
        LLM2CLIPTrainer(model=clip_model(text_model), args=clip_args(tmp_path), train_dataset=images)
    with pytest.raises(ValueError, match="no embedded text encoder"):
        LLM2CLIPTrainer(model=clip_model(text_model), args=clip_args(tmp_path, text_source="frozen"),
                        train_dataset=images)


def test_precompute_reuses_a_complete_cache_and_refuses_a_foreign_one(text_model, images, tmp_path, tiny_llm_dir,
                                                                      monkeypatch):
    first = precompute_text_embeddings(images, text_model, CAPTIONS, output_dir=tmp_path / "cache")
    expected = text_model.encode(list(images["short_caption"]))
    assert torch.allclose(torch.tensor(first["short_caption_llm_embedding"]), expected, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    monkeypatch.setattr(type(text_model), "encode", lambda *a, **k: pytest.fail("cache was recomputed"))
    again = precompute_text_embeddings(images, text_model, CAPTIONS, output_dir=tmp_path / "cache")
    assert again["short_caption_llm_embedding"] == first["short_caption_llm_embedding"]
    other = LLM2CLIPTextModel.from_llm(tiny_llm_dir, max_length=16)
    with pytest.raises(ValueError, match="different text model"):
        precompute_text_embeddings(images, other, CAPTIONS, output_dir=tmp_path / "cache")


def test_layer_decay_follows_official_layer_ids(text_model):
    model = clip_model(text_model)
    depth = model.config.vision_config.num_hidden_layers
    groups = layer_decay_parameter_groups(model, 1.0, 0.05, 0.5, depth)
    lr_of = {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}
    assert lr_of["vision_model.patch_embed.proj.weight"] == (0.5 ** (depth + 1), 0.05)
    assert lr_of["vision_model.cls_token"] == (0.5 ** (depth + 1), 0.0)
    assert lr_of["vision_model.blocks.0.attn.q_proj.weight"] == (0.5 ** depth, 0.05)
    assert lr_of[f"vision_model.blocks.{depth - 1}.norm1.weight"] == (0.5, 0.0)
    assert lr_of["vision_model.norm.weight"] == (1.0, 0.0)
    assert lr_of["text_adapter.layers.4.weight"][0] == 1.0 and lr_of["logit_scale"] == (1.0, 0.0)


# ------------------------------------------------------------------------------------------------ resume
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("stage", ["caption", "clip"])
def test_interrupted_then_resumed_run_equals_uninterrupted(stage, tiny_llm_dir, pairs, images, tmp_path):
    def run(directory, callbacks=(), resume=None):
        torch.manual_seed(0)
        text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
        common = dict(output_dir=str(directory), max_steps=6, save_strategy="steps", save_steps=3,
                      per_device_train_batch_size=8)
        if stage == "caption":
            model, data, args = text_model, pairs, caption_args(tmp_path, **common)
        else:
            model, data = clip_model(text_model), precompute_text_embeddings(images, text_model, CAPTIONS)
            args = clip_args(tmp_path, **common)
        trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=data, text_model=None,
                                  callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}

    full = run(tmp_path / "full")
    run(tmp_path / "cut", callbacks=[StopAt(3)])
    assert (tmp_path / "cut" / "checkpoint-3").is_dir() and not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed = run(tmp_path / "cut", resume=True)
    assert full.keys() == resumed.keys()
    changed = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not changed, changed[:5]


# ------------------------------------------------------------------------------------------------ hub
class FakeHubApi:
    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        import fnmatch

        files = sorted(
            os.path.relpath(os.path.join(root, name), folder_path)
            for root, _, names in os.walk(folder_path) for name in names
        )
        files = [f for f in files if not any(fnmatch.fnmatch(f, p) or fnmatch.fnmatch(f.split(os.sep)[0], p)
                                             for p in ignore_patterns)]
        self.uploads.append({"repo_id": repo_id, "files": files, "folder": folder_path})
        return "commit"


def test_push_to_hub_uploads_weights_remote_code_processor_and_card(text_model, images, tmp_path, monkeypatch):
    import transformers.trainer

    fake = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: fake)
    args = clip_args(tmp_path, text_source="frozen", max_steps=2, hub_model_id="llm2clip-tiny",
                     save_strategy="steps", save_steps=1)
    trainer = LLM2CLIPTrainer(model=clip_model(text_model, embed=True), args=args, train_dataset=images)
    trainer.train()
    trainer.push_to_hub()
    (upload,) = fake.uploads
    assert upload["repo_id"] == "user/llm2clip-tiny"
    files = set(upload["files"])
    assert {"model.safetensors", "config.json", "modeling_llm2clip.py", "modeling_eva02.py",
            "configuration_llm2clip.py", "processor_config.json", "tokenizer.json", "README.md"} <= files
    assert not [f for f in files if f.startswith("checkpoint-")]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "stage | clip" in card and "text_source | frozen" in card and "| loss |" in card


def test_stage1_runs_query_positive_and_negative_as_one_batch_equal_to_three(tiny_llm_dir, tmp_path):
    """One left-padded forward for the three roles gives each text the embedding of its own role's batch (and of
    encode): padding is masked and the rotary positions are relative. (LoRA starts at zero: the base model.)"""
    text_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir)
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="caption", per_device_train_batch_size=8,
                                     use_cpu=True, report_to="none")
    trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=Dataset.from_list(tiny_caption_pair_rows()))
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    assert batch["roles"] == ["query", "positive", "negative"] and batch["texts"]["input_ids"].shape[0] == 24
    with torch.no_grad():
        together = trainer.model(**batch["texts"]).text_embeds.chunk(3)
        resolved = trainer.args
        queries = [resolved.short_query_instruction if row["query_is_short"] else resolved.long_query_instruction
                   for row in rows]
        apart = [text_model(**text_model.tokenize([row["query"] for row in rows], queries,
                                                  resolved.instruction_separator)).text_embeds,
                 text_model.encode([row["positive"] for row in rows], batch_size=8),
                 text_model.encode([row["negative"] for row in rows], batch_size=8)]
    for role, one, three in zip(batch["roles"], together, apart):
        torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-5, msg=role)


def test_stage1_push_writes_cra_before_and_after_as_model_index(text_model, pairs, tmp_path, monkeypatch):
    """The card's model-index (read by huggingface_hub's own parser) holds the held-out CRA of the model before
    training and of the pushed model, each recomputed here on a separate copy."""
    import copy

    import transformers.trainer
    from huggingface_hub.repocard import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from llm2clip_hf.evaluation import evaluate_caption_retrieval

    held_out = pairs.select(range(16))
    expected_before = evaluate_caption_retrieval(copy.deepcopy(text_model), held_out, CAPTIONS)["cra"]
    fake = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: fake)
    args = caption_args(tmp_path, max_steps=6, hub_model_id="tiny-stage1", per_device_eval_batch_size=8)
    trainer = LLM2CLIPTrainer(model=copy.deepcopy(text_model), args=args, train_dataset=pairs, eval_dataset=held_out)
    trainer.train()
    trainer.save_model()
    trainer.evaluate()
    trainer.push_to_hub()
    expected_after = evaluate_caption_retrieval(LLM2CLIPTextModel.from_pretrained(tmp_path / "out"), held_out,
                                                CAPTIONS)["cra"]
    assert expected_after != expected_before  # otherwise the test could not tell before from after
    name, results = model_index_to_eval_results(metadata_load(tmp_path / "out" / "README.md")["model-index"])
    values = {result.metric_type: result.metric_value for result in results}
    assert name == "tiny-stage1"
    assert values["cra"] == pytest.approx(expected_after, abs=0.01)
    assert values["cra_before_training"] == pytest.approx(expected_before, abs=0.01)
