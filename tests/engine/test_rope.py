"""3D rotary position: a rotation (norm-preserving) whose dot products depend only on position differences."""

from __future__ import annotations

import torch

from engine.rope import Rope3D


def test_rotation_preserves_norms_and_zero_position_is_identity() -> None:
    rope = Rope3D(head_dim=32, theta=10000.0)
    x = torch.randn(5, 7, 3, 32)
    pos = torch.randint(0, 1000, (5, 7, 3), dtype=torch.int32)
    rotated = rope.rotate(x, pos)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope.rotate(x, torch.zeros_like(pos)), x)


def test_scores_depend_only_on_relative_position() -> None:
    rope = Rope3D(head_dim=16, theta=100.0)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(pq: list[int], pk: list[int]) -> torch.Tensor:
        a = rope.rotate(q, torch.tensor([pq], dtype=torch.int32))
        b = rope.rotate(k, torch.tensor([pk], dtype=torch.int32))
        return (a * b).sum()

    base = score([3, 1, 2], [1, 0, 0])
    torch.testing.assert_close(score([103, 5, 9], [101, 4, 7]), base, atol=1e-4, rtol=0)
    for axis in range(3):  # every axis moves the score
        moved = [3, 1, 2]
        moved[axis] += 1
        assert not torch.allclose(score(moved, [1, 0, 0]), base)


def test_angles_stay_float32_under_a_bfloat16_model_and_autocast() -> None:
    # a bfloat16 angle at frame 3000 is off by several radians; the GPU runs bfloat16 models and autocast training
    rope = Rope3D(32, 10000.0)
    pos = torch.randint(0, 3000, (2, 16, 3))
    x = torch.randn(2, 16, 2, 32)
    exact = rope.rotate(x, pos)
    rope.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(rope.rotate(x, pos), exact, rtol=0, atol=0)
