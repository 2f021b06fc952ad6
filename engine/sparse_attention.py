"""Sparse attention, decided once per engine: the AnnSA / AnnCA toggles, their schedule and the kernel backend.

Schedule (FAST-AR section 6.1, following SVG): attention stays dense for the first round(dense_step_fraction x
steps) denoising steps, where the sample is mostly noise and attention is broad, and in the blocks listed in
`dense_layers`; the commit pass (step index = steps) counts as the last step. With the shipped 3-step sampler and
a fraction of 0.3, round(0.9) = 1: step 0 is dense, steps 1-2 and the commit pass are sparse (a third of the
denoising steps dense, the closest a 3-step schedule gets to 30%).

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
from engine.transfer import to_device


@dataclass
class SortedSlots:
    """G worlds' keys of one layer in AnnSA's order, laid out once per engine step for up to `passes` passes:
    rotated key and value (P, G h, S, d) and bias (P, G h, S) float32, world-major then head, in the order
    [sinks | current chunk | cache slots sorted by bucket], and the sorted keys' bucket membership. Each pass has
    its own copy because the current chunk's rows differ between passes; every forward rewrites them."""

    keys: SortedKeys
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor
    sinks: int
    worlds: int

    @property
    def passes(self) -> int:
        return self.key.shape[0]


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

    def sort_slots(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        sinks: int,
        current: int,
        passes: int = 1,
        lengths: list[int] | None = None,
    ) -> SortedSlots:
        """Lay out the cache slots of one layer of G worlds for AnnSA, once per engine step: rotated key, value
        (G, S, h, d) and bias (G, S) or None, world w's slots in its first `lengths[w]` rows (None: all S), its first
        `sinks` being sinks; `current` rows are left for the chunk being generated, which every pass writes in
        (`self_attention`), with one copy for each of `passes`. The worlds are laid out side by side, as G h heads
        of one layout; a shorter world's padding sorts last, holds no bucket and has bias -inf, so no query sees it
        and each world's layout is the one it has alone."""
        assert self.annsa is not None
        g, s, h, d = key.shape
        fixed = sinks + current
        valid = None  # (G, S): which rows hold a slot, where some world is shorter than S
        if lengths is not None and min(lengths) < s:
            valid = torch.arange(s, device=key.device) < to_device(lengths, key.device)[:, None]
            bias = torch.where(valid, 0.0 if bias is None else bias.float(), -math.inf)
        rest = key[:, sinks:].transpose(1, 2).flatten(0, 1)  # (G h, R, d)
        keys = self.annsa.sort_keys(rest, fixed, None if valid is None else valid[:, sinks:].repeat_interleave(h, 0))
        # per world and head, the slot behind every row of the layout: sinks, then `current` rows standing for the
        # chunk (slot s: the zero bias appended below; key and value rows are rewritten by every pass before it
        # attends), then the sorted slots
        device = key.device
        sink_slots = torch.arange(sinks, device=device).expand(g * h, -1)
        chunk_rows = torch.full((g * h, current), s, device=device)
        slot = torch.cat((sink_slots, chunk_rows, keys.order + sinks), dim=1)  # (G h, S + current)
        world = torch.arange(g, device=device).repeat_interleave(h)[:, None]  # (G h, 1)
        head = torch.arange(h, device=device).repeat(g)[:, None]
        # token i of head j of world w is row (w s + i) h + j of the (G s h, d) view: one index_select per tensor
        rows = ((world * s + slot.clamp(max=s - 1)) * h + head).repeat(passes, 1).flatten()
        bias = bias.float() if bias is not None else key.new_zeros(g, s, dtype=torch.float32)
        laid = (passes, g * h, fixed + s - sinks)

        def picked(source: torch.Tensor) -> torch.Tensor:  # (G, s, h, d) -> (P, G h, S + current, d)
            if s == 0:  # nothing cached yet: only the chunk's rows
                return source.new_zeros(*laid, d)
            return source.reshape(g * s * h, d).index_select(0, rows).view(*laid, d)

        biased = (world * (s + 1) + slot).repeat(passes, 1).flatten()  # into the (G (s + 1),) padded bias
        bias = F.pad(bias, (0, 1)).flatten().index_select(0, biased).view(laid)
        return SortedSlots(keys, picked(key), picked(value), bias, sinks, g)

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: SortedSlots
    ) -> torch.Tensor:
        """G worlds, P passes at once (P at most `slots.passes`): rotated q, k and v (P, G, N, h, d) of each pass's
        current chunk over itself and each world's sorted cache slots -> (P, G, N, h, d), in one layout and one
        kernel call. Each pass's chunk keys and values are written into its copy of the slots' reserved rows (bias
        0: m = 1)."""
        assert self.annsa is not None and k.shape[2] == slots.keys.fixed - slots.sinks and len(q) <= slots.passes
        p, g, n, h, d = q.shape
        assert g == slots.worlds
        current = slice(slots.sinks, slots.keys.fixed)
        slots.key[:p, :, current] = k.transpose(2, 3).flatten(1, 2)  # (P, G h, N, d)
        slots.value[:p, :, current] = v.transpose(2, 3).flatten(1, 2)
        key, value, bias = (t[:p].flatten(0, 1) for t in (slots.key, slots.value, slots.bias))  # (P G h, S, ...)
        q_heads = q.transpose(2, 3).reshape(p * g * h, n, d)  # rows P G h: pass, then world, then head
        q_order, layout = self.annsa.layout(q_heads, slots.keys)
        rows = q_order[..., None].expand(-1, -1, d)  # (P G h, N, d): sorted row r of a head is its query q_order[r]
        q_sorted = q_heads.gather(1, rows)
        out_sorted = self.kernel(q_sorted, key, value, bias, layout)
        out = torch.empty_like(q_heads).scatter_(1, rows, out_sorted)  # back in query order, (P G h, N, d)
        if self.meter is not None:
            logits = q_sorted.float() @ key.float().transpose(1, 2) / math.sqrt(d)
            probabilities = torch.softmax(logits + bias[:, None, :], dim=-1)
            exists = torch.isfinite(bias)[:, None, :]  # not a shorter world's padding
            self.meter.record("annsa", layer, probabilities, layout.token_mask(n, key.shape[1]), exists)
        return out.view(p, g, h, n, d).transpose(2, 3)

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
