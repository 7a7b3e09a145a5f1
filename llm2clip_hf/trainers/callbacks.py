"""Callbacks the trainer adds to every run: ``logit_scale`` clamping after each optimizer step (stage 2; its bound
is at least the model's starting value unless set, see ``LLM2CLIPTrainingArguments.logit_scale_max``), and the
epoch reaching the training sampler. The health checks are :class:`~.training_health.TrainingHealthCallback`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback


def initial_logit_scale(model: nn.Module) -> float | None:
    """``model.logit_scale`` before training, or None where it has none or holds no value yet (DeepSpeed ZeRO-3
    partitions, a model on the meta device)."""
    parameter = getattr(model, "logit_scale", None)
    if not isinstance(parameter, torch.Tensor) or parameter.numel() != 1 or parameter.is_meta:
        return None
    return float(parameter.detach().float())


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
            clamp_deepspeed_copies(parameter, self.max_value)


def clamp_deepspeed_copies(parameter: nn.Parameter, max_value: float) -> None:
    """Clamp DeepSpeed's copies of ``parameter`` to ``[0, max_value]``: the float32 master (ZeRO-1/2: assembled and
    written back, a collective every process calls) or, under ZeRO-3, this process's partitions of the master and of
    the parameter itself; clamping is elementwise, so each process clamping its own elements is exact (DeepSpeed's
    full-parameter setter cannot write a parameter with fewer elements than processes, as ``logit_scale``)."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)

    if hasattr(parameter, "ds_id"):  # ZeRO-3
        with torch.no_grad():
            parameter.ds_tensor.clamp_(0.0, max_value)
        safe_set_local_fp32_param(parameter, safe_get_local_fp32_param(parameter).clamp(0.0, max_value))
        return
    master = safe_get_full_fp32_param(parameter)
    if master is not None:
        safe_set_full_fp32_param(parameter, master.clamp(0.0, max_value))


class EpochCallback(TrainerCallback):
    """Tells the training sampler (``EpochTaggedSampler``, or ``SourceBatchSampler`` for mixed sources) the epoch at
    the start of each one. The Trainer's own ``set_epoch`` reaches the sampler through accelerate's wrappers in most
    set-ups but not all (a resumed multi-process run wraps it once more); this makes it certain. ``sampler`` returns
    the trainer's current training sampler."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler().set_epoch(math.floor(state.epoch + 1e-9))
