"""`llm2clip-hf train`: data, models and cache from command-line arguments, then ``LLM2CLIPTrainer``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_from_disk
from transformers.utils import logging as hf_logging

from ..data import (
    drop_bad_caption_rows,
    embedding_column,
    join_stream_embeddings,
    load_dataset_from_spec,
    precompute_text_embeddings,
    read_cache_metadata,
    text_model_fingerprint,
    with_row_index,
)
from ..conversion.model_loading import load_clip_model, load_lm_head
from ..modeling import LLM2CLIPModel
from ..data import text_pair_source
from ..trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from ..trainers.deepspeed_settings import models_built_whole
from ..trainers.training_args import CAPTION_STAGE, MNTP_STAGE, TEXT_STAGES
from ..conversion.pretrained_vision import build_from_pretrained_vision
from ..evaluation.teacher_quality import TeacherStatistics

logger = hf_logging.get_logger(__name__)


def has_cache(dataset: Dataset, caption_columns: list[str]) -> bool:
    """Whether ``dataset`` already carries cached embeddings of every caption column."""
    return read_cache_metadata(dataset) is not None and all(
        embedding_column(c) in dataset.column_names for c in caption_columns)


def check_streaming_options(data: Any, args: LLM2CLIPTrainingArguments) -> None:
    """Streams train stage 2 for a set number of steps from a finished cache; say what is missing otherwise."""
    problems = []
    if args.stage in TEXT_STAGES:
        problems.append("--streaming is for stage 2 (--stage clip)")
    if args.max_steps is None or args.max_steps <= 0:
        problems.append("a stream has no length: give --max-steps")
    if data.eval_fraction > 0 or data.eval_dataset or data.eval_split:
        problems.append("evaluation during a streamed run is not supported: evaluate the saved model with "
                        "`llm2clip-hf evaluate`")
    if args.text_source == "cached" and not data.embedding_cache:
        problems.append("cached embeddings of a stream come from a finished --embedding-cache made by "
                        "`llm2clip-hf embed --key-column KEY` on the same rows")
    if problems:
        raise ValueError("--streaming: " + "; ".join(problems) + ".")
    if args.text_source == "cached":
        load_stream_cache(data)  # before any data is read


def load_stream_cache(data: Any) -> Dataset:
    """The finished cache that a stream joins by key."""
    folder = Path(data.embedding_cache)
    if not (folder / "state.json").is_file():
        raise ValueError(f"--embedding-cache {folder} is not a finished embedding cache. Make it first: llm2clip-hf "
                         f"embed --dataset <the same rows, map-style> --key-column {data.key_column} "
                         f"--output-dir {folder}.")
    cache = load_from_disk(str(folder))
    if not (read_cache_metadata(cache) or {}).get("key_column"):
        raise ValueError(f"The embedding cache {folder} has no key column to join a stream by; remake it with "
                         f"`llm2clip-hf embed --key-column {data.key_column}`.")
    return cache


def new_adapter_input_normalization(clip: Any, cached: Any, args: LLM2CLIPTrainingArguments
                                    ) -> tuple[str | None, TeacherStatistics | None]:
    """The input normalisation a new adapter of this run gets, and the teacher statistics when they were measured
    (the trainer reuses them): ``--adapter-input-normalization`` as given, ``None`` for ``none``; ``auto`` runs the
    teacher check on the cached training embeddings (map-style data or the stream's cache; refusing a degenerate
    teacher unless ``--allow-degenerate-teacher``), whatever the image side, and gives ``center`` when they are
    dominated by one common component. :func:`apply_adapter_input_normalization` applies it once the model is built
    and it is known whether its adapter is new."""
    from ..evaluation.teacher_quality import SKIPPED, auto_adapter_input_normalization, check_cached_teacher

    choice = clip.adapter_input_normalization
    if choice not in ("auto", "none", "center", "standardize"):
        raise ValueError(f"--adapter-input-normalization must be auto, none, center or standardize, got {choice!r}.")
    if choice != "auto":
        return (None if choice == "none" else choice), None
    if cached is None:
        return None, None
    statistics = check_cached_teacher(cached, args.caption_columns, args.allow_degenerate_teacher,
                                      "--allow-degenerate-teacher true", args.seed)
    if statistics.verdict == SKIPPED:
        logger.warning(f"Teacher check {statistics.describe()}: --adapter-input-normalization auto keeps the official "
                       "adapter (give center to center a new adapter's input).")
    return auto_adapter_input_normalization(statistics), statistics


def apply_adapter_input_normalization(model: LLM2CLIPModel, adapter_is_new: bool, normalization: str | None,
                                      clip: Any, statistics: TeacherStatistics | None) -> None:
    """Give a new adapter the input normalisation :func:`new_adapter_input_normalization` chose (in place). An adapter
    that comes with the loaded model (``--model``, or a ``--vision-model`` with an adapter for this LLM's width)
    learnt its weights on its own inputs and is left as it is: ``auto`` keeps it, and an explicit
    ``--adapter-input-normalization`` it does not have is refused."""
    from ..conversion.text_attachment import set_adapter_input_normalization

    choice, current = clip.adapter_input_normalization, model.config.adapter_input_normalization
    if not adapter_is_new:
        if choice != "auto" and normalization != current:
            source = clip.model if clip.model is not None else clip.vision_model
            raise ValueError(
                f"--adapter-input-normalization {choice} sets the input normalisation of a new text adapter, but the "
                f"adapter of {source} comes with the model, trained with input normalisation {current or 'none'}; "
                "changing it would feed the trained weights inputs they never saw. Drop the flag (or give auto) to "
                "keep the adapter as it is, or train a new adapter from a source without one for this LLM.")
        if normalization is not None:
            logger.info(f"--adapter-input-normalization auto would center a new adapter's input; the adapter of "
                        f"{clip.model or clip.vision_model} comes with the model and is kept as it is (input "
                        f"normalisation {current or 'none'}).")
        return
    if normalization == current:
        return
    if choice == "auto":
        logger.warning(f"Teacher check: the cached caption embeddings are dominated by one common component "
                       f"({statistics.describe()}); the new adapter centers its input (--adapter-input-normalization "
                       "auto; give none to keep the official adapter).")
    set_adapter_input_normalization(model, normalization)


def check_pair_options(data: Any, args: LLM2CLIPTrainingArguments) -> None:
    """``--pair-*`` and ``--source-mixing-weights`` fit each other and the stage; say how otherwise."""
    pairs, problems = list(data.pair_dataset or []), []
    if pairs and args.stage != CAPTION_STAGE:
        problems.append("--pair-dataset adds text pairs to stage 1: use it with --stage caption")
    if len(set(pairs)) < len(pairs) or data.dataset in pairs:
        problems.append("give each --pair-dataset once, and none that is also --dataset")
    if data.pair_instruction is not None and len(data.pair_instruction) != len(pairs):
        problems.append(f"--pair-instruction takes one instruction per --pair-dataset ({len(pairs)}), got "
                        f"{len(data.pair_instruction)}; use '' for none")
    if data.pair_columns is not None and (not pairs or len(data.pair_columns) not in (2, 3)):
        problems.append(f"--pair-columns takes QUERY POSITIVE [NEGATIVE], the column names of the --pair-dataset "
                        f"data, got {data.pair_columns}")
    weights = args.source_mixing_weights
    if weights is not None and not pairs:
        problems.append("--source-mixing-weights weighs --dataset against each --pair-dataset: give --pair-dataset "
                        "or drop the weights")
    elif weights is not None and len(weights) != 1 + len(pairs):
        problems.append(f"--source-mixing-weights takes one weight per source, --dataset first and then each "
                        f"--pair-dataset ({1 + len(pairs)}), got {len(weights)}")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def load_pair_sources(data: Any) -> dict[str, Dataset]:
    """The ``--pair-dataset`` sources, named by their paths, as text-pair sources (:func:`text_pair_source`)."""
    instructions = data.pair_instruction or [None] * len(data.pair_dataset)
    sources = {}
    for spec, instruction in zip(data.pair_dataset, instructions):
        pairs = load_dataset_from_spec(spec, data.split)
        if data.max_samples:
            pairs = pairs.select(range(min(data.max_samples, len(pairs))))
        sources[spec] = text_pair_source(pairs, instruction, *(data.pair_columns or []))
    return sources


def train_from_cli(text: Any, data: Any, clip: Any, args: LLM2CLIPTrainingArguments,
                   precision: Any = None) -> dict[str, Any] | None:
    """Run one training stage as the CLI describes it; return (and save) the metrics on the main process.

    ``precision`` (the CLI's ``--dtype`` / ``--attn-implementation``) applies to the LLM; the stage-2 cache step
    embeds on this process's training device, every process taking its share of the shards."""
    state = PartialState()
    if args.stage not in TEXT_STAGES:
        clip.check()  # before any data is read: conflicting model options end the run at once
    image_column = args.image_column if args.stage not in TEXT_STAGES else None
    if data.streaming:
        check_streaming_options(data, args)
    check_pair_options(data, args)
    pair_sources = load_pair_sources(data) if data.pair_dataset else {}
    train = load_dataset_from_spec(data.dataset, data.split, image_column, streaming=data.streaming)
    if data.max_samples:
        train = train.take(data.max_samples) if data.streaming else train.select(range(min(data.max_samples,
                                                                                                 len(train))))
    evaluation = None
    if data.eval_dataset or data.eval_split:
        evaluation = load_dataset_from_spec(data.eval_dataset or data.dataset, data.eval_split or data.split,
                                            image_column)
    with models_built_whole():  # under ZeRO-3, the Trainer partitions them
        output_dir = Path(args.output_dir)
        text_model = lm_head = teacher_statistics = None
        attach_on_save = False
        if args.stage in TEXT_STAGES:
            model = text_model = text.load(precision)
            if args.stage == MNTP_STAGE and not getattr(text_model.config.llm_config, "tie_word_embeddings", False):
                lm_head = load_lm_head(text.text_model, **{"gguf_file": text.gguf_file} if text.gguf_file else {},
                                       **(precision.from_pretrained_kwargs() if precision is not None else {}))
        else:
            cached = args.text_source == "cached"
            built_cache = False
            needs_text_model = clip.model is None or text.text_model is not None or (
                cached and not data.streaming and not has_cache(train, args.caption_columns))
            text_model = text.load(precision) if needs_text_model else None
            # Training on cached embeddings needs no LLM in the model: it is embedded at the final save (loaded again
            # there, by the saving process only), so no process holds a second copy of it while training.
            embed = not cached
            attach_on_save = cached and clip.embed_text_model and text_model is not None
            if cached and data.streaming:
                cache = load_stream_cache(data)
                train = join_stream_embeddings(train, cache, key_column=data.key_column,
                                               cache_key_column=read_cache_metadata(cache)["key_column"])
            elif cached:
                cache_dir = Path(data.embedding_cache) if data.embedding_cache else output_dir / "_embedding_cache"
                needs_cache = [part for part in (train, evaluation) if part is not None
                               and not has_cache(part, args.caption_columns)]
                if needs_cache:
                    text_model.to(args.device)
                built_cache = not has_cache(train, args.caption_columns)
                if built_cache:
                    # The training policy for bad captions (skip_bad_rows) applies before embedding; row indices keep
                    # naming the rows of the given dataset.
                    train = drop_bad_caption_rows(with_row_index(train), args.caption_columns, args.skip_bad_rows)
                    train = precompute_text_embeddings(train, text_model, args.caption_columns, cache_dir,
                                                       batch_size=args.per_device_eval_batch_size)
                if evaluation is not None and not has_cache(evaluation, args.caption_columns):
                    evaluation = precompute_text_embeddings(
                        evaluation, text_model, args.caption_columns, cache_dir.with_name(cache_dir.name + "_eval"),
                        batch_size=args.per_device_eval_batch_size)
            normalization, teacher_statistics = new_adapter_input_normalization(
                clip, cache if cached and data.streaming else train if cached else None, args)
            args.seed_random_generators()  # a new tower and adapter start from the seed
            if clip.model is not None:
                model, adapter_is_new = load_clip_model(clip.model), False
            elif clip.vision_model is not None:
                # A pretrained image side (CLIP, SigLIP, EVA-CLIP, or an LLM2CLIP model): kept exactly; the adapter is
                # new unless the source has one for this LLM's width.
                model, built = build_from_pretrained_vision(clip.vision_model, text_model, embed_text_model=embed,
                                                            projection_dim=clip.projection_dim)
                adapter_is_new = built["adapter"] == "new"
            else:
                # A new tower; with --loss-type siglip it gets SigLIP's learnable bias and temperature at SigLIP's init.
                siglip = dict(logit_bias_init_value=-10.0, logit_scale_init_value=math.log(10.0)) \
                    if args.loss_type == "siglip" else {}
                model = LLM2CLIPModel.from_text_model(
                    text_model, clip.vision_config(), embed_text_model=embed,
                    projection_dim=1280 if clip.projection_dim is None else clip.projection_dim, **siglip)
                adapter_is_new = True
            apply_adapter_input_normalization(model, adapter_is_new, normalization, clip, teacher_statistics)
            if cached and text_model is not None:
                # The trainer checks the cache against this fingerprint (that of a cache just made is the LLM's); the
                # LLM itself is not kept for training.
                model.config.text_model_fingerprint = read_cache_metadata(train)["fingerprint"] if built_cache else \
                    text_model_fingerprint(text_model)
                text_model = None
    if evaluation is None and data.eval_fraction > 0:
        parts = train.train_test_split(test_size=data.eval_fraction, seed=args.seed)
        train, evaluation = parts["train"], parts["test"]
    if pair_sources:  # stage 1 on named sources; evaluation stays on the captions
        train = {data.dataset: train, **pair_sources}
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                              text_model=text_model if args.stage not in TEXT_STAGES else None, lm_head=lm_head,
                              text_model_on_save=(lambda: text.load(precision)) if attach_on_save else None,
                              teacher_statistics=teacher_statistics)
    resume = args.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume in ("true", "True") else resume)
    trainer.save_model()
    metrics: dict[str, Any] = {"stage": args.stage, "output_dir": str(output_dir), **result.metrics}
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    if args.push_to_hub:
        trainer.push_to_hub()
    if not state.is_main_process:
        return None
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
