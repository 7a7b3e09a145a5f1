"""``LLM2CLIPTrainer``: both LLM2CLIP stages on transformers' Trainer (Accelerate, checkpoints, Hub)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import datasets as hf_datasets
import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedType
from datasets import Dataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging as hf_logging

from ..conversion import attach_text_model, merge_lora_state_dict, merged_state_dict, unwrap_peft
from ..data import (
    BATCH_STATISTICS,
    EPOCH,
    ROW_INDEX,
    DataStatistics,
    EpochTaggedDataset,
    EpochTaggedSampler,
    SourceBatchSampler,
    training_stream,
)
from ..data.loaders import training_data_loader
from ..data.text_pairs import concatenate_sources
from ..evaluation import TeacherStatistics, evaluate_caption_retrieval, evaluate_retrieval
from ..modeling import LLM2CLIPModel, LLM2CLIPTextModel
from .callbacks import EpochCallback, LogitScaleClampCallback, initial_logit_scale
from .distributed import average_gradients, root_parameters_gathered
from .grad_cache import GradCacheLoss
from .deepspeed_settings import check_deepspeed_config, models_built_whole
from .layer_decay import layer_decay_parameter_groups
from .losses import check_loss_processes
from .model_card import write_model_card
from .stages import (
    STAGES,
    check_global_batch,
    check_sources,
    check_stream_accumulation,
    make_logit_parameters_one_element,
    require_text_model,
    zero_dimensional_logit_parameters,
)
from .training_args import CAPTION_STAGE, CLIP_STAGE, MNTP_STAGE, TEXT_STAGES, LLM2CLIPTrainingArguments
from .training_health import TrainingHealthCallback

logger = hf_logging.get_logger(__name__)


class LLM2CLIPTrainer(Trainer):
    """Trains LLM2CLIP stage 1 (``args.stage="caption"``), stage 2 (``args.stage="clip"``) or MNTP (``"mntp"``).

    Stage 1 takes an :class:`LLM2CLIPTextModel` (LoRA is added with ``peft_config`` or the official settings) and
    a dataset with a short and a long caption column, or text pairs (``query``, ``positive``, optional ``negative``
    and ``instruction`` columns, see :func:`~llm2clip_hf.data.text_pair_source`), or a dict (``DatasetDict``) of such
    named sources: then every batch comes from one source, drawn with ``source_mixing_weights``
    (:class:`~llm2clip_hf.data.SourceBatchSampler`). Stage 2 takes an :class:`LLM2CLIPModel` and a dataset with
    images and, for ``text_source="cached"``, the embeddings written by ``precompute_text_embeddings``; pass the
    ``text_model`` that made them to have the cache checked against it, and ``text_model_on_save`` (the text model,
    or a function loading it) to have the saved model embed it, frozen, without holding the LLM while training.
    Stage 2 runs the teacher check on a cached training set (``teacher_statistics`` already measured on it are used
    instead of measuring again).
    What differs between the stages is a :class:`~.stages.TrainingStage`; ``gradcache_chunk_size`` makes the loss a
    :class:`~.grad_cache.GradCacheLoss`. ``args`` are copied, never changed
    (:meth:`LLM2CLIPTrainingArguments.resolved`). ``trainer.save_model()`` and ``push_to_hub()`` write a loadable
    model (LoRA merged) with remote code and a model card; checkpoints keep the LoRA adapter and optimizer state for
    ``resume_from_checkpoint``.

    Example:
        ```python
        from datasets import load_dataset
        from llm2clip_hf import LLM2CLIPTextModel
        from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

        pairs = load_dataset("json", data_files="pairs.jsonl", split="train")  # short_caption, long_caption
        text_model = LLM2CLIPTextModel.from_pretrained("my-text-encoder")
        args = LLM2CLIPTrainingArguments("stage1", stage="caption", caption_columns=["short_caption", "long_caption"],
                                         max_steps=2, per_device_train_batch_size=8)
        trainer = LLM2CLIPTrainer(model=text_model, args=args, train_dataset=pairs)
        trainer.train()
        trainer.save_model()  # the merged text encoder, with remote code and a model card
        ```
    """

    def __init__(
        self,
        model: LLM2CLIPTextModel | LLM2CLIPModel | PeftModel,
        args: LLM2CLIPTrainingArguments,
        train_dataset: Dataset | Mapping[str, Dataset] | None = None,
        eval_dataset: Dataset | Mapping[str, Dataset] | None = None,
        peft_config: LoraConfig | None = None,
        text_model: LLM2CLIPTextModel | None = None,
        loss: nn.Module | None = None,
        lm_head: nn.Module | None = None,
        callbacks: list[TrainerCallback] | None = None,
        text_model_on_save: LLM2CLIPTextModel | Callable[[], LLM2CLIPTextModel] | None = None,
        teacher_statistics: TeacherStatistics | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, LLM2CLIPTrainingArguments):
            raise TypeError("LLM2CLIPTrainer needs LLM2CLIPTrainingArguments (they carry the stage settings).")
        if args.stage == MNTP_STAGE and kwargs.get("compute_metrics") is not None:
            raise ValueError("compute_metrics is not supported in stage 'mntp' (its predictions would be vocabulary-"
                             "sized logits per token); evaluation reports the MNTP loss.")
        if args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} is not supported by LLM2CLIPTrainer; use "
                "'random' (default) or 'sequential'. Contrastive batches need no length grouping."
            )
        check_sources(args, train_dataset, eval_dataset)
        num_parameters = require_text_model(model, args.stage).llm.num_parameters() \
            if args.stage in TEXT_STAGES else None
        args = args.resolved_for_run(num_parameters, eval_dataset is not None and args.retrieval_metrics,
                                     initial_logit_scale(model) if args.stage == CLIP_STAGE else None)
        self.args = args  # the health callback reads the settings before the Trainer sets them
        self.health = TrainingHealthCallback(self)
        stage_options = {MNTP_STAGE: {"lm_head": lm_head}, CLIP_STAGE: {"text_model": text_model}}.get(args.stage, {})
        self.stage = STAGES[args.stage](args, observe=self.health.observe, **stage_options)
        args.seed_random_generators()  # the LoRA weights setup_model adds start from the seed
        model = self.stage.setup_model(model, peft_config)
        self.text_model = self.stage.text_model
        loss = loss or self.stage.default_loss()
        check_loss_processes(loss, args.world_size, args.process_index, contrastive=args.stage != MNTP_STAGE)
        # Training applies the bad-row policy; evaluation never drops a row.
        train_dataset = self.stage.prepare_dataset(train_dataset, args.skip_bad_rows) if train_dataset is not None \
            else None
        if isinstance(train_dataset, hf_datasets.IterableDataset):
            check_stream_accumulation(args.world_size, args.gradient_accumulation_steps)
        if args.stage != MNTP_STAGE and isinstance(train_dataset, Dataset):  # contrastive; streams have no length
            check_global_batch(len(train_dataset), args.per_device_train_batch_size, args.world_size,
                               args.accelerator_config.split_batches)
        if args.stage == CLIP_STAGE:
            self.teacher_statistics = self.stage.check_teacher(train_dataset, teacher_statistics)
            self.stage.fit_adapter_input_statistics(train_dataset)
        eval_dataset = self.stage.prepare_dataset(eval_dataset, False) if eval_dataset is not None else None
        # Named stage-1 sources train as one dataset whose batch sampler keeps every batch to one source; evaluation
        # keeps them apart (the Trainer evaluates each, its metrics prefixed with the name).
        self._train_source_sizes = None
        if isinstance(train_dataset, Mapping):
            self._train_source_sizes = {name: len(dataset) for name, dataset in train_dataset.items()}
            train_dataset = concatenate_sources(train_dataset)
        self._train_sampler = EpochTaggedSampler(0, args.sampling_seed,
                                                 shuffle=args.train_sampling_strategy == "random")
        callbacks = [*(callbacks or []), self.health, EpochCallback(lambda: self._train_sampler)]
        if args.stage == CLIP_STAGE:
            callbacks.append(LogitScaleClampCallback(self, args.logit_scale_max))
        super().__init__(model=model, args=args, data_collator=self.stage.collator(), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)
        if self._train_source_sizes is not None:
            self._train_sampler = self._source_batch_sampler(self._train_batch_size)  # source sizes, weights checked
        self.loss = loss.to(self.args.device)  # MNTP's head, where a given lm_head lives
        self._grad_cache = None
        if args.gradcache_chunk_size:
            if self.is_fsdp_enabled:
                raise ValueError(
                    "gradcache_chunk_size is not supported with FSDP: GradCache re-runs the encoders outside the "
                    "wrapped forward, where FSDP's parameters are sharded. Use DDP or DeepSpeed ZeRO-1/2 "
                    "(examples/accelerate/), or drop gradcache_chunk_size."
                )
            self._grad_cache = GradCacheLoss(self.loss, self.stage, args.gradcache_chunk_size,
                                             autocast=self.accelerator.autocast)
        if self.is_deepspeed_enabled:
            check_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config, args)
        self._text_model_on_save = text_model_on_save
        self._gathered_state_dict: dict[str, torch.Tensor] | None = None
        self._data_statistics = DataStatistics()
        self._saving_checkpoint = False
        # Our losses are means over the local batch and take no `num_items_in_batch`: let the Trainer divide by the
        # accumulation steps and never rescale by the number of processes (PeftModel's **kwargs would suggest so).
        self.model_accepts_loss_kwargs = False

    # --------------------------------------------------------------------------------------------- data
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Training batches. Map-style data is read with ``(epoch, row)`` keys from :class:`EpochTaggedSampler` (so
        per-epoch draws reach DataLoader workers) through the Trainer's own loader; a stream
        (``datasets.IterableDataset``) is split so each process reads its own part, rows tagged with the epoch
        (:func:`~llm2clip_hf.data.training_stream`); mixed stage-1 sources come in whole one-source batches."""
        dataset, batch_size = self.train_dataset, self._train_batch_size
        if isinstance(dataset, hf_datasets.IterableDataset):
            # Accelerate would read the whole stream on the main process and send the batches (dispatch_batches,
            # its default for streams) or split it again: the split stream is prepared as a one-process loader,
            # which only moves the batches to this process's device.
            args = self.args
            stream = training_stream(dataset, args.sampling_seed, args.process_index, args.world_size, EPOCH,
                                     shuffle=args.train_sampling_strategy == "random",
                                     buffer_size=args.stream_shuffle_buffer_size)
            loader = training_data_loader(stream, self.data_collator, args, batch_size=batch_size)
            return prepare_data_loader(loader, self.accelerator.device, num_processes=1, process_index=0,
                                       put_on_device=self.accelerator.device_placement, dispatch_batches=False,
                                       non_blocking=self.accelerator.non_blocking)
        if self._train_source_sizes is not None:
            # The batch sampler picks whole batches, which accelerate then deals out to the processes.
            self._train_sampler = self._source_batch_sampler(batch_size)
            return self.accelerator.prepare(training_data_loader(
                EpochTaggedDataset(dataset), self.data_collator, self.args, batch_sampler=self._train_sampler))
        self._train_sampler.num_rows = len(dataset)
        return self._get_dataloader(EpochTaggedDataset(dataset), "Training", batch_size,
                                    sampler_fn=lambda _: self._train_sampler, is_training=True)

    def _source_batch_sampler(self, batch_size: int) -> SourceBatchSampler:
        """Training batches of the named sources. Accelerate gives process ``i`` batch ``i`` of every
        ``num_processes`` consecutive ones (with ``split_batches``, a slice of every batch): a step's global batch
        is that many batches, all of one source."""
        group = 1 if self.accelerator.split_batches else self.accelerator.num_processes
        return SourceBatchSampler(self._train_source_sizes, batch_size, self.args.sampling_seed,
                                  self.args.source_mixing_weights, group,
                                  shuffle=self.args.train_sampling_strategy == "random")

    # --------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k not in (ROW_INDEX, BATCH_STATISTICS)}  # bookkeeping
        if self._grad_cache is not None and model.training and torch.is_grad_enabled() and not return_outputs:
            return self._grad_cache(self.accelerator.unwrap_model(model), inputs)
        loss, outputs = self.stage.compute_loss(model, inputs, self.loss)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step (its backward goes through ``accelerator.backward``: loss scaling, DeepSpeed, ...).
        The loss is recorded on the device and checked once per optimizer step, before the update
        (:class:`~.training_health.TrainingHealthCallback`)."""
        inputs = self._data_statistics.add(inputs)
        rows = inputs.get(ROW_INDEX)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._grad_cache is not None and self.accelerator.sync_gradients and \
                self.accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            # GradCache's second pass runs the unwrapped module, outside DDP's forward, so DDP's reducer did not
            # average these gradients: average the accumulated ones once per optimizer step (DeepSpeed reduces
            # them itself).
            average_gradients(p for p in self.accelerator.unwrap_model(model).parameters() if p.requires_grad)
        self.health.record(loss, rows, self.stage.log_candidates(len(rows)) if rows is not None else None)
        return loss

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; the result's metrics also count, over all processes and DataLoader workers, the rows
        skipped for unreadable images and the captions truncated to the token budget. Under FSDP and DeepSpeed,
        ``logit_scale`` / ``logit_bias`` become 1-element first (:func:`~.stages.make_logit_parameters_one_element`)."""
        if (self.is_fsdp_enabled or self.is_deepspeed_enabled) and self.args.stage == CLIP_STAGE:  # before wrapping
            make_logit_parameters_one_element(self.accelerator.unwrap_model(self.model))
        self._data_statistics = DataStatistics()
        self.health.reset()
        result = super().train(*args, **kwargs)
        skipped, truncated = self._data_statistics.gathered()
        result.metrics.update(skipped_rows=len(skipped), truncated_captions=truncated)
        if skipped:
            logger.warning(f"Skipped {len(skipped)} rows with unreadable images: {skipped[:20]}.")
        if truncated:
            text_model = self._base_model()
            text_model = text_model if isinstance(text_model, LLM2CLIPTextModel) else text_model.text_model
            logger.warning(f"{truncated} training captions were longer than max_length="
                           f"{text_model.config.max_seq_length} tokens and were truncated.")
        return result

    def _base_model(self) -> LLM2CLIPTextModel | LLM2CLIPModel:
        """The trained model without its accelerate (DDP, ...) and PEFT wrappers."""
        return unwrap_peft(self.accelerator.unwrap_model(self.model))

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

    # --------------------------------------------------------------------------------------------- evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss; with a ``compute_metrics`` (``prediction_loss_only`` False) also the batch's embeddings as
        predictions, ``(query, positive)`` in stage "caption" and ``(image_embeds, text_embeds)`` in stage "clip",
        and the dataset row of each as label, so ``compute_metrics`` gets every evaluation row's embeddings
        (gathered over processes by the Trainer)."""
        inputs = self._prepare_inputs(inputs)
        rows = inputs.get(ROW_INDEX)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        if self.args.stage == CAPTION_STAGE:
            predictions = (outputs["query"], outputs["positive"])
        else:
            predictions = (outputs.image_embeds, outputs.text_embeds)
        return loss.detach(), tuple(p.detach().float() for p in predictions), rows

    def evaluate(self, eval_dataset: Dataset | Mapping[str, Dataset] | str | None = None,
                 ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's evaluation loss plus the stage's retrieval metrics, logged together: caption retrieval
        accuracy (``cra``) between the caption columns in stage "caption"; image<->text recall@k in stage "clip".
        Named stage-1 sources are evaluated one by one (metrics ``eval_<name>_...``; CRA for caption sources)."""
        if isinstance(eval_dataset, (Dataset, Mapping)):
            eval_dataset = self.stage.prepare_dataset(eval_dataset, False)
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # The Trainer evaluates a dict of sources one by one, calling this method with each source's name.
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if not self.args.retrieval_metrics or not isinstance(dataset, Dataset):
            return metrics
        extra = {f"{metric_key_prefix}_{name}": value for name, value in self.retrieval_metrics(dataset).items()}
        self.log(extra)
        metrics.update(extra)
        return metrics

    def retrieval_metrics(self, dataset: Dataset) -> dict[str, float]:
        """Stage metrics of the current model on ``dataset`` (see :meth:`evaluate`), computed by every process on the
        whole model (under FSDP2 its root parameters gathered for the duration)."""
        model, args = self._base_model(), self.args
        if args.stage in TEXT_STAGES and (len(args.caption_columns) != 2
                                          or not set(args.caption_columns) <= set(dataset.column_names)):
            return {}  # an MNTP evaluation of other than two caption columns: the loss only
        with root_parameters_gathered(self.accelerator.unwrap_model(self.model)):
            if args.stage in TEXT_STAGES:
                return evaluate_caption_retrieval(model, dataset, args.caption_columns,
                                                  batch_size=args.per_device_eval_batch_size, show_progress_bar=False)
            return evaluate_retrieval(model, dataset, args.image_column, args.caption_columns,
                                      batch_size=args.per_device_eval_batch_size, show_progress_bar=False)

    # --------------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``. Under DeepSpeed ZeRO-3 a LoRA model's final save gathers every weight first (the
        Trainer gathers the adapter only, and the merged model needs the frozen weights too); every process calls
        this, as the gathering is collective."""
        if self.is_deepspeed_enabled and not self._saving_checkpoint and self.deepspeed.zero_optimization_stage() == 3 \
                and isinstance(self.accelerator.unwrap_model(self.model), PeftModel):
            self._gathered_state_dict = self.deepspeed._zero3_consolidated_16bit_state_dict()
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._gathered_state_dict = None

    def _save_checkpoint(self, model, trial):
        self._saving_checkpoint = True
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Checkpoints: the Trainer's own format (LoRA adapter + optimizer). Final saves: the merged model, from the
        ``state_dict`` the Trainer consolidates under FSDP / DeepSpeed (the model then holds only shards), else from
        the model. Only the process that saves (``args.should_save``) writes anything."""
        if self._saving_checkpoint:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        state_dict = self._gathered_state_dict if self._gathered_state_dict is not None else state_dict
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        base = self._base_model()
        self._attach_text_model_for_save(base)
        if state_dict is None:
            weights = merged_state_dict(base)
        else:  # the trained model's keys; under PEFT (stage 1) the base model's follow "base_model.model."
            prefix = "base_model.model." if isinstance(self.accelerator.unwrap_model(self.model), PeftModel) else ""
            state = {k.removeprefix(prefix): v for k, v in state_dict.items()}
            if isinstance(base, LLM2CLIPModel) and base.text_model is not None and \
                    not any(k.startswith("text_model.") for k in state):  # attached after the model was wrapped
                state.update({f"text_model.{k}": v for k, v in base.text_model.state_dict().items()})
            missing = sorted(set(base.state_dict()) - set(state))
            if missing:
                raise RuntimeError(
                    f"The consolidated state dict lacks {len(missing)} of the model's weights ({missing[:3]} ...): the "
                    f"saved model would not load, so nothing was written to {output_dir}. The run's checkpoints are "
                    "intact; report this with the DeepSpeed / FSDP configuration."
                )
            weights = merge_lora_state_dict(state, base)
        base.save_pretrained(output_dir, state_dict=zero_dimensional_logit_parameters(weights),
                             safe_serialization=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        write_model_card(self, output_dir)

    def _attach_text_model_for_save(self, base: LLM2CLIPTextModel | LLM2CLIPModel) -> None:
        """Stage 2 trained without the LLM (it reads cached embeddings): embed ``text_model_on_save`` into the saved
        model (frozen), so it reads raw text and ships a processor. Done once, by the saving process, at the first
        final save: no process holds the LLM while training."""
        if self._text_model_on_save is None or not isinstance(base, LLM2CLIPModel) or base.text_model is not None:
            return
        source = self._text_model_on_save
        with models_built_whole():  # the saving process alone: no ZeRO-3 partitioning (a collective) here
            attach_text_model(base, source if isinstance(source, nn.Module) else source())
        base.text_model.requires_grad_(False).eval()

    def create_model_card(self, model_name: str | None = None, dataset_name: str | list[str] | None = None,
                          **kwargs: Any) -> None:
        """Write README.md to the output directory: stage, base models, data, hyperparameters, last metrics."""
        if self.is_world_process_zero():
            write_model_card(self, self.args.output_dir, model_name, dataset_name)
