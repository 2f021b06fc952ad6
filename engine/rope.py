"""3D rotary position (time, height, width), applied at attention time.

The head dimension d is split into three even parts, one per axis: height and width get 2 * (d // 6) each, time
gets the rest. Adjacent features (2i, 2i + 1) form a complex number that is rotated by position x frequency (the
LLaMA / Wan convention), one complex multiply per pair.

Because rotation happens when attention runs, the KV cache stores keys *before* rotation together with their
integer positions (DESIGN.md section 2, decision 2): the same content in two frames then has the same cached key,
which is what TempCache compares, and a cache policy may choose the positions its slots are presented at.
"""

from __future__ import annotations

import torch
from torch import nn


class Rope3D(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        spatial = 2 * (head_dim // 6)
        parts = (head_dim - 2 * spatial, spatial, spatial)  # time, height, width
        freqs = torch.zeros(3, head_dim // 2, dtype=torch.float32)  # (3, d/2): angle per pair per unit of each axis
        start = 0
        for axis, width in enumerate(parts):
            half = width // 2
            freqs[axis, start : start + half] = theta ** (-torch.arange(half, dtype=torch.float32) / half)
            start += half
        # not a buffer: Module.to(bfloat16) would round it, and angles thousands of frames in need float32
        self.freqs = freqs

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., N, h, d) by integer positions pos (..., N, 3) = (t, y, x); returns x's dtype. The angles
        and the rotation are computed in float32 whatever x's dtype."""
        return self.rotate_by(x, self.turns(pos))

    def turns(self, pos: torch.Tensor) -> torch.Tensor:
        """The rotation of every token at integer positions pos (..., N, 3): (..., N, 1, d/2) complex64, to be
        computed once and applied (`rotate_by`) to every tensor and layer at those positions."""
        if self.freqs.device != pos.device:
            self.freqs = self.freqs.to(pos.device)
        # elementwise, not a matmul: autocast (bfloat16 training on a GPU) would run a matmul in bfloat16
        angles = (pos.to(torch.float32).unsqueeze(-1) * self.freqs).sum(-2).unsqueeze(-2)  # (..., N, 1, d/2)
        return torch.complex(angles.cos(), angles.sin())

    @staticmethod
    def rotate_by(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., N, h, d) by rotations (..., N, 1, d/2) from `turns`; returns x's dtype."""
        pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # (..., N, h, d/2) complex
        return torch.view_as_real(pairs * turns).flatten(-2).to(x.dtype)
