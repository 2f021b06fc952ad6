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

Both rotate queries and keys (3D RoPE) here, at attention time, so caches hold pre-rotary keys; within one engine
step the rotated cache slots are computed once and shared by its passes (`StepSlots`). The softmax itself
is `torch.nn.functional.scaled_dot_product_attention` with an optional additive per-key bias (log m of merged
slots, FAST-AR Lemma 5.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.kv_cache import WorldCache
from engine.policies import CachePolicy
from engine.rope import Rope3D
from engine.sparse_attention import SortedSlots, SparseAttention


class AttentionContext(Protocol):
    """What the DiT calls; q, k, v are pre-rotary (B, N, h, d), prompt k, v (B, L, h, d), mask (B, L) bool."""

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of one world: q (N, h, d), rotated k and v (S, h, d), bias (S,) or None -> (N, h, d)."""
    return attend_worlds(q[None], k[None], v[None], None if bias is None else bias[None])[0]


def attend_worlds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of B worlds with S slots each, in one call: q (B, N, h, d), rotated k and v (B, S, h, d),
    bias (B, S) or None -> (B, N, h, d)."""
    mask = None if bias is None else bias.to(q.dtype)[:, None, None, :]  # broadcasts over (B, h, N, S)
    # 4D inputs: on the CPU only these reach the fused (flash) kernel; 3D ones fall back to the math path
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)  # (B, N, h, d)


def cross_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-attention to prompt tokens: q (B, N, h, d), k and v (B, L, h, d), mask (B, L) bool -> (B, N, h, d)."""
    keep = mask[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
    return out.transpose(1, 2)


def causal_mask(block: torch.Tensor) -> torch.Tensor:
    """block (N,) chunk index per token -> (N, N) bool: query i sees key j iff j's chunk is not later than i's."""
    return block[None, :] <= block[:, None]


class SequenceAttention:
    """Uncached attention over whole sequences: pos (B, N, 3); mask (N, N) bool, True where query i sees key j
    (`causal_mask` for frame-causal generation; training builds its own, engine/train.py)."""

    def __init__(self, rope: Rope3D, pos: torch.Tensor, mask: torch.Tensor) -> None:
        self.turns = rope.turns(pos)  # the same positions in every layer: rotations computed once
        self.mask = mask

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = Rope3D.rotate_by(torch.cat((q, k), dim=2), self.turns).chunk(2, dim=2)  # (B, N, h, d) each
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask
        )
        return out.transpose(1, 2)

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return cross_attend(q, k, v, mask)


@dataclass
class RotatedSlots:
    """One world's keys and values of one layer for one step: key, value (S + N, h, d) hold the S visible cache
    slots (keys rotated; the first `sinks` are sink slots) and then N rows for the current chunk, which every pass
    writes in place; bias (S + N,) or None. Once AnnSA needs them, `sorted` holds the same slots in its order."""

    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    sinks: int
    slots: int  # S
    sorted: SortedSlots | None = None


class StepSlots:
    """What the passes of one engine step share: per world and layer, the visible slots rotated (and sorted for
    AnnSA) once. Valid until the cache changes: it is read-only while denoising, and the chunk's commit pass (run in
    the world's next step, `World.pending`) reads the same slots, each layer writing only after it has attended and
    then dropping its stale slots. A new step needs a new StepSlots."""

    def __init__(self) -> None:
        self._slots: dict[tuple[int, int], RotatedSlots] = {}

    def get(self, world: int, layer: int) -> RotatedSlots | None:
        return self._slots.get((world, layer))

    def put(self, world: int, layer: int, slots: RotatedSlots) -> RotatedSlots:
        self._slots[(world, layer)] = slots
        return slots

    def drop(self, world: int, layer: int) -> None:
        self._slots.pop((world, layer), None)

    def of_world(self, world: int) -> dict[int, RotatedSlots]:
        """World `world`'s slots, per layer: what a later commit pass of the chunk this step made reads."""
        return {layer: slots for (w, layer), slots in self._slots.items() if w == world}

    @classmethod
    def of_worlds(cls, worlds: Sequence[dict[int, RotatedSlots]]) -> StepSlots:
        """The slots `of_world` kept for each of a batch's worlds, world b's as world b's."""
        shared = cls()
        for b, layers in enumerate(worlds):
            for layer, slots in layers.items():
                shared.put(b, layer, slots)
        return shared


class CachedAttention:
    """One forward over B worlds: pos (B, N, 3) of the current chunk, whose first frame is `first_frames[b]`.

    The forward's batch holds `passes` rows per world, pass-major (row p B + b is pass p of world b): the guidance
    passes of one denoising step differ only in the current chunk's conditioning, so they run as one batch and
    read the same rotated slots. With `write=True` (the commit pass, one pass) each layer's current keys/values are
    handed to the policy after the layer has attended, so the chunk never sees itself twice. With `write=False`
    (denoising) the caches are only read. `sparse` (None: dense everywhere) decides per layer and denoising `step`
    whether AnnSA / AnnCA run. `shared` carries the rotated slots from one forward of the step to the next.
    """

    def __init__(
        self,
        rope: Rope3D,
        policy: CachePolicy,
        caches: Sequence[WorldCache],
        pos: torch.Tensor,
        first_frames: Sequence[int],
        write: bool,
        shared: StepSlots,
        sparse: SparseAttention | None = None,
        step: int = 0,
        passes: int = 1,
    ) -> None:
        if passes < 1 or (write and passes != 1):
            raise ValueError(f"a forward holds one or more passes and a commit exactly one, got {passes}")
        self.rope = rope
        self.policy = policy
        self.caches = caches
        self.pos = pos
        self.first_frames = first_frames
        self.write = write
        self.shared = shared
        self.sparse = sparse
        self.step = step
        # each row at its world's positions, the same in every layer: (P B, N, 1, d/2) rotations computed once
        self.row_turns = rope.turns(pos.repeat(passes, 1, 1))

    def _slots(self, world: int, layer: int, n: int) -> RotatedSlots:
        slots = self.shared.get(world, layer)
        if slots is None:
            # one buffer per step, not one concatenation per pass: fewer and steadier allocations (with a growing
            # dense cache, per-pass copies of ever larger size fragmented the CPU heap into gigabytes of RSS)
            view = self.policy.view(self.caches[world].layers[layer])
            rotated = self.rope.rotate(view.key, view.pos)  # (S, h, d)
            key = torch.cat((rotated, rotated.new_empty(n, *rotated.shape[1:])))  # (S + N, h, d)
            value = torch.cat((view.value, view.value.new_empty(n, *view.value.shape[1:])))
            bias = None if view.bias is None else F.pad(view.bias, (0, n))  # current tokens: m = 1, log m = 0
            slots = self.shared.put(world, layer, RotatedSlots(key, value, bias, view.sinks, view.key.shape[0]))
        return slots

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse if self.sparse is not None and self.sparse.self_sparse(layer, self.step) else None
        n, worlds = k.shape[1], len(self.caches)
        # queries and keys of every row rotated at once: (P B, N, 2 h, d)
        rotated = Rope3D.rotate_by(torch.cat((q, k), dim=2), self.row_turns)
        q_rot, k_rot = rotated.chunk(2, dim=2)
        passes, out = q.shape[0] // worlds, torch.empty_like(q)  # out (P B, N, h, d)
        if sparse is not None or not self._attend_together(layer, n, q_rot, k_rot, v, out):
            for b in range(worlds):
                slots = self._slots(b, layer, n)
                rows = slice(b, None, worlds)  # world b's rows, one per pass
                if sparse is None:
                    for row in range(b, q.shape[0], worlds):
                        # the chunk's rows of the shared buffer are rewritten by each pass before it attends
                        slots.key[slots.slots :], slots.value[slots.slots :] = k_rot[row], v[row]
                        out[row] = attend(q_rot[row], slots.key, slots.value, slots.bias)
                else:
                    if slots.sorted is None or slots.sorted.passes < passes:
                        s = slots.slots
                        bias = None if slots.bias is None else slots.bias[:s]
                        slots.sorted = sparse.sort_slots(
                            slots.key[:s], slots.value[:s], bias, slots.sinks, current=n, passes=passes
                        )
                    # every pass of the world in one call: one layout and one kernel launch instead of P
                    out[rows] = sparse.self_attention(layer, q_rot[rows], k_rot[rows], v[rows], slots.sorted)
        if self.write:  # each world's cache changes only after every world has attended to it
            for b in range(worlds):
                self.policy.commit(self.caches[b].layers[layer], k[b], v[b], self.pos[b], self.first_frames[b])
                self.shared.drop(b, layer)  # stale now that the cache has changed; freed layer by layer
        return out

    def _attend_together(
        self, layer: int, n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor
    ) -> bool:
        """Dense attention of all worlds in one call per pass, where there are several and each shows the same
        number of slots, all with a bias or none (the worlds of a training rollout, which observed the same
        frames): rotated q and k, and v (P B, N, h, d) -> `out`, written in place. On a GPU a call per world and
        pass costs far more than its arithmetic (about 1 ms each on an H200, README "On a GPU"). Returns False,
        having written nothing, where the worlds differ."""
        worlds = len(self.caches)
        if worlds == 1:
            return False
        slots = [self._slots(b, layer, n) for b in range(worlds)]
        if len({s.slots for s in slots}) > 1 or len({s.bias is None for s in slots}) > 1:
            return False
        # stacked once per call: each world keeps a buffer of its own (caches grow and shrink apart)
        key, value = torch.stack([s.key for s in slots]), torch.stack([s.value for s in slots])  # (B, S + N, h, d)
        bias = None if slots[0].bias is None else torch.stack([s.bias for s in slots])  # (B, S + N)
        S = slots[0].slots
        for first in range(0, q.shape[0], worlds):  # pass by pass: rows p B .. p B + B - 1
            rows = slice(first, first + worlds)
            key[:, S:], value[:, S:] = k[rows], v[rows]
            out[rows] = attend_worlds(q[rows], key, value, bias)
        return True

    def cross_sparse(self, layer: int) -> bool:
        """Whether AnnCA prunes the prompt in this layer of this forward."""
        return self.sparse is not None and self.sparse.cross_sparse(layer, self.step)

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if self.cross_sparse(layer):
            return self.sparse.cross_attention(layer, q, k, v, mask)
        return cross_attend(q, k, v, mask)


class FoldedCommit:
    """One forward that denoises and commits: rows [0, split) are a denoising forward's (`denoise`), the rows
    after them the commit pass (`commit`, write=True) of the chunks some of the same worlds generated in their
    previous step. In every layer the commit rows attend and write first, so the denoising rows read the caches as
    written, exactly as if the commit pass had run on its own before the forward; the two share the forward's
    projections and feed-forward layers instead of running them twice."""

    def __init__(self, denoise: CachedAttention, commit: CachedAttention, split: int) -> None:
        if not commit.write or denoise.write:
            raise ValueError("a folded forward holds a denoising context and a writing one, in that order")
        self.denoise = denoise
        self.commit = commit
        self.split = split

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.split
        committed = self.commit.self_attention(layer, q[s:], k[s:], v[s:])  # writes this layer's caches
        return torch.cat((self.denoise.self_attention(layer, q[:s], k[:s], v[:s]), committed))

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if not (self.denoise.cross_sparse(layer) or self.commit.cross_sparse(layer)):
            return cross_attend(q, k, v, mask)  # every row dense: one call
        s = self.split
        return torch.cat(
            (
                self.denoise.cross_attention(layer, q[:s], k[:s], v[:s], mask[:s]),
                self.commit.cross_attention(layer, q[s:], k[s:], v[s:], mask[s:]),
            )
        )
