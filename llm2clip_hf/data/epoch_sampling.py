"""Training order that carries the epoch with every row, so per-epoch draws reach DataLoader workers.

A collator that draws captions and crops per ``(seed, epoch, row)`` runs inside the DataLoader workers, which hold
copies made when they started (once, with ``dataloader_persistent_workers``). Setting an epoch on the main
process's collator never reaches them. The sampler, however, runs in the main process and gets ``set_epoch`` from
the Trainer; it yields ``(epoch, row)`` keys, and :class:`EpochTaggedDataset` turns each key into the row with its
epoch attached (``row[EPOCH]``), in whichever process fetches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

EPOCH = "__llm2clip_epoch__"


class EpochTaggedSampler(Sampler):
    """Yields ``(epoch, row)`` for every row: a permutation seeded by ``seed + epoch`` (or in order with
    ``shuffle=False``). The order depends only on seed and epoch, so every process of a distributed run and a
    resumed run see the same sequence."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True) -> None:
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (the Trainer calls it before each); it seeds the order and tags the rows."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = range(self.num_rows)
        for row in order:
            yield epoch, row


class EpochTaggedDataset(TorchDataset):
    """A map-style dataset read with ``(epoch, row)`` keys; each returned row dict also holds ``EPOCH``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, row = key
        return {**self.dataset[row], EPOCH: epoch}

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = fetch([row for _, row in keys]) if fetch is not None else [self.dataset[row] for _, row in keys]
        return [{**row, EPOCH: epoch} for row, (epoch, _) in zip(rows, keys)]
