"""EVA02's 2-D rotary position embedding for patch tokens.

Half of each head's channels rotate with the patch row, half with the column. Frequencies follow
``theta ** (-2i / d)`` (``d`` = head width / 2), each one repeated for a pair of channels, and patch
positions of a ``grid x grid`` image are rescaled onto the pretraining grid (``arange(grid) / grid * pt_grid``),
which is how eva_clip runs one set of weights at 224 and 336 pixels.
"""

from __future__ import annotations

import torch


def rotary_angles_2d(head_dim: int, grid: int, pretrain_grid: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of shape ``(grid * grid, head_dim)`` for row-major patch order (float32)."""
    axis_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim))
    positions = torch.arange(grid) / grid * pretrain_grid
    angles = torch.einsum("t,f->tf", positions, inv_freq).repeat_interleave(2, dim=-1)  # (grid, axis_dim)
    rows = angles[:, None, :].expand(grid, grid, axis_dim)
    cols = angles[None, :, :].expand(grid, grid, axis_dim)
    return torch.cat((rows, cols), dim=-1).reshape(grid * grid, head_dim)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Map each channel pair ``(a, b)`` to ``(-b, a)`` (interleaved rotate-half)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., tokens, head_dim)`` by the angles whose ``cos`` and ``sin`` are given."""
    x32 = x.float()
    return (x32 * cos + rotate_pairs(x32) * sin).to(x.dtype)


class RotaryEmbedding2D(torch.nn.Module):
    """Holds the 2-D RoPE settings and caches the ``(cos, sin)`` tables per grid and device.

    The tables are recomputed rather than stored, so checkpoints never carry them and a changed image size
    needs no state-dict surgery.
    """

    def __init__(self, head_dim: int, pretrain_grid: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.pretrain_grid = pretrain_grid
        self.theta = theta
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``(grid * grid, head_dim)`` in float32 on ``device``."""
        key = (grid, torch.device(device))
        if key not in self._tables:
            angles = rotary_angles_2d(self.head_dim, grid, self.pretrain_grid, self.theta).to(device)
            self._tables[key] = (angles.cos(), angles.sin())
        return self._tables[key]
