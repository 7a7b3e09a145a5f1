"""Training health: the checks that stop or warn when a contrastive run breaks, agreed by every process.

Once per optimizer step, right before the update, the micro-batches of the step are summed into one small tensor
that is all-reduced, so every process takes the same decision on the same numbers:

- a non-finite loss on any process stops every process, after all of them saved the last good state together
  (the step's update has not been applied), naming the processes, losses and rows;
- a collapse of the embeddings (every row of a batch mapped to nearly one point: a contrastive loss then sits at
  ln(candidates) and learns nothing more; in stage 2 the image and the text side are each checked against their own
  start, so a side that starts narrow cannot hide the other's collapse) stops the run (``stop_on_collapse``, the
  default): the trainable weights of the last step whose embeddings were still spread (kept in memory, one copy on
  their device) are saved as a loadable model in ``<output_dir>/last-good-step-<N>``, and
  :class:`EmbeddingCollapseError` names it, the best checkpoint by the evaluation metric where there is one, and what
  to change. With ``stop_on_collapse=False`` it is a warning.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .stages import STAGES

logger = hf_logging.get_logger(__name__)

# The InfoNCE loss of a collapsed batch is ln(candidates); within this share of it the scores carry no information.
COLLAPSED_LOSS_SHARE = 0.95


class EmbeddingCollapseError(RuntimeError):
    """The training embeddings collapsed to (nearly) one point and ``stop_on_collapse`` is set (the default)."""

    def __init__(self, message: str, last_good_model: str | None = None) -> None:
        super().__init__(message)
        self.last_good_model = last_good_model


def embedding_spread(*embeddings: torch.Tensor) -> torch.Tensor | None:
    """How far the rows of each batch of embeddings (one batch per side: image, text) are from one point:
    ``1 - |mean of the L2-normalised rows|^2`` (0 when all rows point the same way, about 1 for rows spread over the
    sphere), one value per batch in their order; ``None`` when a batch has fewer than two rows. Detached, on the
    embeddings' device."""
    if not embeddings or any(e.shape[0] < 2 for e in embeddings):
        return None
    return torch.stack([1.0 - F.normalize(e.detach().float(), dim=-1).mean(dim=0).square().sum()
                        for e in embeddings])


@dataclass
class StepHealth:
    """One optimizer step's numbers, averaged over its micro-batches and over every process."""

    spreads: tuple[float, ...] | None  # mean spread of the step's batches, per side (image, text)
    loss: float | None  # mean finite loss
    log_candidates: float | None  # mean ln(candidates per query) of an InfoNCE loss; None for other losses


class CollapseMonitor:
    """Decides, step by step, whether the embeddings have collapsed: the spread of a side (image or text) has fallen
    below ``spread_ratio`` times that side's own spread at the first step checked and, for an InfoNCE loss, the loss
    sits within 5 % of ln(candidates), for ``patience`` consecutive optimizer steps. ``sides`` names the sides, in
    the order of :attr:`StepHealth.spreads`."""

    def __init__(self, spread_ratio: float, patience: int, sides: tuple[str, ...] = ("training",)) -> None:
        self.spread_ratio, self.patience, self.sides = spread_ratio, patience, sides
        self.initial_spreads: tuple[float, ...] | None = None
        self.streak_start: int | None = None  # first step of the current run of collapsed-looking steps
        self.streak = 0
        self.reported = False
        self.low_sides: list[int] = []  # the sides whose spread was low at the last step checked
        self.low_spread = False  # whether the last step checked had a low spread (collapsing, or collapsed)

    def update(self, step: int, health: StepHealth) -> bool:
        """Record ``step``; True exactly when the current streak reaches ``patience`` steps (reported once)."""
        spreads = health.spreads
        if self.spread_ratio <= 0 or not spreads or not all(math.isfinite(s) for s in spreads):
            return False
        if len(spreads) != len(self.sides):
            raise ValueError(f"The collapse check got the spreads of {len(spreads)} embedding sides at step {step}, "
                             f"for the {len(self.sides)} sides {list(self.sides)} it watches.")
        if self.initial_spreads is None:
            self.initial_spreads = tuple(spreads)
        self.low_sides = [side for side, (spread, initial) in enumerate(zip(spreads, self.initial_spreads))
                          if spread < self.spread_ratio * initial]
        low_spread = self.low_spread = bool(self.low_sides)
        uninformative = health.log_candidates is None or health.loss is None or \
            health.loss >= COLLAPSED_LOSS_SHARE * health.log_candidates
        if not (low_spread and uninformative):
            self.streak, self.streak_start, self.reported = 0, None, False
            return False
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        if self.streak >= self.patience and not self.reported:
            self.reported = True
            return True
        return False

    def describe(self, health: StepHealth, learning_rate: float, warmup_steps: int) -> str:
        loss = (f"; the loss {health.loss:.4f} sits at ln(candidates) = {health.log_candidates:.4f}"
                if health.log_candidates is not None and health.loss is not None else "")
        spreads = "; ".join(
            f"the {self.sides[side]} embeddings' spread is {health.spreads[side]:.2e}, "
            f"{health.spreads[side] / self.initial_spreads[side]:.1%} of their {self.initial_spreads[side]:.2e} at "
            f"the first step" for side in self.low_sides)
        return (f"The training embeddings have collapsed to nearly one point since step {self.streak_start}: "
                f"{spreads}{loss}, for {self.streak} optimizer steps. The usual "
                f"cause is a learning rate too high for this model (learning_rate={learning_rate:g}) or too short a "
                f"warmup (warmup_steps={warmup_steps}): lower the one or lengthen the other.")


def checkpoint_before(output_dir: str, step: int) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose weights come before optimizer step ``step`` looked
    collapsed, or ``None``. Step ``step`` embeds with the weights after ``step - 1`` updates (``checkpoint-<step-1>``),
    so the last good weights are those of ``checkpoint-N`` with ``N <= step - 2``."""
    steps = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match and int(match.group(1)) <= step - 2:
                steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


class TrainableSnapshot:
    """A copy of a model's trainable parameters, on their own devices (for stage 1 the LoRA weights only; for stage
    2 the tower and adapter: one more copy of the trained weights in device memory). ``take`` refreshes it in place,
    ``restore`` writes it back."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.step: int | None = None

    def take(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not parameter.requires_grad:
                    continue
                kept = self.tensors.get(name)
                if kept is None or kept.shape != parameter.shape:
                    self.tensors[name] = parameter.detach().clone()
                else:
                    kept.copy_(parameter.detach())
        self.step = step

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.tensors:
                    parameter.copy_(self.tensors[name])


class TrainingHealthCallback(TrainerCallback):
    """Records each micro-batch's loss, rows and embedding spread (on the device), and checks the optimizer step
    right before the update: one small all-reduce and one device sync per step, every process acting on the same
    numbers. ``trainer`` is the :class:`~.trainer.LLM2CLIPTrainer` (for its accelerator and checkpoints)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.reset()

    def reset(self) -> None:
        """Forget the records and the collapse streak (a new ``train()``)."""
        args = self.trainer.args
        self.records: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float | None]] = []
        self.batch_spread: torch.Tensor | None = None
        self.collapse = CollapseMonitor(args.collapse_spread_ratio, args.collapse_patience,
                                        STAGES[args.stage].embedding_sides)
        self.snapshot = TrainableSnapshot()

    def keeps_snapshot(self) -> bool:
        """A last-good copy of the weights is kept when a collapse stops the run and the model is not sharded (under
        FSDP / DeepSpeed the weights and their optimizer masters are partitioned: the checkpoints serve instead)."""
        trainer = self.trainer
        return trainer.args.stop_on_collapse and trainer.args.collapse_spread_ratio > 0 and \
            not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)

    def observe(self, model: nn.Module, *embeddings: torch.Tensor) -> None:
        """Keep the spread of a training batch's embeddings for the step's collapse check."""
        if model.training and self.trainer.args.collapse_spread_ratio > 0:
            self.batch_spread = embedding_spread(*embeddings)

    def record(self, loss: torch.Tensor, rows: torch.Tensor | None, log_candidates: float | None) -> None:
        """A micro-batch's loss and rows, with the spread observed while computing it."""
        self.records.append((loss.detach(), rows, self.batch_spread, log_candidates))
        self.batch_spread = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.check()

    def check(self) -> None:
        """Stop on a non-finite loss anywhere; warn (or stop) on collapsed embeddings."""
        records, self.records = self.records, []
        if not records:
            return
        trainer = self.trainer
        device = records[0][0].device
        losses = torch.stack([loss.float().reshape(()) for loss, _, _, _ in records])
        finite = torch.isfinite(losses)
        sides = len(self.collapse.sides)  # the same on every process: the all-reduced tensor has one length
        spreads = [spread.float() for _, _, spread, _ in records if spread is not None]
        if any(spread.shape != (sides,) for spread in spreads):
            raise ValueError(f"The stage observed {[tuple(s.shape) for s in spreads]} embedding spreads per batch; "
                             f"its embedding_sides {list(self.collapse.sides)} name {sides}.")
        log_candidates = [value for _, _, _, value in records if value is not None]
        totals = torch.cat([torch.stack([
            (~finite).sum().float(),
            torch.tensor(float(len(spreads)), device=device),
            torch.where(finite, losses, torch.zeros_like(losses)).sum(),
            finite.sum().float(),
            torch.tensor(float(sum(log_candidates)), device=device),
            torch.tensor(float(len(log_candidates)), device=device),
        ]).to(device), torch.stack(spreads).sum(dim=0) if spreads else torch.zeros(sides, device=device)])
        totals = trainer.accelerator.reduce(totals, reduction="sum").tolist()
        non_finite, spread_count, loss_sum, loss_count, candidates_sum, candidates_count = totals[:6]
        spread_sums = totals[6:]
        if non_finite:
            failures = [(trainer.args.process_index, float(losses[i]), rows.tolist() if rows is not None else None)
                        for i, (_, rows, _, _) in enumerate(records) if not bool(finite[i])]
            self._stop_on_non_finite_loss(gather_object(failures) if trainer.args.world_size > 1 else failures)
        health = StepHealth(
            spreads=tuple(total / spread_count for total in spread_sums) if spread_count else None,
            loss=loss_sum / loss_count if loss_count else None,
            log_candidates=candidates_sum / candidates_count if candidates_count else None,
        )
        step = trainer.state.global_step + 1
        collapsed = self.collapse.update(step, health)
        if not self.collapse.low_spread and self.keeps_snapshot():
            # this step's embeddings come from the weights after step - 1 updates, and they were spread
            self.snapshot.take(trainer.accelerator.unwrap_model(trainer.model), step - 1)
        if not collapsed:
            return
        message = self.collapse.describe(health, trainer.args.learning_rate,
                                         trainer.args.get_warmup_steps(trainer.state.max_steps))
        if trainer.args.stage == "caption" and not trainer.args.loss_centering:
            message += (" In stage 1 from a raw LLM, loss_centering=True (CLI --loss-centering true) removes the "
                        "collapse's cause: a loss blind to the component every caption shares.")
        if not trainer.args.stop_on_collapse:
            logger.warning(message + " Training goes on (stop_on_collapse=False).")
            return
        self._stop_on_collapse(step, message)

    def _stop_on_collapse(self, step: int, message: str) -> None:
        """Save the last good weights as a model, name them and the best / last good checkpoint, and stop."""
        trainer = self.trainer
        kept, last_good_model = [], None
        if self.snapshot.step is not None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            self.snapshot.restore(model)
            last_good_model = os.path.join(trainer.args.output_dir, f"last-good-step-{self.snapshot.step}")
            trainer.save_model(last_good_model)
            kept.append(f"The weights after step {self.snapshot.step}, the last whose embeddings were still "
                        f"spread, are saved as a model in {last_good_model}.")
        best = trainer.state.best_model_checkpoint
        if best and os.path.isdir(best):
            kept.append(f"The best checkpoint by {trainer.args.metric_for_best_model} "
                        f"({trainer.state.best_metric:.4g}) is {best}.")
        checkpoint = checkpoint_before(trainer.args.output_dir, self.collapse.streak_start)
        if checkpoint:
            kept.append(f"The last checkpoint from before the collapse is {checkpoint} (resume_from_checkpoint).")
        if not kept:
            kept.append("No weights from before the collapse were kept (no checkpoint was saved before it).")
        raise EmbeddingCollapseError(
            f"Stopped at step {step}: {message} {' '.join(kept)} Nothing from the collapsed steps was saved as the "
            "model. To train on through a collapse anyway, set stop_on_collapse=False (CLI: --stop-on-collapse false).",
            last_good_model)

    def _stop_on_non_finite_loss(self, failures: list[tuple[int, float, list[int] | None]]) -> None:
        """Every process saves the last good state together (this step's update has not been applied), then every
        process stops with the same message naming the step, and each failing process's loss and rows."""
        trainer = self.trainer
        trainer._save_checkpoint(trainer.model, trial=None)
        checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
        where = "; ".join(f"process {rank}: loss {loss}, batch rows {rows if rows is not None else 'unknown'}"
                          for rank, loss, rows in failures)
        raise FloatingPointError(
            f"Non-finite loss at step {trainer.state.global_step + 1} ({where}). The last good state is saved in "
            f"{checkpoint}. Check those rows (and the learning rate), then resume with resume_from_checkpoint."
        )
