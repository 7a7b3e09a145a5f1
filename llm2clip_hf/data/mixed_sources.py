"""Stage-1 batches from several named sources (e.g. E5 text pairs and caption pairs), every batch from ONE source.

The official LLM2CLIP stage 1 mixes general retrieval data with caption pairs but never inside a batch: the
in-batch negatives of a step are texts of the same task. :class:`SourceBatchSampler` yields batches of
``(epoch, row)`` keys (the convention of :mod:`.epoch_sampling`) into the concatenation of the sources.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler


class SourceBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, row)`` keys into the concatenated sources (in the order of ``source_sizes``), each
    batch holding rows of one source.

    A step takes ``group_size`` consecutive batches of one source: with accelerate's sharding (process ``i`` takes
    batch ``i`` of every ``num_processes`` consecutive ones) pass ``group_size=num_processes`` and each step's
    global batch is one source. An epoch has as many steps as the sources have full global batches
    (``batch_size * group_size`` rows; each source's last incomplete one is dropped). The steps are shared among the
    sources in proportion to ``weights`` (largest remainder; default: their numbers of full global batches, so each
    is read once per epoch) and shuffled, so each step's source is a draw with the weights' probabilities. A source
    drawn more often than it has full batches starts a new pass over its rows, in a new order. Everything depends
    only on ``seed`` and the epoch, so every process and a resumed run see the same batches.
    """

    drop_last = True  # read by accelerate's BatchSamplerShard: every batch is full

    def __init__(self, source_sizes: Mapping[str, int], batch_size: int, seed: int,
                 weights: Sequence[float] | None = None, group_size: int = 1, shuffle: bool = True) -> None:
        self.sizes = list(source_sizes.values())
        self.batch_size, self.group_size, self.seed, self.shuffle = batch_size, group_size, seed, shuffle
        self.epoch = 0
        names, step_rows = list(source_sizes), batch_size * group_size
        small = {name: size for name, size in source_sizes.items() if size < step_rows}
        if small:
            raise ValueError(
                f"The stage-1 sources {small} have fewer rows than one batch of {step_rows} (per-device batch size "
                f"{batch_size} x {group_size} processes). Drop them, add rows, or lower per_device_train_batch_size."
            )
        full_batches = [size // step_rows for size in self.sizes]
        self.steps = full_batches if weights is None else apportion(sum(full_batches), check_weights(weights, names))
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (the Trainer calls it before each): it seeds the batches and their sources."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.steps) * self.group_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        sources = np.repeat(np.arange(len(self.sizes)), self.steps)
        schedule = np.random.default_rng([self.seed, epoch]).permutation(sources)
        streams = [self._step_rows(source, epoch) for source in range(len(self.sizes))]
        for source in schedule:
            for batch in next(streams[source]).reshape(self.group_size, self.batch_size):
                yield [(epoch, int(row)) for row in batch]

    def _step_rows(self, source: int, epoch: int) -> Iterator[np.ndarray]:
        """The rows (of the concatenation) of ``source``'s steps in ``epoch``: passes over its rows, each in a new
        order and without its last incomplete step."""
        size, step_rows = self.sizes[source], self.batch_size * self.group_size
        for pass_index in itertools.count():
            order = (np.random.default_rng([self.seed, epoch, source, pass_index]).permutation(size)
                     if self.shuffle else np.arange(size))
            for start in range(0, size - step_rows + 1, step_rows):
                yield self.offsets[source] + order[start:start + step_rows]


def check_weights(weights: Sequence[float], names: Sequence[str]) -> Sequence[float]:
    """``weights`` if there is one per source, none negative and not all zero; else a ``ValueError``."""
    if len(weights) != len(names):
        raise ValueError(
            f"source_mixing_weights (--source-mixing-weights) has {len(weights)} weights for the {len(names)} sources "
            f"{list(names)}; give one per source, in their order."
        )
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"source_mixing_weights must be non-negative and not all zero, got {list(weights)}.")
    return weights


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split into whole numbers in proportion to ``weights`` (largest remainder)."""
    quotas = np.asarray(weights, dtype=np.float64) * total / float(sum(weights))
    counts = np.floor(quotas).astype(np.int64)
    order = np.argsort(counts - quotas, kind="stable")  # largest fractional part first
    counts[order[:total - int(counts.sum())]] += 1
    return counts.tolist()
