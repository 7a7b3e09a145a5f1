"""``LLM2CLIPTrainer``: both LLM2CLIP stages on transformers' Trainer (Accelerate, checkpoints, Hub)."""

from __future__ import annotations

import os
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import Trainer, TrainerCallback

from ..modeling import LLM2CLIPModel, LLM2CLIPTextModel
from .caption_pairs import QUERY, CaptionPairCollator, build_caption_pairs, require_columns
from .clip_data import ROW_INDEX, CLIPCollator
from .embedding_cache import check_embedding_cache, text_model_fingerprint
from .image_transforms import CLIPImageTransform
from .layer_decay import layer_decay_parameter_groups
from .losses import CaptionContrastiveLoss, CLIPContrastiveLoss
from .model_card import build_model_card
from .training_args import CAPTION_STAGE, CLIP_STAGE, LLM2CLIPTrainingArguments


class LogitScaleClampCallback(TrainerCallback):
    """Clamp ``logit_scale`` to ``[0, max_value]`` right after every optimizer step, as the official training does."""

    def __init__(self, model: LLM2CLIPModel, max_value: float) -> None:
        self.model, self.max_value = model, max_value

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.max_value)


class EpochCallback(TrainerCallback):
    """Tells the stage-2 collator which epoch it is drawing captions and crops for."""

    def __init__(self, collator: CLIPCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of ``module`` with every LoRA adapter merged into its base weight and the LoRA keys removed."""
    lora_layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    for layer in lora_layers:
        layer.merge()
    try:
        state = {}
        for key, value in module.state_dict().items():
            if "lora_" in key:
                continue
            if ".base_layer." in key:
                key, value = key.replace(".base_layer.", "."), value.clone()
            state[key] = value
    finally:
        for layer in lora_layers:
            layer.unmerge()
    return state


def default_lora_config(args: LLM2CLIPTrainingArguments) -> LoraConfig:
    """The official LoRA: r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up and down projections."""
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.lora_target_modules), bias="none")


class LLM2CLIPTrainer(Trainer):
    """Trains LLM2CLIP stage 1 (``args.stage="caption"``) or stage 2 (``args.stage="clip"``).

    Stage 1 takes an :class:`LLM2CLIPTextModel` (LoRA is added with ``peft_config`` or the official settings) and
    a dataset with a short and a long caption column. Stage 2 takes an :class:`LLM2CLIPModel` and a dataset with
    images and, for ``text_source="cached"``, the embeddings written by ``precompute_text_embeddings``; pass the
    ``text_model`` that made them to have the cache checked against it. ``trainer.save_model()`` and
    ``push_to_hub()`` write a loadable model (LoRA merged) with remote code and a model card; checkpoints keep the
    LoRA adapter and optimizer state for ``resume_from_checkpoint``.
    """

    def __init__(
        self,
        model: LLM2CLIPTextModel | LLM2CLIPModel | PeftModel,
        args: LLM2CLIPTrainingArguments,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: LoraConfig | None = None,
        text_model: LLM2CLIPTextModel | None = None,
        loss: nn.Module | None = None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, LLM2CLIPTrainingArguments):
            raise TypeError("LLM2CLIPTrainer needs LLM2CLIPTrainingArguments (they carry the stage settings).")
        callbacks = list(callbacks or [])
        self._saving_checkpoint = False
        if args.stage == CAPTION_STAGE:
            model, collator, train_dataset, eval_dataset = self._setup_caption_stage(
                model, args, train_dataset, eval_dataset, peft_config
            )
            loss = loss or CaptionContrastiveLoss(args.loss_scale, world_size=args.world_size, rank=args.process_index)
        else:
            collator, train_dataset, eval_dataset = self._setup_clip_stage(
                model, args, train_dataset, eval_dataset, peft_config, text_model
            )
            loss = loss or CLIPContrastiveLoss(world_size=args.world_size, rank=args.process_index)
            callbacks += [LogitScaleClampCallback(model, args.logit_scale_max), EpochCallback(collator)]
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)
        self.loss = loss
        # Our losses are means over the local batch and take no `num_items_in_batch`: let the Trainer divide by the
        # accumulation steps and never rescale by the number of processes (PeftModel's **kwargs would suggest so).
        self.model_accepts_loss_kwargs = False

    # --------------------------------------------------------------------------------------------- setup
    def _setup_caption_stage(self, model, args, train_dataset, eval_dataset, peft_config):
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if not isinstance(base, LLM2CLIPTextModel):
            raise TypeError(
                f"stage='caption' trains an LLM2CLIPTextModel, got {type(base).__name__}. Build one with "
                "LLM2CLIPTextModel.from_llm(...)."
            )
        if len(args.caption_columns) != 2:
            raise ValueError(
                f"stage='caption' needs exactly two caption columns (short, long); got {args.caption_columns}."
            )
        if not isinstance(model, PeftModel):
            model = get_peft_model(model, peft_config or default_lora_config(args))
        self.text_model = base
        short, long = args.caption_columns
        datasets = [build_caption_pairs(d, short, long, args.seed, args.hard_negatives)
                    if d is not None and QUERY not in d.column_names else d for d in (train_dataset, eval_dataset)]
        collator = CaptionPairCollator(base, args.short_query_instruction, args.long_query_instruction,
                                       args.instruction_separator)
        return model, collator, datasets[0], datasets[1]

    def _setup_clip_stage(self, model, args, train_dataset, eval_dataset, peft_config, text_model):
        if not isinstance(model, LLM2CLIPModel):
            raise TypeError(f"stage='clip' trains an LLM2CLIPModel, got {type(model).__name__}.")
        in_loop = args.text_source in ("frozen", "lora")
        if in_loop and model.text_model is None:
            raise ValueError(
                f"text_source={args.text_source!r} runs the LLM in the loop, but this LLM2CLIPModel has no embedded "
                "text encoder. Build it with LLM2CLIPConfig(text_config=text_model.config) and copy the weights, or "
                "use text_source='cached' with precomputed embeddings."
            )
        if model.text_model is not None:
            model.text_model.requires_grad_(False)
            if args.text_source == "lora":
                inject_adapter_in_model(peft_config or default_lora_config(args), model.text_model)
        for dataset in (train_dataset, eval_dataset):
            if dataset is None:
                continue
            require_columns(dataset, [args.image_column], "CLIP training")
            if in_loop:
                require_columns(dataset, args.caption_columns, "CLIP training with the LLM in the loop")
            else:
                self._check_cache(model, dataset, args, text_model)
        collator = CLIPCollator(
            args.image_column, args.caption_columns,
            CLIPImageTransform(model.config.vision_config.image_size, augment=args.image_augmentation),
            seed=args.seed, weights=args.caption_sampling_weights,
            text_model=model.text_model if in_loop else None,
        )
        indexed = [d.add_column(ROW_INDEX, list(range(len(d)))) if d is not None and ROW_INDEX not in d.column_names
                   else d for d in (train_dataset, eval_dataset)]
        return collator, indexed[0], indexed[1]

    @staticmethod
    def _check_cache(model: LLM2CLIPModel, dataset: Dataset, args, text_model: LLM2CLIPTextModel | None) -> None:
        expected = text_model_fingerprint(text_model) if text_model is not None else model.config.text_model_fingerprint
        metadata = check_embedding_cache(dataset, args.caption_columns, expected_fingerprint=expected,
                                         embedding_dim=model.config.text_embedding_dim)
        model.config.text_model_fingerprint = metadata["fingerprint"]
        model.config.text_model_name_or_path = metadata.get("text_model") or model.config.text_model_name_or_path

    # --------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.stage == CAPTION_STAGE:
            embeddings = {role: model(**batch).text_embeds for role, batch in inputs.items()}
            loss = self.loss(embeddings["query"], embeddings["positive"], embeddings.get("negative"))
            return (loss, embeddings) if return_outputs else loss
        outputs = model(**inputs)
        logit_scale = self.accelerator.unwrap_model(model).logit_scale
        loss = self.loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def create_optimizer(self):
        if self.args.stage == CLIP_STAGE and self.optimizer is None:
            model = self.accelerator.unwrap_model(self.model)
            groups = layer_decay_parameter_groups(
                model, self.args.learning_rate, self.args.weight_decay, self.args.layer_decay,
                model.config.vision_config.num_hidden_layers,
            )
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer()

    # --------------------------------------------------------------------------------------------- saving
    def _save_checkpoint(self, model, trial):
        self._saving_checkpoint = True
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Checkpoints: the Trainer's own format (LoRA adapter + optimizer). Final saves: the merged model."""
        if self._saving_checkpoint:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.save_pretrained(output_dir, state_dict=merged_state_dict(base), safe_serialization=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self._write_model_card(output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | list[str] | None = None,
                          **kwargs: Any) -> None:
        """Write README.md to the output directory: stage, base models, data, hyperparameters, last metrics."""
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir, model_name, dataset_name)

    def _write_model_card(self, output_dir: str, model_name: str | None = None,
                          dataset_name: str | list[str] | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if isinstance(base, LLM2CLIPTextModel):
            base_models = [base.name_or_path]
        else:
            base_models = [base.name_or_path, base.config.text_model_name_or_path]
        datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
        metrics = {}
        for entry in self.state.log_history:
            metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
        card = build_model_card(
            repo=model_name or getattr(self, "hub_model_id", None) or os.path.basename(os.path.abspath(output_dir)),
            args=self.args, base_models=base_models, datasets=datasets,
            num_train_examples=len(self.train_dataset) if self.train_dataset is not None else None,
            metrics=metrics, world_size=self.args.world_size,
        )
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
