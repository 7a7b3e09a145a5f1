"""DataLoaders for the training data the Trainer's own loader cannot serve: a stream each process reads its own part
of, and whole batches drawn by a batch sampler (mixed stage-1 sources). Both take the Trainer's DataLoader settings
and seed their workers as the Trainer does."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch.utils.data import DataLoader, Sampler
from transformers.trainer_utils import seed_worker


def training_data_loader(dataset: Any, collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]], args: Any, *,
                         batch_size: int | None = None, batch_sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` with the settings of ``args`` (a ``TrainingArguments``: workers, pinned memory,
    persistence, prefetching, order, ``dataloader_drop_last``) and the Trainer's worker seeding; batches of
    ``batch_size`` rows, or those of ``batch_sampler``."""
    options = dict(
        collate_fn=collate_fn, num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers, in_order=args.dataloader_in_order,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        prefetch_factor=args.dataloader_prefetch_factor,
        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
    )
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **options)
    return DataLoader(dataset, batch_size=batch_size, drop_last=args.dataloader_drop_last, **options)
