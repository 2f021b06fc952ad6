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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.annca import AnnCASelector
from engine.annsa import AnnSAPlanner, SortedKeys
from engine.config import AttentionConfig
from engine.kernels.block_sparse import BlockSparseLayout, block_sparse_attention_torch
from engine.meter import AttentionMeter


@dataclass
class SortedSlots:
    """One world's cache slots of one layer in AnnSA's order, prepared once per engine step: rotated key and value
    (h, R, d), bias (h, R) float32, and the sorted keys' bucket membership."""

    keys: SortedKeys
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor


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

    def sort_slots(self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, fixed: int) -> SortedSlots:
        """Hash and sort one world's cache slots of one layer (all but the sinks): rotated key, value (R, h, d),
        bias (R,) or None; `fixed` always-visible keys (sinks + the current chunk) will precede them."""
        assert self.annsa is not None
        r, h, d = key.shape
        keys = self.annsa.sort_keys(key.transpose(0, 1), fixed)
        rows = (keys.order * h + torch.arange(h, device=key.device)[:, None]).flatten()  # row i h + j: token i, head j
        bias = bias.float() if bias is not None else key.new_zeros(r, dtype=torch.float32)
        return SortedSlots(
            keys,
            key.reshape(r * h, d).index_select(0, rows).view(h, r, d),
            value.reshape(r * h, d).index_select(0, rows).view(h, r, d),
            bias.index_select(0, keys.order.flatten()).view(h, r),
        )

    def self_attention(
        self,
        layer: int,
        q: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
        prefix_bias: torch.Tensor | None,
        slots: SortedSlots,
    ) -> torch.Tensor:
        """One world: rotated q (N, h, d) over the always-visible prefix (sinks + current chunk: rotated k and v
        (F, h, d), bias (F,) or None) and the sorted cache slots -> (N, h, d)."""
        assert self.annsa is not None and prefix_k.shape[0] == slots.keys.fixed
        n, h, d = q.shape
        q_order, layout = self.annsa.layout(q.transpose(0, 1), slots.keys)
        q_rows = (q_order * h + torch.arange(h, device=q.device)[:, None]).flatten()  # row i h + j: token i, head j
        q_sorted = q.reshape(n * h, d).index_select(0, q_rows).view(h, n, d)
        k_sorted = torch.cat((prefix_k.transpose(0, 1), slots.key), dim=1)  # (h, S, d)
        v_sorted = torch.cat((prefix_v.transpose(0, 1), slots.value), dim=1)
        if prefix_bias is None:
            prefix_bias = slots.bias.new_zeros(prefix_k.shape[0])
        b_sorted = torch.cat((prefix_bias.float().expand(h, -1), slots.bias), dim=1)  # (h, S)
        out_sorted = self.kernel(q_sorted, k_sorted, v_sorted, b_sorted, layout)
        out = torch.empty_like(q).view(n * h, d).index_copy_(0, q_rows, out_sorted.reshape(h * n, d))
        if self.meter is not None:
            logits = q_sorted.float() @ k_sorted.float().transpose(1, 2) / math.sqrt(d)
            probabilities = torch.softmax(logits + b_sorted[:, None, :], dim=-1)
            self.meter.record("annsa", layer, probabilities, layout.token_mask(n, k_sorted.shape[1]))
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
