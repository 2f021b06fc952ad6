"""How attention is computed, behind one signature the model calls: `self_attention` and `cross_attention`.

The DiT hands over pre-rotary queries, keys and values; an attention context decides what they attend to and
computes it. Two contexts:

- `SequenceAttention`: no cache. Every frame of a whole sequence in one forward, frame-causal by chunk (a token
  sees its own chunk and every earlier one). For training and as the reference the cached path is tested against.
- `CachedAttention`: one autoregressive step of a batch of worlds. Each world's queries see the slots its
  `CachePolicy` exposes plus the current chunk (densely, or block-sparse through AnnSA when `SparseAttention`
  says so for this layer and step); in a commit pass the policy then stores the chunk's keys/values.
  Worlds hold different cache lengths, so attention runs **per world over its own slots** (grouped: no padding, no
  wasted work); projections and feed-forward layers around it stay batched over all worlds.

Both rotate queries and keys (3D RoPE) here, at attention time, so caches hold pre-rotary keys. The softmax itself
is `torch.nn.functional.scaled_dot_product_attention` with an optional additive per-key bias (log m of merged
slots, FAST-AR Lemma 5.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.kv_cache import WorldCache
from engine.policies import CachePolicy
from engine.rope import Rope3D
from engine.sparse_attention import SparseAttention


class AttentionContext(Protocol):
    """What the DiT calls; q, k, v are pre-rotary (B, N, h, d), prompt k, v (B, L, h, d), mask (B, L) bool."""

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of one world: q (N, h, d), rotated k and v (S, h, d), bias (S,) or None -> (N, h, d)."""
    mask = None if bias is None else bias.to(q.dtype)  # (S,) broadcasts over (h, N, S)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)  # (N, h, d)


def cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-attention to prompt tokens: q (B, N, h, d), k and v (B, L, h, d), mask (B, L) bool -> (B, N, h, d)."""
    keep = mask[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
    return out.transpose(1, 2)


class SequenceAttention:
    """Uncached, frame-causal attention over whole sequences: pos (B, N, 3); block (N,) chunk index per token."""

    def __init__(self, rope: Rope3D, pos: torch.Tensor, block: torch.Tensor) -> None:
        self.rope = rope
        self.pos = pos
        self.mask = block[None, :] <= block[:, None]  # (N, N): query i sees key j iff j's chunk is not later

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = self.rope.rotate(q, self.pos), self.rope.rotate(k, self.pos)  # (B, N, h, d)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask
        )
        return out.transpose(1, 2)

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return cross_attend(q, k, v, mask)


class CachedAttention:
    """One pass over B worlds: pos (B, N, 3) of the current chunk, whose first frame is `first_frames[b]`.

    With `write=True` (the commit pass) each layer's current keys/values are handed to the policy after the layer
    has attended, so the chunk never sees itself twice. With `write=False` (denoising) the caches are only read.
    `sparse` (None: dense everywhere) decides per layer and denoising `step` whether AnnSA / AnnCA run.
    """

    def __init__(
        self,
        rope: Rope3D,
        policy: CachePolicy,
        caches: Sequence[WorldCache],
        pos: torch.Tensor,
        first_frames: Sequence[int],
        write: bool,
        sparse: SparseAttention | None = None,
        step: int = 0,
    ) -> None:
        self.rope = rope
        self.policy = policy
        self.caches = caches
        self.pos = pos
        self.first_frames = first_frames
        self.write = write
        self.sparse = sparse
        self.step = step

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse if self.sparse is not None and self.sparse.self_sparse(layer, self.step) else None
        n = k.shape[1]
        outs = []
        for b, cache in enumerate(self.caches):
            layer_cache = cache.layers[layer]
            view = self.policy.view(layer_cache)
            s = view.sinks
            # keys in the order [sinks | current chunk | other slots]: sparse attention always sees the first two
            keys = torch.cat((view.key[:s], k[b], view.key[s:]))  # (S + N, h, d)
            values = torch.cat((view.value[:s], v[b], view.value[s:]))
            pos = torch.cat((view.pos[:s], self.pos[b], view.pos[s:]))  # (S + N, 3)
            bias = None
            if view.bias is not None:  # current tokens: m = 1, log m = 0
                bias = torch.cat((view.bias[:s], view.bias.new_zeros(n), view.bias[s:]))
            q_rot, k_rot = self.rope.rotate(q[b], self.pos[b]), self.rope.rotate(keys, pos)
            if sparse is None:
                outs.append(attend(q_rot, k_rot, values, bias))
            else:
                outs.append(sparse.self_attention(layer, q_rot, k_rot, values, bias, fixed=s + n))
            if self.write:
                self.policy.commit(layer_cache, k[b], v[b], self.pos[b], self.first_frames[b])
        return torch.stack(outs)  # (B, N, h, d)

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if self.sparse is not None and self.sparse.cross_sparse(layer, self.step):
            return self.sparse.cross_attention(layer, q, k, v, mask)
        return cross_attend(q, k, v, mask)
