"""One process of the real 2-process all-gather test in tests/test_losses.py.

Each process joins a gloo group, takes its rows of every case's global batch as leaf tensors, computes the
package loss (which gathers the candidates of both processes), runs backward, and saves its loss and the
gradients of its local leaves. Besides the package's own gather it also runs two broken ones, so the test can
show that its checks catch them:

* ``no_reduction``: the package's gather with the reduce-scatter of its backward replaced by taking this process's
  block of its own gradient, without summing over processes;
* ``detached``: the other process's rows are gathered as constants (only this process's rows carry gradient).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from llm2clip_hf.trainers import CaptionContrastiveLoss, CLIPContrastiveLoss, all_gather_with_grad
from llm2clip_hf.trainers.losses import SigLIPContrastiveLoss

GATHERS = ("package", "no_reduction", "detached")


def detached_gather(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    gathered, offset = all_gather_with_grad(tensor.detach())
    return torch.cat([gathered[:offset], tensor, gathered[offset + tensor.shape[0]:]]), offset


@contextlib.contextmanager
def gather_variant(name: str):
    """The ``gather=`` argument for the losses, with the backward's reduction across processes disabled for
    ``no_reduction``."""
    if name == "package":
        yield None
    elif name == "detached":
        yield detached_gather
    elif name == "no_reduction":
        original = dist.reduce_scatter_tensor

        def own_block_only(output, tensor, *args, **kwargs):
            output.copy_(tensor.view(dist.get_world_size(), *output.shape)[dist.get_rank()])

        dist.reduce_scatter_tensor = own_block_only
        try:
            yield None
        finally:
            dist.reduce_scatter_tensor = original
    else:
        raise ValueError(name)


def run_case(case: dict, rank: int, world_size: int, gather) -> dict:
    bounds = [0, *torch.tensor(case["sizes"]).cumsum(0).tolist()]
    rows = slice(bounds[rank], bounds[rank + 1])
    local = {name: t[rows].clone().requires_grad_(True) for name, t in case["tensors"].items()}
    if case["loss"] == "caption":
        loss_fn = CaptionContrastiveLoss(scale=case["scale"], world_size=world_size, rank=rank, gather=gather)
        loss = loss_fn(local["query"], local["positive"], local.get("negative"))
    elif case["loss"] == "clip":
        local["logit_scale"] = case["logit_scale"].clone().requires_grad_(True)
        loss_fn = CLIPContrastiveLoss(world_size=world_size, rank=rank, gather=gather)
        loss = loss_fn(local["image"], local["text"], local["logit_scale"])
    else:
        local["logit_scale"] = case["logit_scale"].clone().requires_grad_(True)
        local["logit_bias"] = case["logit_bias"].clone().requires_grad_(True)
        loss_fn = SigLIPContrastiveLoss(world_size=world_size, rank=rank, gather=gather)
        loss = loss_fn(local["image"], local["text"], local["logit_scale"], local["logit_bias"])
    loss.backward()
    return {"loss": loss.detach(), "grads": {name: t.grad.detach().clone() for name, t in local.items()}}


def run(rank: int, world_size: int, port: int, inputs_path: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cases = torch.load(inputs_path)
        results = {}
        for variant in GATHERS:
            for name, case in cases.items():
                with gather_variant(variant) as gather:
                    results[variant, name] = run_case(case, rank, world_size, gather)
        torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(rank: int, world_size: int, port: int, inputs_path: str, output_dir: str) -> None:
    """Process entry point; failures are written next to the results, so the test can show them."""
    try:
        run(rank, world_size, port, inputs_path, output_dir)
    except BaseException:
        import traceback

        (Path(output_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        os._exit(1)
