"""LLaVA's first stage, feature alignment, on the demo's towers: the LLM2CLIP model card's Llava 1.5 claim in
miniature (``llm2clip-hf demo --llava-alignment``).

A transformers ``LlavaForConditionalGeneration`` joins a frozen vision tower (its second-to-last hidden state, patch
tokens, as LLaVA-1.5 reads CLIP) and a frozen causal LLM (SmolLM2-135M-Instruct) through LLaVA's 2-layer MLP
projector; only the projector trains, with the next-token loss on each training image's English name, through
transformers' ``Trainer``. Held-out images are then scored two ways: the perplexity of their names, and a choice
accuracy: the true name ranked by mean log-likelihood per token among ``choices`` names (the others drawn from the
held-out set; ties are misses).
Each tower (the stage-2 CLIPs of both teachers, and an untrained tower as the floor) is aligned once per seed with
the same projector initialisation and batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, Trainer,
                          TrainingArguments)

from ..modeling import image_processor_for

IMAGE_TOKEN = "<image>"
NAME = "name"
TIE_NATS = 1e-5  # mean log-likelihoods per token closer than this are a tie


def load_causal_lm(text_model: str | None, smoke: bool, out: Path):
    """The LLM of the Llava (a causal LM with its output layer) and its tokenizer: SmolLM2-135M-Instruct (offline
    GGUF asset) by default, ``text_model`` if given, a tiny random Llama in smoke runs."""
    if smoke and text_model is None:
        from ..testing import make_tiny_llm

        path, kwargs = make_tiny_llm(out / "tiny_causal_llm", causal_lm=True), {}
    elif text_model is None:
        from ..conversion.assets import smollm2_gguf

        directory, gguf = smollm2_gguf()
        path, kwargs = directory, {"gguf_file": gguf}
    else:
        path, kwargs = text_model, {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path, **kwargs)


class LlavaAlignment:
    """One Llava around a frozen causal LLM, reused for every tower and seed: the tower's weights are loaded and
    the projector re-initialised (from the seed) before each run."""

    def __init__(self, vision_config: Any, causal_lm, tokenizer) -> None:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        causal_lm.resize_token_embeddings(len(tokenizer))
        config = LlavaConfig(vision_config=vision_config, text_config=causal_lm.config,
                             image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        self.model = LlavaForConditionalGeneration(config)
        self.model.model.language_model = causal_lm.model  # the loaded LLM, not a second random copy
        self.model.lm_head = causal_lm.lm_head
        self.image_processor = image_processor_for(vision_config)
        self.num_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
        self.model.requires_grad_(False)

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``IMAGE_TOKEN`` x patches, then the name and the end-of-sequence token; labels only on the name (and
        eos), right-padded."""
        prefix = [self.model.config.image_token_id] * self.num_image_tokens
        texts = [self.tokenizer(row[NAME], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                 for row in rows]
        width = len(prefix) + max(len(text) for text in texts)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, text in enumerate(texts):
            length = len(prefix) + len(text)
            input_ids[index, :length] = torch.tensor(prefix + text)
            labels[index, len(prefix):length] = torch.tensor(text)
            attention_mask[index, :length] = 1
        pixels = self.image_processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixels}

    def align(self, tower_state: dict[str, torch.Tensor], seed: int, train: Dataset, steps: int, batch_size: int,
              learning_rate: float, output_dir: Path) -> list[float]:
        """Load the tower, re-initialise the projector from ``seed`` and train it alone; returns the losses."""
        self.model.model.vision_tower.load_state_dict(tower_state)
        projector = self.model.model.multi_modal_projector
        torch.manual_seed(seed)
        for layer in (projector.linear_1, projector.linear_2):
            layer.reset_parameters()
        projector.requires_grad_(True)
        args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                                 lr_scheduler_type="cosine", weight_decay=0.0, seed=seed, data_seed=seed,
                                 logging_steps=max(1, steps // 10), save_strategy="no", report_to="none",
                                 remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True,
                                 dataloader_pin_memory=torch.accelerator.is_available())  # no CPU-only warning
        trainer = Trainer(model=self.model, args=args, train_dataset=train, data_collator=self.collate)
        trainer.train()
        projector.requires_grad_(False)
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    @torch.no_grad()
    def name_log_likelihoods(self, rows: Sequence[dict[str, Any]], names: Sequence[str]) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """Per row, the summed log-likelihood of ``names[i]`` (and eos) given its image, and its token count."""
        self.model.eval()
        batch = self.collate([{**row, NAME: name} for row, name in zip(rows, names)])
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (log_probs * scored).sum(dim=1), scored.sum(dim=1)

    def evaluate(self, test: Dataset, choices: int, seed: int, batch_size: int = 16) -> dict[str, float]:
        """Held-out name perplexity (per token) and choice accuracy among ``choices`` names (in percent; names are
        scored by mean log-likelihood per token, and the true name must score above every distractor, a tie is a
        miss; the distractors are drawn per image from ``seed``,
        the same for every tower)."""
        rows = [test[i] for i in range(len(test))]
        names = [row[NAME] for row in rows]
        total, tokens = 0.0, 0
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            summed, count = self.name_log_likelihoods(part, [row[NAME] for row in part])
            total, tokens = total + float(summed.sum()), tokens + int(count.sum())
        generator = torch.Generator().manual_seed(seed)
        correct = 0
        for index, row in enumerate(rows):
            others = [i for i in torch.randperm(len(rows), generator=generator).tolist() if names[i] != names[index]]
            candidates = [names[index]] + [names[i] for i in others[:choices - 1]]
            summed, count = self.name_log_likelihoods([row] * len(candidates), candidates)
            scores = summed.double() / count  # per token: a summed score would favour short names whatever the image
            # a tie (within TIE_NATS, float rounding of equal per-token scores) is a miss: equal scores rank nothing
            correct += bool(scores[0] > scores[1:].max() + TIE_NATS)
        return {"name_perplexity": math.exp(-total / tokens), "choice_accuracy": 100.0 * correct / len(rows)}


def untrained_tower_state(vision_config: Any, seed: int) -> dict[str, torch.Tensor]:
    """The floor: a tower of the same architecture, never trained (initialised from ``seed``)."""
    from ..modeling.modeling_llm2clip import build_vision_tower

    torch.manual_seed(seed)
    tower = build_vision_tower(vision_config)
    if hasattr(tower, "post_init"):
        tower.post_init()
    return {name: tensor.detach().clone() for name, tensor in tower.state_dict().items()}


__all__ = ["IMAGE_TOKEN", "LlavaAlignment", "load_causal_lm", "untrained_tower_state"]
