"""`llm2clip-hf train`: data, models and cache from command-line arguments, then ``LLM2CLIPTrainer``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset

from .data import (
    drop_bad_caption_rows,
    embedding_column,
    load_dataset_from_spec,
    precompute_text_embeddings,
    read_cache_metadata,
    with_row_index,
)
from .model_loading import load_clip_model
from .modeling import LLM2CLIPModel
from .trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from .trainers.training_args import CAPTION_STAGE
from .vision_sources import llm2clip_from_pretrained_vision


def has_cache(dataset: Dataset, caption_columns: list[str]) -> bool:
    """Whether ``dataset`` already carries cached embeddings of every caption column."""
    return read_cache_metadata(dataset) is not None and all(
        embedding_column(c) in dataset.column_names for c in caption_columns)


def train_from_cli(text: Any, data: Any, clip: Any, args: LLM2CLIPTrainingArguments,
                   precision: Any = None) -> dict[str, Any] | None:
    """Run one training stage as the CLI describes it; return (and save) the metrics on the main process.

    ``precision`` (the CLI's ``--dtype`` / ``--attn-implementation``) applies to the LLM; the stage-2 cache step
    embeds on this process's training device, every process taking its share of the shards."""
    state = PartialState()
    if args.stage != CAPTION_STAGE:
        clip.check()  # before any data is read: conflicting model options end the run at once
    image_column = args.image_column if args.stage != CAPTION_STAGE else None
    train = load_dataset_from_spec(data.dataset, data.split, image_column)
    if data.max_samples:
        train = train.select(range(min(data.max_samples, len(train))))
    evaluation = None
    if data.eval_dataset or data.eval_split:
        evaluation = load_dataset_from_spec(data.eval_dataset or data.dataset, data.eval_split or data.split,
                                            image_column)
    output_dir = Path(args.output_dir)
    text_model = None
    if args.stage == CAPTION_STAGE:
        model = text_model = text.load(precision)
    else:
        cached = args.text_source == "cached"
        needs_text_model = clip.model is None or text.text_model is not None or (
            cached and not has_cache(train, args.caption_columns))
        text_model = text.load(precision) if needs_text_model else None
        embed = clip.embed_text_model or not cached
        if clip.model is not None:
            model = load_clip_model(clip.model)
        elif clip.vision_model is not None:
            # A pretrained image side (CLIP, SigLIP, EVA-CLIP, or an LLM2CLIP model): kept exactly; the adapter is
            # new unless the source has one for this LLM's width.
            model = llm2clip_from_pretrained_vision(clip.vision_model, text_model, embed_text_model=embed,
                                                    projection_dim=clip.projection_dim)
        else:
            # A new tower; with --loss-type siglip it gets SigLIP's learnable bias and temperature at SigLIP's init.
            siglip = dict(logit_bias_init_value=-10.0, logit_scale_init_value=math.log(10.0)) \
                if args.loss_type == "siglip" else {}
            model = LLM2CLIPModel.from_text_model(
                text_model, clip.vision_config(), embed_text_model=embed,
                projection_dim=1280 if clip.projection_dim is None else clip.projection_dim, **siglip)
        if cached:
            cache_dir = Path(data.embedding_cache) if data.embedding_cache else output_dir / "_embedding_cache"
            needs_cache = [part for part in (train, evaluation) if part is not None
                           and not has_cache(part, args.caption_columns)]
            if needs_cache:
                text_model.to(args.device)
            if not has_cache(train, args.caption_columns):
                # The training policy for bad captions (skip_bad_rows) applies before embedding; row indices keep
                # naming the rows of the given dataset.
                train = drop_bad_caption_rows(with_row_index(train), args.caption_columns, args.skip_bad_rows)
                train = precompute_text_embeddings(train, text_model, args.caption_columns, cache_dir,
                                                   batch_size=args.per_device_eval_batch_size)
            if evaluation is not None and not has_cache(evaluation, args.caption_columns):
                evaluation = precompute_text_embeddings(
                    evaluation, text_model, args.caption_columns, cache_dir.with_name(cache_dir.name + "_eval"),
                    batch_size=args.per_device_eval_batch_size)
            if needs_cache and model.text_model is not text_model:
                text_model.to("cpu")  # the LLM is not part of the trained model: free the accelerator for training
    if evaluation is None and data.eval_fraction > 0:
        parts = train.train_test_split(test_size=data.eval_fraction, seed=args.seed)
        train, evaluation = parts["train"], parts["test"]
    trainer = LLM2CLIPTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                              text_model=text_model if args.stage != CAPTION_STAGE else None)
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
