"""GradCache (Gao et al., 2021): the exact gradient of a contrastive loss over a large batch in the memory of a
small one.

1. Embed every input in chunks without building graphs, remembering each chunk's RNG state.
2. Compute the loss on the full batch of embeddings (detached leaves) and backpropagate to the embeddings only.
3. Re-embed each chunk with gradients, replaying its RNG state (same dropout masks), and backpropagate the cached
   embedding gradients through it. Parameter gradients accumulate to those of the full-batch loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Encoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]


RngState = tuple[torch.Tensor, list[torch.Tensor]]


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def capture_rng() -> RngState:
    """The CPU and CUDA RNG states, to replay a computation with the same random draws."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _cuda_devices()]


@contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run a block with the RNG set to ``state``; the RNG is restored afterwards."""
    devices = _cuda_devices()
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(devices, state[1]):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of ``batch`` along dim 0 into chunks of ``chunk_size`` rows."""
    size = next(iter(batch.values())).shape[0]
    return [{k: v[start:start + chunk_size] for k, v in batch.items()} for start in range(0, size, chunk_size)]


def grad_cache_backward(
    encoders: dict[str, Encoder],
    inputs: dict[str, dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    chunk_size: int,
    gradient_scale: float = 1.0,
) -> torch.Tensor:
    """Backpropagate ``gradient_scale * loss_fn(embeddings)`` through every encoder, ``chunk_size`` rows at a time.

    ``inputs[role]`` is a batch of tensors for ``encoders[role]``; ``loss_fn`` receives one embedding tensor per
    role. Parameters the loss uses directly (such as ``logit_scale``) get their gradient from the loss step.
    Returns the loss (detached).
    """
    if chunk_size < 1:
        raise ValueError(f"GradCache chunk size must be positive, got {chunk_size}.")
    chunks = {role: split_batch(batch, chunk_size) for role, batch in inputs.items()}
    states: dict[str, list] = {}
    embeddings: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for role, role_chunks in chunks.items():
            outputs, states[role] = [], []
            for chunk in role_chunks:
                states[role].append(capture_rng())
                outputs.append(encoders[role](chunk))
            embeddings[role] = torch.cat(outputs).detach().requires_grad_(True)
    loss = loss_fn(embeddings)
    (loss * gradient_scale).backward()
    for role, role_chunks in chunks.items():
        gradients = embeddings[role].grad.split(chunk_size)
        for chunk, state, gradient in zip(role_chunks, states[role], gradients):
            with replayed_rng(state):
                torch.autograd.backward(encoders[role](chunk), gradient)
    return loss.detach()
