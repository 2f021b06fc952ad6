"""Sparse attention, decided once per engine: the AnnSA / AnnCA toggles, their schedule and the kernel backend.

Schedule (FAST-AR section 6.1, following SVG): attention stays dense for the first round(dense_step_fraction x
steps) denoising steps, where the sample is mostly noise and attention is broad, and in the blocks listed in
`dense_layers`; the commit pass (step index = steps) counts as the last step. With the default 4-step sampler and
a fraction of 0.3, round(1.2) = 1: step 0 is dense, steps 1-3 and the commit pass are sparse (25% of the
denoising steps dense, the closest a 4-step schedule gets to 30%).

Kernel: the torch reference everywhere, or the Triton kernel (`attention.kernel`: auto picks Triton on CUDA).
Both take the same `BlockSparseLayout`; the caller never branches on which one runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.annca import AnnCASelector
from engine.annsa import AnnSAPlanner
from engine.config import AttentionConfig
from engine.kernels.block_sparse import BlockSparseLayout, block_sparse_attention_torch
from engine.meter import AttentionMeter

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, BlockSparseLayout], torch.Tensor]


def pick_kernel(name: str, device: torch.device) -> Kernel:
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from engine.kernels.block_sparse_triton import block_sparse_attention_triton

        return block_sparse_attention_triton
    return block_sparse_attention_torch


class SparseAttention:
    def __init__(
        self,
        config: AttentionConfig,
        head_dim: int,
        steps: int,
        device: torch.device,
        meter: AttentionMeter | None = None,
    ) -> None:
        self.annsa = AnnSAPlanner(config, head_dim) if config.annsa else None
        self.annca = AnnCASelector(config, head_dim) if config.annca else None
        self.kernel = pick_kernel(config.kernel, device)
        self.dense_steps = round(config.dense_step_fraction * steps)
        self.dense_layers = frozenset(config.dense_layers)
        self.meter = meter

    def _sparse_now(self, layer: int, step: int) -> bool:
        return step >= self.dense_steps and layer not in self.dense_layers

    def self_sparse(self, layer: int, step: int) -> bool:
        return self.annsa is not None and self._sparse_now(layer, step)

    def cross_sparse(self, layer: int, step: int) -> bool:
        return self.annca is not None and self._sparse_now(layer, step)

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, fixed: int
    ) -> torch.Tensor:
        """One world: rotated q (N, h, d), k and v (S, h, d), bias (S,) or None; keys [0, fixed) always seen."""
        assert self.annsa is not None
        n, h, d = q.shape
        s = k.shape[0]
        bias = bias.float() if bias is not None else k.new_zeros(s, dtype=torch.float32)
        q_order, k_order, layout = self.annsa.plan(q.transpose(0, 1), k.transpose(0, 1), fixed)
        # token i of head j is row i * h + j of the (tokens * h, d) view: one index_select per tensor, no gather
        heads = torch.arange(h, device=q.device)[:, None]
        q_rows, k_rows = (q_order * h + heads).flatten(), (k_order * h + heads).flatten()
        q_sorted = q.reshape(n * h, d).index_select(0, q_rows).view(h, n, d)
        k_sorted = k.reshape(s * h, d).index_select(0, k_rows).view(h, s, d)
        v_sorted = v.reshape(s * h, d).index_select(0, k_rows).view(h, s, d)
        bias_sorted = bias.index_select(0, k_order.flatten()).view(h, s)
        out_sorted = self.kernel(q_sorted, k_sorted, v_sorted, bias_sorted, layout)
        out = torch.empty_like(q).view(n * h, d).index_copy_(0, q_rows, out_sorted.reshape(h * n, d))
        if self.meter is not None:
            logits = q_sorted.float() @ k_sorted.float().transpose(1, 2) / math.sqrt(d)
            probabilities = torch.softmax(logits + bias_sorted[:, None, :], dim=-1)
            self.meter.record("annsa", layer, probabilities, layout.token_mask(n, s))
        return out.view(n, h, d)

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q (B, N, h, d), prompt k and v (B, L, h, d), mask (B, L) -> (B, N, h, d) over the kept tokens only."""
        assert self.annca is not None
        kept = self.annca.keep(q, k, mask)  # (B, h, L)
        counts = kept.sum(-1)  # (B, h)
        longest = int(counts.max())  # host sync: the width of the compacted prompt
        order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[..., :longest]  # kept first
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # (B, h, L, d)
        index = order[..., None].expand(-1, -1, -1, kh.shape[-1])
        k_kept, v_kept = kh.gather(2, index), vh.gather(2, index)  # (B, h, Lk, d)
        usable = torch.arange(longest, device=q.device) < counts[..., None]  # (B, h, Lk)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_kept, v_kept, attn_mask=usable[:, :, None, :]
        )  # (B, h, N, d)
        if self.meter is not None:
            logits = q.transpose(1, 2).float() @ kh.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
            probabilities = torch.softmax(logits, dim=-1)  # (B, h, N, L), zero on padding
            self.meter.record("annca", layer, probabilities, kept[:, :, None, :], mask[:, None, None, :])
        return out.transpose(1, 2)
