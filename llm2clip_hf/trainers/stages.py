"""What each LLM2CLIP stage adds to the Trainer: the model it trains, how a dataset becomes training rows, the
batch collator, the default loss, and how a batch is embedded and scored (in one forward, or per encoder for
GradCache). :class:`~.trainer.LLM2CLIPTrainer` holds one stage and stays the same for all three."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import datasets as hf_datasets
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn
from transformers.utils import logging as hf_logging

from ..conversion import unwrap_peft
from ..data import (
    ROW_INDEX,
    CLIPImageTransform,
    ImageTextCollator,
    MaskedTextCollator,
    TextPairCollator,
    build_caption_pairs,
    build_mntp_texts,
    build_text_pairs,
    check_cache_rows,
    check_embedding_cache,
    drop_bad_caption_rows,
    drop_bad_stream_caption_rows,
    embedding_column,
    embedding_statistics,
    require_columns,
    text_model_fingerprint,
    with_key_row_index,
    with_row_index,
)
from ..data.masked_next_token import LABELS, TEXT
from ..evaluation.teacher_quality import DOMINATED, TeacherStatistics, check_cached_teacher, check_teacher
from ..data.text_pairs import POSITIVE, QUERY, QUERY_INSTRUCTION, ROLES, TEXTS, check_negatives_agree, split_roles
from ..modeling import LLM2CLIPModel, LLM2CLIPOutput, LLM2CLIPTextModel
from ..modeling.configuration_llm2clip_text import is_encoder_config
from .losses import (
    CaptionContrastiveLoss,
    CLIPContrastiveLoss,
    MaskedNextTokenLoss,
    SigLIPContrastiveLoss,
    output_head,
)
from .training_args import CAPTION_STAGE, CLIP_STAGE, DEFAULT_LORA_TARGETS, MNTP_STAGE, LLM2CLIPTrainingArguments

logger = hf_logging.get_logger(__name__)

Encoders = dict[str, Callable[[dict[str, Any]], torch.Tensor]]
# What GradCacheLoss needs from a stage: encoders per role, their inputs, the loss on the embeddings, its parameters.
GradCacheParts = tuple[Encoders, dict[str, dict[str, Any]], Callable[[dict[str, torch.Tensor]], torch.Tensor],
                       tuple[torch.Tensor, ...]]
EmbeddingsObserver = Callable[..., None]  # (model, *embeddings) of a training batch, for the health checks

LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


def default_lora_config(args: LLM2CLIPTrainingArguments, text_model: LLM2CLIPTextModel | None = None) -> LoraConfig:
    """The official LoRA: r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up and down projections. An encoder
    (BERT, ... from a sentence-transformers model) names its layers otherwise: with the default targets it gets LoRA
    on every linear layer (``"all-linear"``: BERT's query, key, value and dense), as a decoder gets on all of its."""
    targets: list[str] | str = list(args.lora_target_modules)
    if text_model is not None and targets == DEFAULT_LORA_TARGETS and is_encoder_config(text_model.config.llm_config):
        targets = "all-linear"
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none")


def check_sources(args: LLM2CLIPTrainingArguments, train_dataset: Any, eval_dataset: Any) -> None:
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


def check_global_batch(rows: int, per_device: int, processes: int, split_batches: bool = False) -> None:
    """Refuse contrastive training data with fewer rows than one global batch on several processes: accelerate
    completes a short global batch with rows from the start of the epoch, and with fewer rows than the batch some
    of those are already in it, each then a false negative of itself. (With at least a global batch of rows the
    completing rows come from other batches: repeated in the epoch, never twice in one batch.)"""
    global_batch = per_device if split_batches else per_device * processes
    if processes < 2:
        return  # one process: a short last batch is smaller, never padded with repeats
    if rows < global_batch:
        fitting = rows if split_batches else rows // processes
        raise ValueError(
            f"The training data has {rows} rows, fewer than one global batch of {global_batch} ({per_device} per "
            f"process x {processes} processes): accelerate would fill the batch with {global_batch - rows} repeated "
            f"rows, each then a false negative of itself. Use per_device_train_batch_size <= {fitting}, fewer "
            "processes, or more data."
        )


def check_stream_accumulation(processes: int, accumulation_steps: int) -> None:
    """Refuse gradient accumulation over a stream on several processes. Each process reads its own part of the
    stream and the parts differ in rows, so a process whose pass ends inside an accumulation group steps with fewer
    micro-batches than the others and the processes' collectives stop lining up (2 processes, 11 rows in 2 shards,
    batch 1, accumulation 2: a hang)."""
    if processes > 1 and accumulation_steps > 1:
        raise ValueError(
            f"gradient_accumulation_steps={accumulation_steps} over a stream on {processes} processes is not "
            "supported: the processes' parts of the stream differ in length, and one whose pass ends inside an "
            "accumulation group would step with fewer micro-batches than the others (the run hangs). For a larger "
            "contrastive batch set gradcache_chunk_size (GradCache: the whole global batch's negatives at the "
            "memory of one chunk, which accumulation does not give), raise per_device_train_batch_size, or train "
            "on map-style data (a Dataset on disk)."
        )


def require_text_model(model: nn.Module, stage: str) -> LLM2CLIPTextModel:
    """The LLM2CLIPTextModel a text stage trains (under its PEFT wrapper, if any)."""
    base = unwrap_peft(model)
    if not isinstance(base, LLM2CLIPTextModel):
        raise TypeError(f"stage={stage!r} trains an LLM2CLIPTextModel, got {type(base).__name__}. Build one with "
                        "LLM2CLIPTextModel.from_llm(...).")
    return base


class TrainingStage:
    """One stage's part of training. ``observe`` receives a training batch's embeddings (the collapse check), one
    batch per side named in ``embedding_sides``, in that order."""

    name: str
    embedding_sides: tuple[str, ...] = ()

    def __init__(self, args: LLM2CLIPTrainingArguments, observe: EmbeddingsObserver | None = None) -> None:
        self.args = args
        self.observe = observe or (lambda model, *embeddings: None)
        self.text_model: LLM2CLIPTextModel | None = None

    def setup_model(self, model: nn.Module, peft_config: LoraConfig | None) -> nn.Module:
        """The model to train (with LoRA where the stage trains the LLM)."""
        raise NotImplementedError

    def prepare_dataset(self, data: Any, skip_bad_rows: bool) -> Any:
        """Training rows of ``data`` (idempotent: prepared rows pass unchanged)."""
        raise NotImplementedError

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        raise NotImplementedError

    def default_loss(self) -> nn.Module:
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], loss: nn.Module) -> tuple[torch.Tensor, Any]:
        """The loss of a batch in one forward, and the outputs ``prediction_step`` reports."""
        raise NotImplementedError

    def grad_cache_parts(self, model: nn.Module, inputs: dict[str, Any], loss: nn.Module) -> GradCacheParts:
        """For :class:`~.grad_cache.GradCacheLoss`: the encoders per role, their inputs, the loss on their
        embeddings, and the parameters that loss uses besides them."""
        raise NotImplementedError(f"gradcache_chunk_size is not supported in stage {self.name!r}.")

    def log_candidates(self, rows: int) -> float | None:
        """ln(candidates per query) of the stage's InfoNCE loss on ``rows`` local rows (None for other losses)."""
        return None

    def _text_model_with_lora(self, model: nn.Module, peft_config: LoraConfig | None) -> PeftModel:
        self.text_model = require_text_model(model, self.name)
        return model if isinstance(model, PeftModel) else get_peft_model(
            model, peft_config or default_lora_config(self.args, self.text_model))


class MaskedNextTokenStage(TrainingStage):
    """MNTP (optional, before stage 1): masked tokens predicted from the previous position, bidirectionally."""

    name = MNTP_STAGE

    def __init__(self, args: LLM2CLIPTrainingArguments, lm_head: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(args, **kwargs)
        self.lm_head = lm_head

    def setup_model(self, model, peft_config):
        text_model = require_text_model(model, self.name)
        config = text_model.config
        encoder = is_encoder_config(config.llm_config)
        if encoder or config.padding_side != "left":
            raise ValueError(f"MNTP adapts a left-padded decoder LLM to bidirectional attention; this text model is a "
                             f"{config.llm_config.model_type} {'encoder' if encoder else 'decoder'} padded on the "
                             f"{config.padding_side}. Train stage 1 (stage='caption') on it directly.")
        self.head = output_head(text_model, self.lm_head)  # before LoRA changes the model
        model = self._text_model_with_lora(model, peft_config)
        if not self.text_model.config.bidirectional:
            logger.warning("MNTP adapts an LLM to bidirectional attention, but this text model is causal "
                           "(bidirectional=False); it trains as it is.")
        return model

    def prepare_dataset(self, data, skip_bad_rows):
        if TEXT in data.column_names and ROW_INDEX in data.column_names:
            return data
        data = drop_bad_caption_rows(with_row_index(data), self.args.caption_columns, skip_bad_rows)
        return build_mntp_texts(data, self.args.caption_columns)

    def collator(self):
        return MaskedTextCollator(self.text_model, self.args.mlm_probability, self.args.mask_token)

    def default_loss(self):
        return MaskedNextTokenLoss(self.head)

    def compute_loss(self, model, inputs, loss):
        inputs = dict(inputs)
        labels = inputs.pop(LABELS)
        outputs = model(**inputs)
        return loss(outputs.last_hidden_state, labels), outputs


class CaptionStage(TrainingStage):
    """Stage 1: two captions of one image (or a given text pair) are query and positive; InfoNCE over the batch."""

    name = CAPTION_STAGE
    embedding_sides = ("caption",)

    def setup_model(self, model, peft_config):
        if len(self.args.caption_columns) != 2:
            raise ValueError(f"stage='caption' needs exactly two caption columns (short, long); got "
                             f"{self.args.caption_columns}.")
        return self._text_model_with_lora(model, peft_config)

    def prepare_dataset(self, data, skip_bad_rows):
        if not isinstance(data, Mapping):
            return self._prepare_source(data, skip_bad_rows)
        sources = {name: self._prepare_source(dataset, skip_bad_rows, name) for name, dataset in data.items()}
        check_negatives_agree(sources)
        return sources

    def _prepare_source(self, dataset: Dataset, skip_bad_rows: bool, name: str | None = None) -> Dataset:
        """A caption source (the two caption columns) or a text-pair source (query and positive columns)."""
        args, (short, long) = self.args, self.args.caption_columns
        columns = set(dataset.column_names)
        if {ROW_INDEX, QUERY, QUERY_INSTRUCTION} <= columns:
            return dataset
        if {QUERY, POSITIVE} <= columns and not {short, long} <= columns:
            return build_text_pairs(with_row_index(dataset), args.hard_negatives, skip_bad_rows)
        source = f"Stage-1 source {name!r}" if name is not None else "Stage-1 training"
        require_columns(dataset, [short, long],
                        f"{source} (captions; text pairs would have '{QUERY}' and '{POSITIVE}' columns instead)")
        dataset = drop_bad_caption_rows(with_row_index(dataset), [short, long], skip_bad_rows)
        return build_caption_pairs(dataset, short, long, args.sampling_seed, args.hard_negatives,
                                   short_query_instruction=args.short_query_instruction,
                                   long_query_instruction=args.long_query_instruction)

    def collator(self):
        return TextPairCollator(self.text_model, self.args.instruction_separator)

    def default_loss(self):
        return CaptionContrastiveLoss(self.args.loss_scale, world_size=self.args.world_size,
                                      rank=self.args.process_index, center=self.args.loss_centering)

    def compute_loss(self, model, inputs, loss):  # query, positive and negative in one forward
        embeddings = {TEXTS: model(**inputs[TEXTS]).text_embeds}
        return self._loss_on(model, inputs, loss, embeddings)

    def grad_cache_parts(self, model, inputs, loss):
        encoders = {TEXTS: lambda batch: model(**batch).text_embeds}
        return (encoders, {TEXTS: inputs[TEXTS]},
                lambda embeddings: self._loss_on(model, inputs, loss, embeddings)[0], ())

    def _loss_on(self, model, inputs, loss, embeddings):
        self.observe(model, embeddings[TEXTS])
        roles = split_roles(embeddings[TEXTS], inputs[ROLES])
        return loss(roles["query"], roles["positive"], roles.get("negative")), roles

    def log_candidates(self, rows):
        return math.log(max(2, rows * self.args.world_size * (2 if self.args.hard_negatives else 1)))


class ClipStage(TrainingStage):
    """Stage 2: images against their captions' LLM embeddings (cached, or the LLM in the loop), through the
    adapter; CLIP's InfoNCE or SigLIP's sigmoid loss."""

    name = CLIP_STAGE
    embedding_sides = ("image", "text")

    def __init__(self, args: LLM2CLIPTrainingArguments, text_model: LLM2CLIPTextModel | None = None,
                 **kwargs: Any) -> None:
        super().__init__(args, **kwargs)
        self.cache_text_model = text_model  # the LLM the cache is checked against
        self._cache_text_model_hash = functools.cache(lambda: text_model_fingerprint(text_model))

    @property
    def llm_in_loop(self) -> bool:
        return self.args.text_source in ("frozen", "lora")

    def setup_model(self, model, peft_config):
        args = self.args
        if not isinstance(model, LLM2CLIPModel):
            raise TypeError(f"stage='clip' trains an LLM2CLIPModel, got {type(model).__name__}.")
        if self.llm_in_loop and model.text_model is None:
            raise ValueError(
                f"text_source={args.text_source!r} runs the LLM in the loop, but this LLM2CLIPModel has no embedded "
                "text encoder. Build it with LLM2CLIPConfig(text_config=text_model.config) and copy the weights, or "
                "use text_source='cached' with precomputed embeddings."
            )
        if args.loss_type == "siglip" and getattr(model, "logit_bias", None) is None:
            raise ValueError(
                "loss_type='siglip' trains SigLIP's learnable logit_bias, but this LLM2CLIPModel has none. Build the "
                "model with logit_bias_init_value=-10.0 (SigLIP's init, with logit_scale_init_value=math.log(10)), "
                "e.g. LLM2CLIPModel.from_text_model(text_model, vision_config, logit_bias_init_value=-10.0, "
                "logit_scale_init_value=math.log(10)); or use loss_type='clip'."
            )
        if model.text_model is not None:
            model.text_model.requires_grad_(False)
            if args.text_source == "lora":
                inject_adapter_in_model(peft_config or default_lora_config(args, model.text_model), model.text_model)
        self.model = model
        return model

    def prepare_dataset(self, data, skip_bad_rows):
        # A stream's rows are named by the hash of their key and its bad captions dropped as they are read.
        args, stream = self.args, isinstance(data, hf_datasets.IterableDataset)
        data = with_key_row_index(data) if stream else with_row_index(data)
        require_columns(data, [args.image_column], "CLIP training")
        if self.llm_in_loop:
            drop_bad_rows = drop_bad_stream_caption_rows if stream else drop_bad_caption_rows
            data = drop_bad_rows(data, args.caption_columns, skip_bad_rows)
        else:
            self._check_cache(data)
        if isinstance(data.features[args.image_column], hf_datasets.Image):
            # decode in the collator, where an unreadable image can be skipped or named
            data = data.cast_column(args.image_column, hf_datasets.Image(decode=False))
        if not self.llm_in_loop and not stream:  # cached vectors as numpy arrays, not one Python float per value
            data = data.with_format("numpy", columns=[embedding_column(c) for c in args.caption_columns],
                                    output_all_columns=True)
        return data

    def _check_cache(self, data: Dataset | hf_datasets.IterableDataset) -> None:
        """The cache must be of the given text model, else of the one recorded by earlier training, and (map-style
        data; a stream joins by key) each row's embeddings must be of that row's captions. Hashing the LLM's weights
        is costly (an 8B model: ~16 GB read): once per stage, for every dataset checked."""
        config, text_model = self.model.config, self.cache_text_model
        metadata = check_embedding_cache(
            data, self.args.caption_columns,
            expected_fingerprint=self._cache_text_model_hash() if text_model is not None else
            config.text_model_fingerprint,
            embedding_dim=config.text_embedding_dim,
            expected_dtype=str(text_model.dtype).removeprefix("torch.") if text_model is not None else None)
        if isinstance(data, Dataset):
            check_cache_rows(data)
        config.text_model_fingerprint = metadata["fingerprint"]
        config.text_model_name_or_path = metadata.get("text_model") or config.text_model_name_or_path

    def check_teacher(self, dataset: Any, statistics: TeacherStatistics | None = None) -> TeacherStatistics | None:
        """The teacher check on the training cache (map-style, cached embeddings; a sample of rows): a degenerate
        teacher is refused unless ``allow_degenerate_teacher``; one dominated by a common component, for an adapter
        that does not center its input, is warned about. ``statistics`` already measured on this cache (the CLI's,
        which chose the adapter with them) are used instead of measuring again. Returns the statistics (``None``
        when not checked)."""
        if statistics is not None:
            check_teacher(statistics, self.args.allow_degenerate_teacher)
        elif self.llm_in_loop or not isinstance(dataset, Dataset) or len(dataset) < 2:
            return None
        else:
            statistics = check_cached_teacher(dataset, self.args.caption_columns, self.args.allow_degenerate_teacher,
                                              seed=self.args.seed)
        logger.info(f"Teacher check on the training cache: {statistics.describe()} ({statistics.verdict}).")
        if statistics.verdict == DOMINATED and self.model.config.adapter_input_normalization is None:
            logger.warning(
                f"The teacher's caption embeddings are dominated by one common component ({statistics.describe()}): "
                "after the adapter's L2 normalisation every caption looks nearly the same. Build the model with "
                "adapter_input_normalization='center' (CLI: the default for a new adapter) so the adapter reads the "
                "residual that tells captions apart."
            )
        return statistics

    def fit_adapter_input_statistics(self, dataset: Any) -> None:
        """An adapter with input normalisation (``adapter_input_normalization``) that was never fitted gets the mean
        and standard deviation of the training set's cached embeddings (one pass; every process computes the same
        numbers from the same data). A fitted one (continued training) keeps its statistics."""
        config = self.model.config
        if config.adapter_input_normalization is None or config.adapter_input_statistics_rows:
            return
        if self.args.text_source != "cached" or not isinstance(dataset, Dataset):
            raise ValueError(
                f"adapter_input_normalization={config.adapter_input_normalization!r} fits its statistics on the "
                "training set's cached embeddings, and this run has none to read in one pass (a stream, or the LLM "
                "in the loop). Fit them first: model.text_adapter.set_input_statistics(mean, std) with the mean and "
                "std of llm2clip_hf.data.embedding_statistics(<a cached dataset>, caption_columns), and set "
                "model.config.adapter_input_statistics_rows; or build the model without input normalisation."
            )
        mean, std, count = embedding_statistics(dataset, self.args.caption_columns)
        self.model.text_adapter.set_input_statistics(torch.from_numpy(mean), torch.from_numpy(std))
        config.adapter_input_statistics_rows = count
        logger.info(f"Adapter input normalisation ({config.adapter_input_normalization}) fitted on {count} cached "
                    "caption embeddings of the training set.")

    def collator(self):
        """Training rows (tagged with their epoch) are augmented and may be skipped; evaluation rows are resized
        and center-cropped, with a fixed caption, and never skipped."""
        args, vision_config = self.args, self.model.config.vision_config
        return ImageTextCollator(
            args.image_column, args.caption_columns,
            CLIPImageTransform(vision_config, augment=args.image_augmentation), seed=args.sampling_seed,
            weights=args.caption_sampling_weights, text_model=self.model.text_model if self.llm_in_loop else None,
            skip_bad_rows=args.skip_bad_rows, evaluation_transform=CLIPImageTransform(vision_config, augment=False),
        )

    def default_loss(self):
        args = self.args
        if args.loss_type == "siglip":
            return SigLIPContrastiveLoss(world_size=args.world_size, rank=args.process_index)
        return CLIPContrastiveLoss(world_size=args.world_size, rank=args.process_index)

    def compute_loss(self, model, inputs, loss):
        outputs = model(**inputs)
        self.observe(model, outputs.image_embeds, outputs.text_embeds)
        return loss(outputs.image_embeds, outputs.text_embeds, *self.logit_parameters(outputs)), outputs

    def grad_cache_parts(self, model, inputs, loss):
        text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        encoders = {"image": lambda batch: model.get_image_features(pixel_values=batch["pixel_values"]),
                    "text": lambda batch: model.get_text_features(**batch)}

        def clip_loss(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
            self.observe(model, embeddings["image"], embeddings["text"])
            return loss(embeddings["image"], embeddings["text"], *self.logit_parameters(model))

        batches = {"image": {"pixel_values": inputs["pixel_values"]}, "text": text_inputs}
        return encoders, batches, clip_loss, self.logit_parameters(model)

    def logit_parameters(self, source: LLM2CLIPModel | LLM2CLIPOutput) -> tuple[torch.Tensor, ...]:
        """What the loss takes besides the embeddings: ``logit_scale``, and SigLIP's ``logit_bias``; from the
        model's output (a sharded model's parameters are whole only inside ``forward``) or the model itself."""
        return (source.logit_scale, source.logit_bias) if self.args.loss_type == "siglip" else (source.logit_scale,)

    def log_candidates(self, rows):
        return math.log(max(2, rows * self.args.world_size)) if self.args.loss_type == "clip" else None


def make_logit_parameters_one_element(model: nn.Module) -> None:
    """Give ``logit_scale`` / ``logit_bias`` the shape ``(1,)`` for FSDP and DeepSpeed, which refuse 0-d parameters
    (FSDP: "fully_shard doesn't support scalar parameters"; DeepSpeed's engine broadcasts each parameter as bytes:
    "self.dim() cannot be 0 to view Float as Byte"). The model computes the same (they broadcast); saved models keep the 0-d
    shape of the official and transformers' CLIP checkpoints (:func:`zero_dimensional_logit_parameters`)."""
    for name in LOGIT_PARAMETERS:
        parameter = getattr(model, name, None)
        if isinstance(parameter, nn.Parameter) and parameter.dim() == 0:
            setattr(model, name, nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad))


def zero_dimensional_logit_parameters(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with 0-d logit parameters, as in every CLIP checkpoint (also after FSDP's 1-element copy)."""
    return {name: value.reshape(()) if name in LOGIT_PARAMETERS else value for name, value in weights.items()}


STAGES: dict[str, type[TrainingStage]] = {MNTP_STAGE: MaskedNextTokenStage, CAPTION_STAGE: CaptionStage,
                                          CLIP_STAGE: ClipStage}
