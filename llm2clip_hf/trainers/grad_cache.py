"""GradCache (Gao et al., 2021): the exact gradient of a contrastive loss over a large batch in the memory of a
small one, with the backward pass left to the caller (``accelerator.backward``: loss scaling, DeepSpeed, ...).

1. Embed every input in chunks without building graphs, remembering each chunk's RNG state.
2. Compute the loss on the full batch of embeddings (detached leaves) and take its gradient w.r.t. the embeddings
   and w.r.t. the parameters the loss uses directly (``logit_scale``, ``logit_bias``).
3. Return the loss as a leaf with a hook. When the caller backpropagates it with upstream gradient ``g`` (the loss
   scale of fp16 training, 1 / accumulation steps, ...), the hook re-embeds each chunk with gradients, replaying its
   RNG state (same dropout masks), and backpropagates ``g * <embeddings, cached gradient>``, and
   ``g * <parameter, cached gradient>`` for the loss's own parameters. Parameter gradients accumulate to ``g``
   times those of the full-batch loss, exactly as a plain ``loss.backward(g)`` would give.

The hook technique is sentence-transformers' (its Cached losses); this is our own implementation. As there,
GradCache is a loss: :class:`GradCacheLoss` wraps the stage's loss and gives it this gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn

Encoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]
RngState = tuple[torch.Tensor, dict[int, torch.Tensor]]


def cuda_devices_of(batch: dict[str, torch.Tensor]) -> list[int]:
    """The CUDA devices ``batch`` lives on: the only devices whose RNG a replay needs to fork."""
    return sorted({t.device.index or 0 for t in batch.values() if isinstance(t, torch.Tensor) and t.is_cuda})


def capture_rng(devices: Sequence[int] = ()) -> RngState:
    """The CPU RNG state and that of each listed CUDA device, to replay a computation with the same draws."""
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}


@contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run a block with the RNG set to ``state``; the RNG of the devices involved is restored afterwards."""
    cpu_state, device_states = state
    with torch.random.fork_rng(devices=list(device_states)):
        torch.set_rng_state(cpu_state)
        for device, device_state in device_states.items():
            torch.cuda.set_rng_state(device_state, device)
        yield


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of ``batch`` along dim 0 into chunks of ``chunk_size`` rows."""
    size = next(iter(batch.values())).shape[0]
    return [{k: v[start:start + chunk_size] for k, v in batch.items()} for start in range(0, size, chunk_size)]


def grad_cache_loss(
    encoders: dict[str, Encoder],
    inputs: dict[str, dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    chunk_size: int,
    loss_parameters: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """The loss ``loss_fn(embeddings)`` over the whole batch, as a leaf whose backward runs GradCache's second pass.

    ``inputs[role]`` is a batch of tensors for ``encoders[role]``; ``loss_fn`` receives one embedding tensor per
    role; ``loss_parameters`` are the parameters ``loss_fn`` uses besides the embeddings. Call ``.backward()`` (or
    ``accelerator.backward``) on the result exactly once; until then activations of one chunk at most are held.
    """
    if chunk_size < 1:
        raise ValueError(f"GradCache chunk size must be positive, got {chunk_size}.")
    chunks = {role: split_batch(batch, chunk_size) for role, batch in inputs.items()}
    states: dict[str, list[RngState]] = {}
    embeddings: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for role, role_chunks in chunks.items():
            outputs, states[role] = [], []
            for chunk in role_chunks:
                states[role].append(capture_rng(cuda_devices_of(chunk)))
                outputs.append(encoders[role](chunk))
            embeddings[role] = torch.cat(outputs).detach().requires_grad_(True)
    parameters = [p for p in loss_parameters if p is not None and p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(embeddings)
        gradients = torch.autograd.grad(loss, [*embeddings.values(), *parameters])
    cached = dict(zip(embeddings, gradients[:len(embeddings)]))
    replay = partial(_second_pass, encoders=encoders, chunks=chunks, states=states, cached=cached,
                     chunk_size=chunk_size, parameters=parameters, parameter_gradients=gradients[len(embeddings):])
    result = loss.detach().requires_grad_(True)
    result.register_hook(replay)
    return result


def _second_pass(grad_output: torch.Tensor, encoders, chunks, states, cached, chunk_size, parameters,
                 parameter_gradients) -> None:
    """Backpropagate ``grad_output`` times the cached gradients through re-embedded chunks and the loss's own
    parameters (runs inside the caller's backward)."""
    with torch.enable_grad():
        for role, role_chunks in chunks.items():
            for chunk, state, gradient in zip(role_chunks, states[role], cached[role].split(chunk_size)):
                with replayed_rng(state):
                    embedded = encoders[role](chunk)
                torch.autograd.backward(embedded, gradient.to(embedded.dtype) * grad_output.to(embedded.dtype))
        for parameter, gradient in zip(parameters, parameter_gradients):
            torch.autograd.backward(parameter, gradient * grad_output.to(gradient.dtype))


def grad_cache_backward(
    encoders: dict[str, Encoder],
    inputs: dict[str, dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    chunk_size: int,
    gradient_scale: float = 1.0,
    loss_parameters: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """:func:`grad_cache_loss` backpropagated at once with upstream gradient ``gradient_scale``; returns the loss."""
    loss = grad_cache_loss(encoders, inputs, loss_fn, chunk_size, loss_parameters)
    loss.backward(torch.tensor(gradient_scale, dtype=loss.dtype, device=loss.device))
    return loss.detach()


class GradCacheLoss(nn.Module):
    """``loss`` on a batch of any size, with the exact gradient of the full batch and the activations of one chunk of
    ``chunk_size`` rows at a time. ``stage`` (a :class:`~.stages.TrainingStage`) says which encoders a batch goes
    through and how ``loss`` scores their embeddings; the encoders run in ``autocast()`` (the accelerator's
    mixed-precision context, which covers only the wrapped model's ``forward``, not these direct calls) in both
    passes and return float32, as the wrapped forward does."""

    def __init__(self, loss: nn.Module, stage: object, chunk_size: int,
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"GradCache chunk size must be positive, got {chunk_size}.")
        self.loss, self.stage, self.chunk_size, self.autocast = loss, stage, chunk_size, autocast

    def forward(self, model: nn.Module, inputs: dict[str, object]) -> torch.Tensor:
        """The batch's loss, as a leaf whose backward (once, e.g. ``accelerator.backward``) runs the second pass."""
        encoders, batches, loss_fn, loss_parameters = self.stage.grad_cache_parts(model, inputs, self.loss)
        return grad_cache_loss({role: self._in_autocast(encoder) for role, encoder in encoders.items()}, batches,
                               loss_fn, self.chunk_size, loss_parameters)

    def _in_autocast(self, encoder: Encoder) -> Encoder:
        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.autocast():
                return encoder(batch).float()

        return run
