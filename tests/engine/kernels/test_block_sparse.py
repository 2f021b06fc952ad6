"""Block-sparse attention: the torch reference against dense softmax, the Triton kernel against the reference.

On CPU the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set in tests/conftest.py before any kernel
is defined) at tiny shapes; the `gpu` test runs it compiled at a realistic shape.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels.block_sparse import BlockSparseLayout, block_sparse_attention_torch
from engine.kernels.block_sparse_triton import block_sparse_attention_triton


def _inputs(h: int, n: int, s: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, m, d, generator=g).to(device, dtype) for m in (n, s, s))
    bias = torch.randint(1, 6, (h, s), generator=g).float().log().to(device)  # log m of merged slots
    return q, k, v, bias


def _random_layout(h: int, n: int, s: int, block_q: int, block_k: int, device: str = "cpu") -> BlockSparseLayout:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(h, -(-n // block_q), -(-s // block_k), generator=g) < 0.4
    mask[..., 0] = True  # every query block sees at least one key block
    return BlockSparseLayout.from_mask(mask.to(device), block_q, block_k)


def _dense(q, k, v, bias, allowed=None):
    logits = q.float() @ k.float().transpose(1, 2) / math.sqrt(q.shape[-1]) + bias[:, None, :]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1) @ v.float()


def test_reference_with_every_block_equals_dense_attention() -> None:
    q, k, v, bias = _inputs(3, 21, 50, 16, torch.float32)
    layout = BlockSparseLayout.dense(3, 21, 50, 8, 16, q.device)
    torch.testing.assert_close(
        block_sparse_attention_torch(q, k, v, bias, layout), _dense(q, k, v, bias), atol=1e-5, rtol=0
    )


def test_reference_with_a_random_layout_equals_masked_dense_attention() -> None:
    q, k, v, bias = _inputs(2, 19, 45, 16, torch.float32)
    layout = _random_layout(2, 19, 45, 4, 16)
    expected = _dense(q, k, v, bias, layout.token_mask(19, 45))
    torch.testing.assert_close(block_sparse_attention_torch(q, k, v, bias, layout), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-5), (torch.float16, 2e-3)],  # fp16 inputs, fp32 accumulation in both backends
)
@pytest.mark.parametrize(("block_q", "block_k", "d"), [(4, 16, 16), (16, 32, 16), (4, 16, 24)])
def test_triton_kernel_equals_the_reference(
    dtype: torch.dtype, tolerance: float, block_q: int, block_k: int, d: int
) -> None:
    h, n, s = 2, 21, 70  # neither a multiple of the block sizes
    q, k, v, bias = _inputs(h, n, s, d, dtype)
    layout = _random_layout(h, n, s, block_q, block_k)
    expected = block_sparse_attention_torch(q, k, v, bias, layout)
    out = block_sparse_attention_triton(q, k, v, bias, layout)
    assert out.dtype == dtype and out.shape == (h, n, d)
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=0)


def test_launcher_rejects_bad_input() -> None:
    q, k, v, bias = _inputs(2, 8, 16, 16, torch.float32)
    layout = BlockSparseLayout.dense(2, 8, 16, 4, 16, q.device)
    with pytest.raises(ValueError, match="share one of"):
        block_sparse_attention_triton(q, k.half(), v, bias, layout)
    with pytest.raises(ValueError, match="k and v must be"):
        block_sparse_attention_triton(q, k[:, :, :8], v, bias, layout)
    with pytest.raises(ValueError, match="bias must be float32"):
        block_sparse_attention_triton(q, k, v, bias.half(), layout)
    with pytest.raises(ValueError, match="layout must list"):
        block_sparse_attention_triton(q, k, v, bias, BlockSparseLayout.dense(2, 16, 16, 4, 16, q.device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_on_cuda_at_wan_shape(dtype: torch.dtype) -> None:
    h, n, s, d = 12, 880, 8000, 128
    q, k, v, bias = _inputs(h, n, s, d, dtype, device="cuda")
    layout = _random_layout(h, n, s, 64, 64, device="cuda")
    expected = block_sparse_attention_torch(q, k, v, bias, layout)
    out = block_sparse_attention_triton(q, k, v, bias, layout)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)
