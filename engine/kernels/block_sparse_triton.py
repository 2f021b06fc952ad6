"""Triton backend of block-sparse attention with a per-key additive bias (forward only).

Same contract as `block_sparse_attention_torch` (engine/kernels/block_sparse.py): q (h, N, d), k and v (h, S, d)
in block order, bias (h, S) float32, a `BlockSparseLayout`; returns (h, N, d) in q's dtype, logits scaled by
1 / sqrt(d). One program per (query block, head) walks only the key blocks its layout lists, with the online
softmax of FlashAttention (m_i: running row max, l_i: running denominator, acc: running numerator). The bias (log m
of merged TempCache slots) costs one extra load per key tile. Tiles are at least 16 x 16 because `tl.dot` needs
that: a layout block of 4 queries runs in a 16-row tile whose other rows are masked out.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels.block_sparse import BlockSparseLayout


@triton.jit
def _block_sparse_attention_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    blocks_ptr,
    counts_ptr,
    out_ptr,
    # sizes
    n_queries,
    n_keys,
    scale,
    # strides (the last dimension of every tensor is contiguous)
    stride_qh,
    stride_qn,
    stride_kh,
    stride_kn,
    stride_vh,
    stride_vn,
    stride_bh,
    stride_lh,
    stride_lq,
    stride_ch,
    stride_oh,
    stride_on,
    # meta
    BLOCK_Q: tl.constexpr,  # queries per layout block
    BLOCK_K: tl.constexpr,  # keys per layout block
    BLOCK_M: tl.constexpr,  # tile rows: a power of two >= max(16, BLOCK_Q)
    BLOCK_N: tl.constexpr,  # tile columns: a power of two >= max(16, BLOCK_K)
    HEAD_DIM: tl.constexpr,  # a power of two >= 16
):
    qb = tl.program_id(0)
    head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_Q + rows
    row_ok = (rows < BLOCK_Q) & (offs_m < n_queries)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)

    q = tl.load(
        q_ptr + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    count = tl.load(counts_ptr + head * stride_ch + qb)
    for j in range(0, count):
        kb = tl.load(blocks_ptr + head * stride_lh + qb * stride_lq + j)
        offs_n = kb * BLOCK_K + cols
        col_ok = (cols < BLOCK_K) & (offs_n < n_keys)
        k = tl.load(
            k_ptr + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            v_ptr + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        bias = tl.load(bias_ptr + head * stride_bh + offs_n, mask=col_ok, other=0.0)
        # ieee: fp32 inputs would otherwise run in TF32 (10-bit mantissa, ~1e-3 relative error); Triton ignores
        # the option for fp16 / bf16 inputs
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale + bias[None, :]  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every listed block holds a real key: m_new is finite
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # (BLOCK_M, HEAD_DIM)
        m_i = m_new

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def block_sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, layout: BlockSparseLayout
) -> torch.Tensor:
    """Block-sparse attention on a GPU (or the Triton interpreter); see the module docstring for the contract.

    Checks, each failing with a ValueError: q (h, N, d), k and v (h, S, d), all fp16, bf16 or fp32 alike, on one
    device; bias (h, S) float32; kv_blocks (h, ceil(N / block_q), KB) and kv_counts (h, ceil(N / block_q)) int32;
    block sizes >= 1; no bf16 on the CPU (the Triton interpreter multiplies bf16 bit patterns in `tl.dot`,
    triton-lang/triton#11584). Not checked, because it would need a host sync: kv_counts >= 1 and listed blocks
    < ceil(S / block_k) (a row that sees no key comes out NaN, as in the reference). Non-contiguous inputs are
    copied. A head dim that is not a power of two >= 16 is zero-padded (logits unchanged; the scale keeps the true
    d) and the output, then a view, sliced back.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v must be (h, N|S, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    h, n, d = q.shape
    s = k.shape[1]
    if k.shape != (h, s, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be (h={h}, S, d={d}) alike, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if bias.shape != (h, s) or bias.dtype != torch.float32:
        raise ValueError(f"bias must be float32 (h={h}, S={s}), got {bias.dtype} {tuple(bias.shape)}")
    if layout.block_q < 1 or layout.block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={layout.block_q}, block_k={layout.block_k}")
    blocks = -(-n // layout.block_q)
    if layout.kv_blocks.ndim != 3 or layout.kv_blocks.shape[:2] != (h, blocks) or layout.kv_counts.shape != (h, blocks):
        raise ValueError(
            f"layout must list key blocks for (h={h}, {blocks} query blocks), got kv_blocks "
            f"{tuple(layout.kv_blocks.shape)} and kv_counts {tuple(layout.kv_counts.shape)}"
        )
    if layout.kv_blocks.dtype != torch.int32 or layout.kv_counts.dtype != torch.int32:
        raise ValueError("kv_blocks and kv_counts must be int32")
    tensors = (k, v, bias, layout.kv_blocks, layout.kv_counts)
    if any(t.device != q.device for t in tensors):
        raise ValueError("q, k, v, bias and the layout must be on one device")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise ValueError("bf16 needs a GPU: the Triton interpreter computes bf16 tl.dot wrongly; use fp16 or fp32")

    width = _tile(d)
    if width != d:  # zero features add nothing to q . k; the padded output columns are dropped
        q, k, v = (torch.nn.functional.pad(t, (0, width - d)) for t in (q, k, v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bias, kv_blocks, kv_counts = bias.contiguous(), layout.kv_blocks.contiguous(), layout.kv_counts.contiguous()
    out = torch.empty_like(q)
    _block_sparse_attention_kernel[(blocks, h)](
        q, k, v, bias, kv_blocks, kv_counts, out,
        n, s, 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), bias.stride(0),
        kv_blocks.stride(0), kv_blocks.stride(1), kv_counts.stride(0), out.stride(0), out.stride(1),
        BLOCK_Q=layout.block_q, BLOCK_K=layout.block_k, BLOCK_M=_tile(layout.block_q), BLOCK_N=_tile(layout.block_k),
        HEAD_DIM=width,
        # Fixed, because the interpreter cannot autotune. 4 warps: one warpgroup, the unit of Hopper's wgmma, for
        # the 64-row tile of a 64-token block. 2 stages: K/V tiles double-buffered (2 x 32 KiB at bf16, BLOCK_N 64,
        # d 128), so the next listed tile loads while this one is in the dots, with shared memory to spare.
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out[..., :d] if width != d else out
