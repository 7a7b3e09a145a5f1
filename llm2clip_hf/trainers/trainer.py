"""``LLM2CLIPTrainer``: both LLM2CLIP stages on transformers' Trainer (Accelerate, checkpoints, Hub)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import has_length, seed_worker
from transformers.utils import logging as hf_logging

import datasets as hf_datasets

from ..data import (
    ROW_INDEX,
    CLIPImageTransform,
    check_cache_rows,
    check_embedding_cache,
    drop_bad_caption_rows,
    drop_bad_stream_caption_rows,
    embedding_column,
    embedding_statistics,
    require_columns,
    text_model_fingerprint,
    training_stream,
    with_key_row_index,
    with_row_index,
)
from ..evaluation import evaluate_caption_retrieval, evaluate_retrieval
from ..conversion.lora_merge import merge_lora_state_dict, merged_state_dict, unwrap_peft
from ..modeling import LLM2CLIPModel, LLM2CLIPOutput, LLM2CLIPTextModel
from ..data.text_pairs import (
    POSITIVE,
    QUERY,
    QUERY_INSTRUCTION,
    ROLES,
    TEXTS,
    TextPairCollator,
    build_caption_pairs,
    build_text_pairs,
    check_negatives_agree,
    concatenate_sources,
    split_roles,
)
from ..data.image_text_collator import ImageTextCollator
from ..data.data_statistics import BATCH_STATISTICS, DataStatistics
from .distributed import average_gradients
from ..data.epoch_sampling import EPOCH, EpochTaggedDataset, EpochTaggedSampler
from .grad_cache import grad_cache_loss
from .layer_decay import layer_decay_parameter_groups
from .losses import CaptionContrastiveLoss, CLIPContrastiveLoss, MaskedNextTokenLoss, SigLIPContrastiveLoss, output_head
from ..data.masked_next_token import LABELS, TEXT, MaskedTextCollator, build_mntp_texts
from ..data.mixed_sources import SourceBatchSampler
from .model_card import build_model_card
from .training_args import CAPTION_STAGE, CLIP_STAGE, MNTP_STAGE, TEXT_STAGES, LLM2CLIPTrainingArguments
from .training_health import CollapseMonitor, EmbeddingCollapseError, StepHealth, checkpoint_before, embedding_spread


logger = hf_logging.get_logger(__name__)


LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


def make_logit_parameters_one_element(model: nn.Module) -> None:
    """Give ``logit_scale`` / ``logit_bias`` the shape ``(1,)`` for FSDP, which refuses 0-d parameters ("fully_shard
    doesn't support scalar parameters"). The model computes the same (they broadcast); checkpoints keep the 0-d
    shape of the official and transformers' CLIP checkpoints (see :meth:`LLM2CLIPTrainer._save`)."""
    for name in LOGIT_PARAMETERS:
        parameter = getattr(model, name, None)
        if isinstance(parameter, nn.Parameter) and parameter.dim() == 0:
            setattr(model, name, nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad))


class LogitScaleClampCallback(TrainerCallback):
    """Clamp ``logit_scale`` to ``[0, max_value]`` right after every optimizer step, as the official training does.

    It clamps what the optimizer updates: the parameter of the model as the trainer wrapped it (DDP's module; under
    FSDP the view of this process's shard, or an FSDP2 parameter's local shard) and, under DeepSpeed, also the
    float32 master copy, from which DeepSpeed rewrites the parameter at the next step.
    """

    def __init__(self, trainer: Trainer, max_value: float) -> None:
        self.trainer, self.max_value = trainer, max_value

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        parameter = trainer.accelerator.unwrap_model(trainer.model_wrapped).logit_scale
        if not isinstance(parameter, nn.Parameter):
            raise RuntimeError(
                "logit_scale is not a parameter of the wrapped model, so the optimizer's copy cannot be clamped. "
                "Under FSDP (version 1) keep fsdp_use_orig_params: true (accelerate's default)."
            )
        with torch.no_grad():
            (parameter.to_local() if isinstance(parameter, DTensor) else parameter).clamp_(0.0, self.max_value)
        if trainer.is_deepspeed_enabled:
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            master = safe_get_full_fp32_param(parameter)  # collective: every process calls it
            if master is not None:
                safe_set_full_fp32_param(parameter, master.clamp(0.0, self.max_value))


class TrainingHealthCallback(TrainerCallback):
    """Checks the micro-batches of an optimizer step right before the update: non-finite losses and collapsed
    embeddings, agreed by every process (one small all-reduce per step; see :mod:`.training_health`)."""

    def __init__(self, trainer: "LLM2CLIPTrainer") -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_step_health()


class EpochCallback(TrainerCallback):
    """Tells the trainer's training sampler (:class:`EpochTaggedSampler`, or :class:`SourceBatchSampler` for mixed
    sources) the epoch at the start of each one. The Trainer's own ``set_epoch`` reaches the sampler through
    accelerate's wrappers in most set-ups but not all (a resumed multi-process run wraps it once more); this makes
    it certain."""

    def __init__(self, trainer: "LLM2CLIPTrainer") -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._train_sampler.set_epoch(math.floor(state.epoch + 1e-9))


def default_lora_config(args: LLM2CLIPTrainingArguments) -> LoraConfig:
    """The official LoRA: r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up and down projections."""
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.lora_target_modules), bias="none")


class LLM2CLIPTrainer(Trainer):
    """Trains LLM2CLIP stage 1 (``args.stage="caption"``) or stage 2 (``args.stage="clip"``).

    Stage 1 takes an :class:`LLM2CLIPTextModel` (LoRA is added with ``peft_config`` or the official settings) and
    a dataset with a short and a long caption column, or text pairs (``query``, ``positive``, optional ``negative``
    and ``instruction`` columns, see :func:`text_pair_source`), or a dict (``DatasetDict``) of such named sources:
    then every batch comes from one source, drawn with ``source_mixing_weights`` (:class:`SourceBatchSampler`).
    Stage 2 takes an :class:`LLM2CLIPModel` and a dataset with images and, for ``text_source="cached"``, the embeddings written by ``precompute_text_embeddings``; pass the
    ``text_model`` that made them to have the cache checked against it, and ``text_model_on_save`` (the text model,
    or a function loading it) to have the saved model embed it, frozen, without holding the LLM while training.
    ``args`` are copied, never changed (:meth:`LLM2CLIPTrainingArguments.resolved`). ``trainer.save_model()`` and
    ``push_to_hub()`` write a loadable model (LoRA merged) with remote code and a model card; checkpoints keep the
    LoRA adapter and optimizer state for ``resume_from_checkpoint``.
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
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, LLM2CLIPTrainingArguments):
            raise TypeError("LLM2CLIPTrainer needs LLM2CLIPTrainingArguments (they carry the stage settings).")
        if args.stage == MNTP_STAGE and kwargs.get("compute_metrics") is not None:
            raise ValueError("compute_metrics is not supported in stage 'mntp' (its predictions would be vocabulary-"
                             "sized logits per token); evaluation reports the MNTP loss.")
        args = self._resolved_args(model, args, eval_dataset)
        callbacks = list(callbacks or [])
        self._saving_checkpoint = False
        self._data_statistics = DataStatistics()
        self._micro_step_records: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float | None]] = []
        self._batch_spread: torch.Tensor | None = None
        self._collapse = CollapseMonitor(args.collapse_spread_ratio, args.collapse_patience)
        self._text_model_on_save = text_model_on_save
        callbacks.append(TrainingHealthCallback(self))
        if args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} is not supported by LLM2CLIPTrainer; use "
                "'random' (default) or 'sequential'. Contrastive batches need no length grouping."
            )
        self._train_sampler = EpochTaggedSampler(0, args.sampling_seed,
                                                 shuffle=args.train_sampling_strategy == "random")
        callbacks.append(EpochCallback(self))
        self._check_sources(args, train_dataset, eval_dataset)
        if args.stage == MNTP_STAGE:
            model, collator, prepare, head = self._setup_mntp_stage(model, args, peft_config, lm_head)
            eval_collator = collator
            loss = loss or MaskedNextTokenLoss(head)
        elif args.stage == CAPTION_STAGE:
            model, collator, eval_collator, prepare = self._setup_caption_stage(model, args, peft_config)
            loss = loss or CaptionContrastiveLoss(args.loss_scale, world_size=args.world_size, rank=args.process_index)
        else:
            collator, eval_collator, prepare = self._setup_clip_stage(model, args, peft_config, text_model)
            if args.loss_type == "siglip":
                if getattr(model, "logit_bias", None) is None:
                    raise ValueError(
                        "loss_type='siglip' trains SigLIP's learnable logit_bias, but this LLM2CLIPModel has none. "
                        "Build the model with logit_bias_init_value=-10.0 (SigLIP's init, with "
                        "logit_scale_init_value=math.log(10)), e.g. LLM2CLIPModel.from_text_model(text_model, "
                        "vision_config, logit_bias_init_value=-10.0, logit_scale_init_value=math.log(10)); or use "
                        "loss_type='clip'."
                    )
                loss = loss or SigLIPContrastiveLoss(world_size=args.world_size, rank=args.process_index)
            else:
                loss = loss or CLIPContrastiveLoss(world_size=args.world_size, rank=args.process_index)
            callbacks.append(LogitScaleClampCallback(self, args.logit_scale_max))
        self._check_loss_processes(loss, args)
        # Training applies the bad-row policy; evaluation never drops a row.
        self._prepare_dataset = prepare
        train_dataset = prepare(train_dataset, args.skip_bad_rows) if train_dataset is not None else None
        if args.stage == CLIP_STAGE:
            self._fit_adapter_input_statistics(model, train_dataset, args)
        eval_dataset = prepare(eval_dataset, False) if eval_dataset is not None else None
        # Named stage-1 sources train as one dataset whose batch sampler keeps every batch to one source; evaluation
        # keeps them apart (the Trainer evaluates each, its metrics prefixed with the name).
        self._train_source_sizes = None
        if isinstance(train_dataset, Mapping):
            self._train_source_sizes = {name: len(dataset) for name, dataset in train_dataset.items()}
            train_dataset = concatenate_sources(train_dataset)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)
        if self._train_source_sizes is not None:
            self._train_sampler = self._source_batch_sampler(self._train_batch_size)  # source sizes, weights checked
        self.eval_data_collator = eval_collator
        self.loss = loss.to(self.args.device) if args.stage == MNTP_STAGE else loss  # a given lm_head's device
        if args.gradcache_chunk_size and self.is_fsdp_enabled:
            raise ValueError(
                "gradcache_chunk_size is not supported with FSDP: GradCache re-runs the encoders outside the wrapped "
                "forward, where FSDP's parameters are sharded. Use DDP or DeepSpeed ZeRO-1/2 "
                "(examples/accelerate/), or drop gradcache_chunk_size."
            )
        # Our losses are means over the local batch and take no `num_items_in_batch`: let the Trainer divide by the
        # accumulation steps and never rescale by the number of processes (PeftModel's **kwargs would suggest so).
        self.model_accepts_loss_kwargs = False

    # --------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _check_sources(args: LLM2CLIPTrainingArguments, train_dataset: Any, eval_dataset: Any) -> None:
        """Named sources (a dict) are stage-1 data, and ``source_mixing_weights`` weighs those of training."""
        for data in (train_dataset, eval_dataset):
            if isinstance(data, Mapping) and args.stage != CAPTION_STAGE:
                raise ValueError(f"A dict of datasets holds named stage-1 sources (stage='caption'); stage "
                                 f"{args.stage!r} takes one Dataset.")
            if isinstance(data, Mapping) and not data:
                raise ValueError("The dict of stage-1 sources is empty; give at least one dataset.")
        if args.source_mixing_weights is not None and not isinstance(train_dataset, Mapping):
            raise ValueError("source_mixing_weights weighs the named sources of a dict train_dataset (stage "
                             "'caption'); pass a DatasetDict (CLI: --pair-dataset) or drop the weights.")

    def _resolved_args(self, model, args: LLM2CLIPTrainingArguments, eval_dataset: Any) -> LLM2CLIPTrainingArguments:
        """The arguments this trainer runs with: a copy of ``args`` with the defaults that depend on the model and
        data resolved (``args`` itself is never changed, so it can be reused with another model): the small-LLM
        settings for text stages on LLMs under 1B parameters (logged), and ``eval_on_start`` for stage 1 with
        held-out pairs (the CRA before training, for the log and the card's model-index) unless it was set."""
        num_parameters = None
        if args.stage in TEXT_STAGES:
            num_parameters = self._require_text_model(model, args).llm.num_parameters()
        defaults = {"eval_on_start": True} if (args.stage == CAPTION_STAGE and eval_dataset is not None
                                               and args.retrieval_metrics) else {}
        resolved, changed = args.resolved(num_parameters, **defaults)
        small = {name: value for name, value in changed.items() if name not in defaults}
        if small:
            logger.warning(
                f"stage={args.stage!r} on a {num_parameters / 1e6:.0f}M-parameter LLM: using the small-LLM defaults "
                f"{small} instead of the official values for 1B+ LLMs (measured on SmolLM2-135M, see README 'Stage 1 "
                "on small LLMs'); set them explicitly to override."
            )
        return resolved

    @staticmethod
    def _check_loss_processes(loss: nn.Module, args: LLM2CLIPTrainingArguments) -> None:
        """A contrastive loss must gather candidates from every process: refuse one built for another number of
        processes (a loss made with the defaults on 8 processes would use each process's local negatives only)."""
        world_size = getattr(loss, "world_size", None)
        if world_size is None:
            if args.world_size > 1 and args.stage != MNTP_STAGE:
                logger.warning(f"The given loss {type(loss).__name__} has no world_size attribute, so it cannot be "
                               f"checked that it gathers candidates from all {args.world_size} processes.")
            return
        if world_size != args.world_size or getattr(loss, "rank", args.process_index) != args.process_index:
            raise ValueError(
                f"The given loss {type(loss).__name__} was built for world_size={world_size}, rank="
                f"{getattr(loss, 'rank', None)}, but this run has {args.world_size} processes (this one is rank "
                f"{args.process_index}): its negatives would not be the global batch's. Build it with "
                "world_size=args.world_size, rank=args.process_index."
            )

    @staticmethod
    def _fit_adapter_input_statistics(model: LLM2CLIPModel, dataset: Any, args: LLM2CLIPTrainingArguments) -> None:
        """An adapter with input normalisation (``adapter_input_normalization``) that was never fitted gets the mean
        and standard deviation of the training set's cached embeddings (one pass; every process computes the same
        numbers from the same data). A fitted one (continued training) keeps its statistics."""
        config = model.config
        if config.adapter_input_normalization is None or config.adapter_input_statistics_rows:
            return
        if args.text_source != "cached" or not isinstance(dataset, Dataset):
            raise ValueError(
                f"adapter_input_normalization={config.adapter_input_normalization!r} fits its statistics on the "
                "training set's cached embeddings, and this run has none to read in one pass (a stream, or the LLM "
                "in the loop). Fit them first: model.text_adapter.set_input_statistics(mean, std) with the mean and "
                "std of llm2clip_hf.data.embedding_statistics(<a cached dataset>, caption_columns), and set "
                "model.config.adapter_input_statistics_rows; or build the model without input normalisation."
            )
        mean, std, count = embedding_statistics(dataset, args.caption_columns)
        model.text_adapter.set_input_statistics(torch.from_numpy(mean), torch.from_numpy(std))
        config.adapter_input_statistics_rows = count
        logger.info(f"Adapter input normalisation ({config.adapter_input_normalization}) fitted on {count} cached "
                    "caption embeddings of the training set.")

    def _text_model_with_lora(self, model, args, peft_config) -> PeftModel:
        """The text stages' model: an LLM2CLIPTextModel with LoRA (the official settings unless ``peft_config``)."""
        self._require_text_model(model, args)
        return model if isinstance(model, PeftModel) else get_peft_model(model, peft_config or default_lora_config(args))

    def _require_text_model(self, model, args) -> LLM2CLIPTextModel:
        base = unwrap_peft(model)
        if not isinstance(base, LLM2CLIPTextModel):
            raise TypeError(
                f"stage={args.stage!r} trains an LLM2CLIPTextModel, got {type(base).__name__}. Build one with "
                "LLM2CLIPTextModel.from_llm(...)."
            )
        self.text_model = base
        return base

    def _setup_mntp_stage(self, model, args, peft_config, lm_head):
        """The model with LoRA, the collator, the function preparing a dataset (one row per text), and the LLM's
        next-token head (checked before LoRA changes the model)."""
        head = output_head(self._require_text_model(model, args), lm_head)
        model = self._text_model_with_lora(model, args, peft_config)
        if not self.text_model.config.bidirectional:
            logger.warning("MNTP adapts an LLM to bidirectional attention, but this text model is causal "
                           "(bidirectional=False); it trains as it is.")

        def prepare(dataset: Dataset, skip: bool) -> Dataset:
            if TEXT in dataset.column_names and ROW_INDEX in dataset.column_names:
                return dataset
            dataset = drop_bad_caption_rows(with_row_index(dataset), args.caption_columns, skip)
            return build_mntp_texts(dataset, args.caption_columns)

        return model, MaskedTextCollator(self.text_model, args.mlm_probability, args.mask_token), prepare, head

    def _setup_caption_stage(self, model, args, peft_config):
        """The model with LoRA, the collators for training and evaluation, and the function preparing a dataset."""
        if len(args.caption_columns) != 2:
            raise ValueError(
                f"stage='caption' needs exactly two caption columns (short, long); got {args.caption_columns}."
            )
        model = self._text_model_with_lora(model, args, peft_config)
        short, long = args.caption_columns

        def prepare_source(dataset: Dataset, skip: bool, name: str | None = None) -> Dataset:
            """A caption source (the two caption columns) or a text-pair source (query and positive columns) as
            prepared rows; a prepared dataset as it is."""
            columns = set(dataset.column_names)
            if {ROW_INDEX, QUERY, QUERY_INSTRUCTION} <= columns:
                return dataset
            if {QUERY, POSITIVE} <= columns and not {short, long} <= columns:
                return build_text_pairs(with_row_index(dataset), args.hard_negatives, skip)
            source = f"Stage-1 source {name!r}" if name is not None else "Stage-1 training"
            require_columns(dataset, [short, long],
                            f"{source} (captions; text pairs would have '{QUERY}' and '{POSITIVE}' columns instead)")
            dataset = drop_bad_caption_rows(with_row_index(dataset), [short, long], skip)
            return build_caption_pairs(dataset, short, long, args.sampling_seed, args.hard_negatives,
                                       short_query_instruction=args.short_query_instruction,
                                       long_query_instruction=args.long_query_instruction)

        def prepare(data: Dataset | Mapping[str, Dataset], skip: bool) -> Dataset | dict[str, Dataset]:
            if not isinstance(data, Mapping):
                return prepare_source(data, skip)
            sources = {name: prepare_source(dataset, skip, name) for name, dataset in data.items()}
            check_negatives_agree(sources)
            return sources

        collator = TextPairCollator(self.text_model, args.instruction_separator)
        return model, collator, collator, prepare

    def _setup_clip_stage(self, model, args, peft_config, text_model):
        """The collators for training and evaluation, and the function preparing a dataset."""
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
        # Hashing the LLM's weights is costly (an 8B model: ~16 GB read): once per trainer, for every dataset checked.
        text_model_hash = functools.cache(lambda: text_model_fingerprint(text_model))

        def check_cache(dataset: Dataset | hf_datasets.IterableDataset) -> None:
            """The cache must be of the given text model, else of the one recorded by earlier training, and (map-style
            data; a stream joins by key) each row's embeddings must be of that row's captions."""
            expected = text_model_hash() if text_model is not None else model.config.text_model_fingerprint
            metadata = check_embedding_cache(
                dataset, args.caption_columns, expected_fingerprint=expected,
                embedding_dim=model.config.text_embedding_dim,
                expected_dtype=str(text_model.dtype).removeprefix("torch.") if text_model is not None else None)
            if isinstance(dataset, Dataset):
                check_cache_rows(dataset)
            model.config.text_model_fingerprint = metadata["fingerprint"]
            model.config.text_model_name_or_path = metadata.get("text_model") or model.config.text_model_name_or_path

        def prepare(dataset: Dataset | hf_datasets.IterableDataset,
                    skip: bool) -> Dataset | hf_datasets.IterableDataset:
            # A stream's rows are named by the hash of their key and its bad captions dropped as they are read.
            stream = isinstance(dataset, hf_datasets.IterableDataset)
            dataset = with_key_row_index(dataset) if stream else with_row_index(dataset)
            require_columns(dataset, [args.image_column], "CLIP training")
            if in_loop:
                drop_bad_rows = drop_bad_stream_caption_rows if stream else drop_bad_caption_rows
                dataset = drop_bad_rows(dataset, args.caption_columns, skip)
            else:
                check_cache(dataset)
            if isinstance(dataset.features[args.image_column], hf_datasets.Image):
                # decode in the collator, where an unreadable image can be skipped or named
                dataset = dataset.cast_column(args.image_column, hf_datasets.Image(decode=False))
            if not in_loop and not stream:  # cached vectors as numpy arrays, not one Python float per value
                dataset = dataset.with_format("numpy", columns=[embedding_column(c) for c in args.caption_columns],
                                              output_all_columns=True)
            return dataset

        def collator(augment: bool, skip_bad_rows: bool) -> ImageTextCollator:
            return ImageTextCollator(
                args.image_column, args.caption_columns,
                CLIPImageTransform(model.config.vision_config, augment=augment),
                seed=args.sampling_seed, weights=args.caption_sampling_weights,
                text_model=model.text_model if in_loop else None, skip_bad_rows=skip_bad_rows,
            )

        # Evaluation: resize + center crop, a fixed caption per row, and no row skipped.
        return collator(args.image_augmentation, args.skip_bad_rows), collator(False, False), prepare

    # --------------------------------------------------------------------------------------------- data
    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        """The Trainer's DataLoader, with three changes. Training reads ``(epoch, row)`` keys from
        :class:`EpochTaggedSampler` (so per-epoch draws reach DataLoader workers), or a stream
        (``datasets.IterableDataset``) of which each process reads its own part, rows tagged with the epoch (see
        :func:`~llm2clip_hf.data.training_stream`); evaluation uses the evaluation collator."""
        if is_training and isinstance(dataset, hf_datasets.IterableDataset):
            # Accelerate would read the whole stream on the main process and send the batches (dispatch_batches,
            # its default for streams) or split it again: the split stream is prepared as a one-process loader,
            # which only moves the batches to this process's device.
            args = self.args
            stream = training_stream(dataset, args.sampling_seed, args.process_index, args.world_size, EPOCH,
                                     shuffle=args.train_sampling_strategy == "random",
                                     buffer_size=args.stream_shuffle_buffer_size)
            loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=self.data_collator,
                                                 drop_last=args.dataloader_drop_last, **self._loader_options())
            return prepare_data_loader(loader, self.accelerator.device, num_processes=1, process_index=0,
                                       put_on_device=self.accelerator.device_placement, dispatch_batches=False,
                                       non_blocking=self.accelerator.non_blocking)
        if is_training and self._train_source_sizes is not None:
            # Mixed stage-1 sources: the batch sampler picks whole batches, which accelerate then deals out to the
            # processes (transformers' own loader would pass a per-row sampler).
            self._train_sampler = self._source_batch_sampler(batch_size)
            loader = torch.utils.data.DataLoader(
                EpochTaggedDataset(dataset), batch_sampler=self._train_sampler, collate_fn=self.data_collator,
                worker_init_fn=functools.partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                                 rank=self.args.process_index),
                **self._loader_options(),
            )
            return self.accelerator.prepare(loader)
        train_collator = self.data_collator
        if is_training and not isinstance(dataset, torch.utils.data.IterableDataset):
            self._train_sampler.num_rows = len(dataset)
            dataset, sampler_fn = EpochTaggedDataset(dataset), (lambda _: self._train_sampler)
        elif not is_training:
            self.data_collator = self.eval_data_collator
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.data_collator = train_collator

    def _loader_options(self) -> dict[str, Any]:
        """The DataLoader settings of the training arguments (workers, pinned memory, prefetching)."""
        args = self.args
        return dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                    persistent_workers=args.dataloader_persistent_workers, in_order=args.dataloader_in_order,
                    multiprocessing_context=args.dataloader_multiprocessing_context,
                    prefetch_factor=args.dataloader_prefetch_factor)

    def _source_batch_sampler(self, batch_size: int) -> SourceBatchSampler:
        """Training batches of the named sources. Accelerate gives process ``i`` batch ``i`` of every
        ``num_processes`` consecutive ones (with ``split_batches``, a slice of every batch): a step's global batch
        is that many batches, all of one source."""
        group = 1 if self.accelerator.split_batches else self.accelerator.num_processes
        return SourceBatchSampler(self._train_source_sizes, batch_size, self.args.sampling_seed,
                                  self.args.source_mixing_weights, group,
                                  shuffle=self.args.train_sampling_strategy == "random")

    @staticmethod
    def _model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
        """A batch without the bookkeeping entries of the collators (row indices, statistics)."""
        return {k: v for k, v in inputs.items() if k not in (ROW_INDEX, BATCH_STATISTICS)}

    # --------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self._model_inputs(inputs)
        if self.args.gradcache_chunk_size and model.training and torch.is_grad_enabled() and not return_outputs:
            return self._grad_cache_loss(model, inputs)
        if self.args.stage == MNTP_STAGE:
            labels = inputs.pop(LABELS)
            outputs = model(**inputs)
            loss = self.loss(outputs.last_hidden_state, labels)
            return (loss, outputs) if return_outputs else loss
        if self.args.stage == CAPTION_STAGE:  # query, positive and negative in one forward
            text_embeds = model(**inputs[TEXTS]).text_embeds
            self._record_spread(model, text_embeds)
            embeddings = split_roles(text_embeds, inputs[ROLES])
            loss = self.loss(embeddings["query"], embeddings["positive"], embeddings.get("negative"))
            return (loss, embeddings) if return_outputs else loss
        outputs = model(**inputs)
        self._record_spread(model, outputs.image_embeds, outputs.text_embeds)
        loss = self.loss(outputs.image_embeds, outputs.text_embeds, *self._logit_parameters(outputs))
        return (loss, outputs) if return_outputs else loss

    def _record_spread(self, model: nn.Module, *embeddings: torch.Tensor) -> None:
        """Keep the spread of a training batch's embeddings for the step's collapse check (on the device)."""
        if model.training and self.args.collapse_spread_ratio > 0:
            self._batch_spread = embedding_spread(*embeddings)

    def _log_candidates(self, rows: int) -> float | None:
        """ln(candidates per query) of the stage's InfoNCE loss on ``rows`` local rows (None for other losses)."""
        if self.args.stage == CAPTION_STAGE:
            return math.log(max(2, rows * self.args.world_size * (2 if self.args.hard_negatives else 1)))
        if self.args.stage == CLIP_STAGE and self.args.loss_type == "clip":
            return math.log(max(2, rows * self.args.world_size))
        return None

    def _logit_parameters(self, source: LLM2CLIPModel | LLM2CLIPOutput) -> tuple[torch.Tensor, ...]:
        """What the stage-2 loss takes besides the embeddings: ``logit_scale``, and SigLIP's ``logit_bias``; from
        the model's output (a sharded model's parameters are whole only inside ``forward``) or the model itself."""
        return (source.logit_scale, source.logit_bias) if self.args.loss_type == "siglip" else (source.logit_scale,)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step (its backward goes through ``accelerator.backward``: loss scaling, DeepSpeed, ...).
        With ``gradcache_chunk_size`` the loss is a GradCache loss (see :meth:`compute_loss`). The loss's
        finiteness is recorded on the device and checked once per optimizer step, before the update."""
        inputs = self._data_statistics.add(inputs)
        rows = inputs.get(ROW_INDEX)
        self._batch_spread = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.gradcache_chunk_size and self.accelerator.sync_gradients and \
                self.accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            # GradCache's second pass runs the unwrapped module, outside DDP's forward, so DDP's reducer did not
            # average these gradients: average the accumulated ones once per optimizer step (DeepSpeed reduces
            # them itself).
            average_gradients(p for p in self.accelerator.unwrap_model(model).parameters() if p.requires_grad)
        num_rows = len(rows) if rows is not None else None
        self._micro_step_records.append((loss.detach(), rows, self._batch_spread,
                                         self._log_candidates(num_rows) if num_rows else None))
        return loss

    def _check_step_health(self) -> None:
        """This optimizer step's health, summed over its micro-batches and all-reduced over the processes (one small
        collective and one device sync per step), so every process acts on the same numbers: stop on a non-finite
        loss anywhere; warn (or stop) on collapsed embeddings."""
        records, self._micro_step_records = self._micro_step_records, []
        if not records:
            return
        device = records[0][0].device
        losses = torch.stack([loss.float().reshape(()) for loss, _, _, _ in records])
        finite = torch.isfinite(losses)
        spreads = [spread.float() for _, _, spread, _ in records if spread is not None]
        log_candidates = [value for _, _, _, value in records if value is not None]
        totals = torch.stack([
            (~finite).sum().float(),
            torch.stack(spreads).sum() if spreads else torch.zeros((), device=device),
            torch.tensor(float(len(spreads)), device=device),
            torch.where(finite, losses, torch.zeros_like(losses)).sum(),
            finite.sum().float(),
            torch.tensor(float(sum(log_candidates)), device=device),
            torch.tensor(float(len(log_candidates)), device=device),
        ]).to(device)
        totals = self.accelerator.reduce(totals, reduction="sum").tolist()
        non_finite, spread_sum, spread_count, loss_sum, loss_count, candidates_sum, candidates_count = totals
        if non_finite:
            failures = [(self.args.process_index, float(losses[i]), rows.tolist() if rows is not None else None)
                        for i, (_, rows, _, _) in enumerate(records) if not bool(finite[i])]
            self._stop_on_non_finite_loss(gather_object(failures) if self.args.world_size > 1 else failures)
        health = StepHealth(
            spread=spread_sum / spread_count if spread_count else None,
            loss=loss_sum / loss_count if loss_count else None,
            log_candidates=candidates_sum / candidates_count if candidates_count else None,
        )
        step = self.state.global_step + 1
        if self._collapse.update(step, health):
            message = self._collapse.describe(health, self.args.learning_rate,
                                              self.args.get_warmup_steps(self.state.max_steps))
            if not self.args.stop_on_collapse:
                logger.warning(message)
                return
            last_good = checkpoint_before(self.args.output_dir, self._collapse.streak_start)
            kept = (f"The last checkpoint saved before the collapse is {last_good}; resume from it with a lower "
                    "learning rate or a longer warmup." if last_good else
                    "No checkpoint was saved before the collapse began (save_steps).")
            raise EmbeddingCollapseError(f"Stopped at step {step} (stop_on_collapse=True). {message} {kept} Nothing "
                                         "was saved from the collapsed steps.")

    def _stop_on_non_finite_loss(self, failures: list[tuple[int, float, list[int] | None]]) -> None:
        """Every process saves the last good state together (this step's update has not been applied), then every
        process stops with the same message naming the step, and each failing process's loss and rows."""
        self._save_checkpoint(self.model, trial=None)
        checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        where = "; ".join(f"process {rank}: loss {loss}, batch rows {rows if rows is not None else 'unknown'}"
                          for rank, loss, rows in failures)
        raise FloatingPointError(
            f"Non-finite loss at step {self.state.global_step + 1} ({where}). The last good state is saved in "
            f"{checkpoint}. Check those rows (and the learning rate), then resume with resume_from_checkpoint."
        )

    def _grad_cache_loss(self, model, inputs) -> torch.Tensor:
        """The GradCache loss of the batch: its backward (by the Trainer, through ``accelerator.backward``) gives
        the exact gradient of the loss over the whole batch, with activations held for one chunk at a time."""
        unwrapped = self.accelerator.unwrap_model(model)
        encoders, batches, loss_fn = self._grad_cache_parts(unwrapped, inputs)
        loss_parameters = self._logit_parameters(unwrapped) if self.args.stage == CLIP_STAGE else ()
        encoders = {role: self._in_autocast(encoder) for role, encoder in encoders.items()}
        return grad_cache_loss(encoders, batches, loss_fn, self.args.gradcache_chunk_size, loss_parameters)

    def _in_autocast(self, encoder):
        """``encoder`` run in the mixed-precision context of the accelerator (accelerate applies it to the wrapped
        model's ``forward`` only; GradCache calls encoders directly, in both passes), with float32 outputs as the
        wrapped forward returns them."""
        def run(batch):
            with self.accelerator.autocast():
                return encoder(batch).float()

        return run

    def _grad_cache_parts(self, model, inputs):
        """Per-role encoders and inputs, and the loss on their embeddings, for :func:`grad_cache_loss`."""
        if self.args.stage == CAPTION_STAGE:
            encoders = {TEXTS: lambda batch: model(**batch).text_embeds}

            def caption_loss(embeddings):
                self._record_spread(model, embeddings[TEXTS])
                roles = split_roles(embeddings[TEXTS], inputs[ROLES])
                return self.loss(roles["query"], roles["positive"], roles.get("negative"))

            return encoders, {TEXTS: inputs[TEXTS]}, caption_loss
        text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        encoders = {"image": lambda batch: model.get_image_features(pixel_values=batch["pixel_values"]),
                    "text": lambda batch: model.get_text_features(**batch)}

        def clip_loss(embeddings):
            self._record_spread(model, embeddings["image"], embeddings["text"])
            return self.loss(embeddings["image"], embeddings["text"], *self._logit_parameters(model))

        return encoders, {"image": {"pixel_values": inputs["pixel_values"]}, "text": text_inputs}, clip_loss

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; the result's metrics also count, over all processes and DataLoader workers, the rows
        skipped for unreadable images and the captions truncated to the token budget. Under FSDP, ``logit_scale`` /
        ``logit_bias`` become 1-element first (:func:`make_logit_parameters_one_element`)."""
        if self.is_fsdp_enabled and self.args.stage == CLIP_STAGE:  # before the optimizer and the wrapping
            make_logit_parameters_one_element(self.accelerator.unwrap_model(self.model))
        self._data_statistics = DataStatistics()
        self._micro_step_records = []
        self._collapse = CollapseMonitor(self.args.collapse_spread_ratio, self.args.collapse_patience)
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
            eval_dataset = self._prepare_dataset(eval_dataset, False)
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
        """Stage metrics of the current model on ``dataset`` (see :meth:`evaluate`)."""
        model = self._base_model()
        batch_size = self.args.per_device_eval_batch_size
        if self.args.stage in TEXT_STAGES:
            if len(self.args.caption_columns) != 2 or not set(self.args.caption_columns) <= set(dataset.column_names):
                return {}  # an MNTP evaluation of other than two caption columns: the loss only
            return evaluate_caption_retrieval(model, dataset, self.args.caption_columns, batch_size=batch_size,
                                              show_progress_bar=False)
        return evaluate_retrieval(model, dataset, self.args.image_column, self.args.caption_columns,
                                  batch_size=batch_size, show_progress_bar=False)

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

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Checkpoints: the Trainer's own format (LoRA adapter + optimizer). Final saves: the merged model, from the
        ``state_dict`` the Trainer consolidates under FSDP / DeepSpeed (the model then holds only shards), else from
        the model. Only the process that saves (``args.should_save``) writes anything."""
        if self._saving_checkpoint:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        base = self._base_model()
        self._attach_text_model_for_save(base)
        if state_dict is None:
            weights = merged_state_dict(base)
        else:  # the trained model's keys; under PEFT (stage 1) the base model's follow "base_model.model."
            prefix = "base_model.model." if isinstance(self.accelerator.unwrap_model(self.model), PeftModel) else ""
            weights = merge_lora_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items()}, base)
            if isinstance(base, LLM2CLIPModel) and base.text_model is not None and \
                    not any(k.startswith("text_model.") for k in weights):  # attached after the model was wrapped
                weights.update({f"text_model.{k}": v for k, v in base.text_model.state_dict().items()})
        for name in LOGIT_PARAMETERS:  # 0-d as in every CLIP checkpoint, also after FSDP's 1-element training copy
            if name in weights:
                weights[name] = weights[name].reshape(())
        base.save_pretrained(output_dir, state_dict=weights, safe_serialization=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self._write_model_card(output_dir)

    def _attach_text_model_for_save(self, base: LLM2CLIPTextModel | LLM2CLIPModel) -> None:
        """Stage 2 trained without the LLM (it reads cached embeddings): embed ``text_model_on_save`` into the saved
        model (frozen), so it reads raw text and ships a processor. Done once, by the saving process, at the first
        final save: no process holds the LLM while training."""
        if self._text_model_on_save is None or not isinstance(base, LLM2CLIPModel) or base.text_model is not None:
            return
        from ..conversion.vision_sources import attach_text_model

        source = self._text_model_on_save
        text_model = source if isinstance(source, nn.Module) else source()
        attach_text_model(base, text_model)
        base.text_model.requires_grad_(False).eval()

    def create_model_card(self, model_name: str | None = None, dataset_name: str | list[str] | None = None,
                          **kwargs: Any) -> None:
        """Write README.md to the output directory: stage, base models, data, hyperparameters, last metrics."""
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir, model_name, dataset_name)

    def _write_model_card(self, output_dir: str, model_name: str | None = None,
                          dataset_name: str | list[str] | None = None) -> None:
        base = self._base_model()
        if isinstance(base, LLM2CLIPTextModel):
            base_models = [base.name_or_path]
        else:
            base_models = [base.name_or_path, base.config.text_model_name_or_path]
        datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
        metrics = {}
        for entry in self.state.log_history:
            metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
        cra = [(entry["step"], entry["eval_cra"]) for entry in self.state.log_history if "eval_cra" in entry]
        cra_before = cra[0][1] if cra and cra[0][0] == 0 else None
        cra_after = cra[-1][1] if cra and cra[-1][0] > 0 else None
        card = build_model_card(
            repo=model_name or getattr(self, "hub_model_id", None) or os.path.basename(os.path.abspath(output_dir)),
            args=self.args, base_models=base_models, datasets=datasets,
            num_train_examples=len(self.train_dataset) if has_length(self.train_dataset) else None,
            metrics=metrics, world_size=self.args.world_size, cra_before=cra_before, cra_after=cra_after,
            model=base,
        )
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
