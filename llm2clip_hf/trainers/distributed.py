"""All-gather that keeps gradients, for contrastive losses whose negatives come from every process; and FSDP2's root
parameters gathered for calls outside ``forward``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

# A gather returns (all processes' rows concatenated in rank order, index of this process's first row).
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows (``counts`` per process, padded for the collective). Backward: a reduce-scatter
    of the gathered tensor's gradient, so each process receives the sum over processes of the gradient of its own
    rows (every process's loss reaches every process's inputs) and moves one slice, not the whole gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        return torch.cat([g[:n] for g, n in zip(gathered, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        counts, width = ctx.counts, max(ctx.counts)
        padded = grad.new_zeros((len(counts) * width, *grad.shape[1:]))
        start = 0
        for rank, count in enumerate(counts):  # the gathered layout, padded again: one block of `width` per process
            padded[rank * width:rank * width + count] = grad[start:start + count]
            start += count
        mine = grad.new_empty((width, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, padded, op=dist.ReduceOp.SUM, group=ctx.group)  # NCCL and gloo
        return mine[:counts[ctx.rank]], None, None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Gather ``tensor`` from all processes (keeping gradients); return it and this process's row offset."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor, 0
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    gathered = _AllGatherWithGrad.apply(tensor, counts, group)
    return gathered, sum(counts[: dist.get_rank(group)])


def local_gather(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The one-process gather: the tensor itself at offset 0."""
    return tensor, 0


def default_gather(world_size: int) -> Gather:
    """``all_gather_with_grad`` when several processes train, else the identity."""
    return all_gather_with_grad if world_size > 1 else local_gather


@contextlib.contextmanager
def root_parameters_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2 (``fully_shard``), the root module's own parameters (those of no nested sharded block: patch
    embedding, norms, projection, adapter, the LLM's embeddings) are gathered only by the root's ``forward``; code
    that embeds through other methods (``get_image_features``, ``encode``) would meet them sharded ("mixed
    torch.Tensor and DTensor"). This gathers them for the block and shards them again after; nested blocks gather
    their own in their ``forward``. Every process must enter it (a collective). Without FSDP2 it does nothing."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def average_gradients(parameters, group=None) -> None:
    """All-reduce the gradients of ``parameters`` to their mean over processes (what DDP does after backward),
    for gradients computed outside a DDP forward/backward (GradCache)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    world_size = dist.get_world_size(group)
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM, group=group)
            parameter.grad.div_(world_size)
