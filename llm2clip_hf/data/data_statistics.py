"""Counts of what the data path dropped or cut, carried inside each batch.

Collators run in DataLoader workers, so counters kept on a collator (or on the model it tokenizes with) stay in the
workers' copies. Each collator instead puts its counts into the batch under ``BATCH_STATISTICS``; the trainer
takes them out before the model sees the batch, adds them up, and sums them over processes at the end of training.
"""

from __future__ import annotations

from typing import Any

import torch

BATCH_STATISTICS = "__llm2clip_batch_statistics__"


def batch_statistics(skipped_rows: list[int] | None = None, truncated_captions: int = 0) -> dict[str, torch.Tensor]:
    """The statistics entry a collator adds to its batch."""
    return {"skipped_rows": torch.tensor(skipped_rows or [], dtype=torch.long),
            "truncated_captions": torch.tensor(truncated_captions, dtype=torch.long)}


class DataStatistics:
    """Rows skipped (unreadable images) and captions truncated to the model's token budget.

    Counting never reads a tensor back from its device (no synchronisation per step); :meth:`gathered` does, once.
    """

    def __init__(self) -> None:
        self._skipped: list[torch.Tensor] = []
        self._truncated: torch.Tensor | int = 0

    def add(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Take the statistics out of ``batch`` (if any), count them, and return the batch without them."""
        if BATCH_STATISTICS not in batch:
            return batch
        batch = dict(batch)
        stats = batch.pop(BATCH_STATISTICS)
        if stats["skipped_rows"].numel():
            self._skipped.append(stats["skipped_rows"])
        self._truncated = self._truncated + stats["truncated_captions"]
        return batch

    def gathered(self) -> tuple[list[int], int]:
        """``(distinct skipped rows, truncated captions)`` of every process together (a collective call when
        distributed: every process must make it). A row skipped in several epochs is listed once."""
        import torch.distributed as dist

        skipped = [int(row) for tensor in self._skipped for row in tensor.tolist()]
        truncated = int(self._truncated)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (skipped, truncated))
            skipped = [row for rows, _ in parts for row in rows]
            truncated = sum(count for _, count in parts)
        return sorted(set(skipped)), truncated
