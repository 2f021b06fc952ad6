"""Block-sparse attention: the torch reference against dense softmax, the Triton kernel against the reference.

On CPU the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set in tests/conftest.py before any kernel
is defined) at tiny shapes, in fp32 and fp16 only: the interpreter cannot multiply bf16 (triton-lang/triton#11584).
The `gpu` test runs it compiled at a realistic shape, bf16 included.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.kernels.block_sparse import BlockSparseLayout, block_sparse_attention_torch
from engine.kernels.block_sparse_triton import block_sparse_attention_triton

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _inputs(h: int, n: int, s: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> Inputs:
    """q (h, N, d), k and v (h, S, d) in dtype; bias (h, S) float32, the log count of merged slots of 1 to 5."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, m, d, generator=g).to(device, dtype) for m in (n, s, s))
    bias = torch.randint(1, 6, (h, s), generator=g).float().log().to(device)
    return q, k, v, bias


def _random_layout(h: int, n: int, s: int, block_q: int, block_k: int, device: str = "cpu") -> BlockSparseLayout:
    """About 40% of the key blocks, and at least: block 0 for every query block (kv_counts >= 1), every block for
    head 0's first query block (the online softmax rescales across tiles), the partial last key block for the
    partial last query block."""
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(h, -(-n // block_q), -(-s // block_k), generator=g) < 0.4  # (h, QB, KB)
    mask[..., 0] = True
    mask[0, 0] = True
    mask[:, -1, -1] = True
    return BlockSparseLayout(mask.to(device), block_q, block_k)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, allowed: torch.Tensor | None = None):
    """Plain softmax attention in fp32 with the per-key bias; `allowed` (h, N, S) masks keys out."""
    logits = q.float() @ k.float().transpose(1, 2) / math.sqrt(q.shape[-1]) + bias[:, None, :]  # (h, N, S)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1) @ v.float()  # (h, N, d)


def test_reference_with_every_block_equals_dense_attention() -> None:
    q, k, v, bias = _inputs(3, 21, 50, 16, torch.float32)
    layout = BlockSparseLayout.dense(3, 21, 50, 8, 16, q.device)
    torch.testing.assert_close(
        block_sparse_attention_torch(q, k, v, bias, layout), _dense(q, k, v, bias), atol=1e-5, rtol=0
    )


def test_reference_with_a_random_layout_equals_masked_dense_attention() -> None:
    q, k, v, bias = _inputs(3, 19, 45, 16, torch.float32)
    layout = _random_layout(3, 19, 45, 4, 16)
    expected = _dense(q, k, v, bias, layout.token_mask(19, 45))
    torch.testing.assert_close(block_sparse_attention_torch(q, k, v, bias, layout), expected, atol=1e-5, rtol=0)


def test_the_lists_and_the_token_mask_hold_exactly_the_selected_blocks() -> None:
    """What the Triton kernel reads (kv_blocks, kv_counts) and what the reference masks by (token_mask), each
    checked against the block mask element by element."""
    h, n, s, bq, bk = 3, 19, 45, 4, 16
    layout = _random_layout(h, n, s, bq, bk)
    token_mask = layout.token_mask(n, s)
    assert token_mask.shape == (h, n, s)
    for head, qb in itertools.product(range(h), range(layout.mask.shape[1])):
        selected = layout.mask[head, qb].nonzero().flatten().tolist()
        count = int(layout.kv_counts[head, qb])
        assert layout.kv_blocks[head, qb, :count].tolist() == selected  # ascending
        assert (layout.kv_blocks[head, qb, count:] == -1).all()
        for i in range(qb * bq, min(n, (qb + 1) * bq)):
            assert token_mask[head, i].tolist() == [j // bk in selected for j in range(s)]


# Measured max |triton - reference| over these cases: fp32 7e-7; fp16 4.9e-4, one fp16 step in [0.5, 1), i.e. the
# two backends round the output differently (each alone is up to 4.6e-4 off fp32 attention).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(("block_q", "block_k", "d"), list(itertools.product((4, 16), (16, 32), (16, 24))))
def test_triton_kernel_equals_the_reference(dtype: torch.dtype, block_q: int, block_k: int, d: int) -> None:
    h, n, s = 2, 21, 70  # neither a multiple of the block sizes; d = 24 takes the zero-padded head dim path
    q, k, v, bias = _inputs(h, n, s, d, dtype)
    layout = _random_layout(h, n, s, block_q, block_k)
    expected = block_sparse_attention_torch(q, k, v, bias, layout)
    out = block_sparse_attention_triton(q, k, v, bias, layout)
    assert out.dtype == dtype and out.shape == (h, n, d)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=0)


def test_launcher_rejects_bad_input() -> None:
    q, k, v, bias = _inputs(2, 8, 16, 16, torch.float32)
    layout = BlockSparseLayout.dense(2, 8, 16, 4, 16, q.device)
    with pytest.raises(ValueError, match="share one of"):
        block_sparse_attention_triton(q, k.half(), v, bias, layout)
    with pytest.raises(ValueError, match="share one of"):
        block_sparse_attention_triton(q.double(), k.double(), v.double(), bias, layout)
    with pytest.raises(ValueError, match="k and v must be"):
        block_sparse_attention_triton(q, k[:, :, :8], v, bias, layout)
    with pytest.raises(ValueError, match="k and v must be"):
        block_sparse_attention_triton(q, k, v[:, :8], bias, layout)
    with pytest.raises(ValueError, match="bias must be float32"):
        block_sparse_attention_triton(q, k, v, bias.half(), layout)
    with pytest.raises(ValueError, match="layout must list"):
        block_sparse_attention_triton(q, k, v, bias, BlockSparseLayout.dense(2, 16, 16, 4, 16, q.device))
    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        block_sparse_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernel_on_cuda_at_wan_shape(dtype: torch.dtype) -> None:
    h, n, s, d = 12, 880, 8000, 128
    q, k, v, bias = _inputs(h, n, s, d, dtype, device="cuda")
    layout = _random_layout(h, n, s, 64, 64, device="cuda")
    truth = block_sparse_attention_torch(q.float(), k.float(), v.float(), bias, layout)
    expected = block_sparse_attention_torch(q, k, v, bias, layout)
    out = block_sparse_attention_triton(q, k, v, bias, layout)
    assert out.dtype == dtype and out.shape == (h, n, d)
    # FlashAttention's test criterion: off fp32 attention by at most twice what the reference in the same dtype is
    # (fp32: the reference is the truth, so the kernel must match it to 1e-5, which TF32 dots would not).
    reference_error = (expected.float() - truth).abs().max().item()
    assert (out.float() - truth).abs().max().item() <= 2 * reference_error + 1e-5
