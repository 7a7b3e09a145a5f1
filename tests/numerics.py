"""Tolerances for comparing computations that sum in a different order (another process count, chunking, CPU)."""

import torch


def assert_same_tensor(actual: torch.Tensor, expected: torch.Tensor, relative: float, name: str = "") -> None:
    """``||actual - expected|| <= relative * ||expected||`` (Frobenius norms).

    fp32 sums in another order differ by a few ulps of their largest terms; a small tensor computed from larger
    cancelling terms (a LoRA gradient early in training) carries that error at a much larger relative size per
    element, and which elements it hits depends on the CPU. A norm-relative bound is stable across machines and still
    flags a wrong loss or a wrong scale (errors of 10-100 %)."""
    assert actual.shape == expected.shape, (name, tuple(actual.shape), tuple(expected.shape))
    error = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert error <= relative * scale, (name, error, scale)
