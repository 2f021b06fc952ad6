"""How attention is computed, behind one signature the model calls: `self_attention` and `cross_attention`.

The DiT hands over pre-rotary queries, keys and values; an attention context decides what they attend to and
computes it. Three contexts:

- `SequenceAttention`: no cache. Every frame of a whole sequence in one forward, frame-causal by chunk (a token
  sees its own chunk and every earlier one). For training and as the reference the cached path is tested against.
- `PrefillAttention`: several chunks written into caches that keep every token exactly (`dense`) in one forward:
  each chunk sees the cached slots and, frame-causally, the chunks before it in the pass, as that many commit passes
  one after another would (what `WorldEngine.observe_latents` runs for a training rollout's true frames).
- `CachedAttention`: one autoregressive step of a batch of worlds. Each world's queries see the slots its
  `CachePolicy` exposes plus the current chunk (densely, or block-sparse through AnnSA when `SparseAttention`
  says so for this layer and step); in a commit pass the policy then stores the chunk's keys/values.
  Worlds hold different cache lengths. Dense attention runs for all of them in **one call per pass**, each world's
  slots left-padded to the longest (`StackedSlots`; the padding masked out), as long as the padding adds at most
  `MAX_PADDING` of the slots attended; worlds further apart in length attend **per world over its own slots**.
  AnnSA runs **one call per group of worlds with as many slots each**, every pass at once: their slots laid out
  side by side as the heads of one block-sparse layout (a bounded policy's full caches: the whole batch).
  Projections and feed-forward layers around attention always run batched over all worlds.

Both rotate queries and keys (3D RoPE) here, at attention time, so caches hold pre-rotary keys; within one engine
step the rotated cache slots are computed once and shared by its passes (`StepSlots`). The softmax itself
is `torch.nn.functional.scaled_dot_product_attention` with an optional additive per-key bias (log m of merged
slots, FAST-AR Lemma 5.1). The engine runs its forwards under `without_cudnn_attention`: a step's shapes change
every frame (cache lengths), and cuDNN's attention, first in PyTorch's order on Hopper GPUs, builds a graph for
every shape it has not seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.kv_cache import KVView, WorldCache
from engine.policies import CachePolicy
from engine.rope import Rope3D
from engine.sparse_attention import SortedSlots, SparseAttention
from engine.transfer import to_device

# Dense attention of a batch's worlds runs in one padded call while padding adds at most this share to the keys
# attended (worlds at different frame counts under `dense`, or whose TempCaches merged differently), by device
# type; beyond it, one call per world. On a CPU the padded call does the padding's arithmetic too, so the share is
# kept small; on a GPU a call costs its launch, far more than this model's arithmetic per call (docs/engine.md,
# "World API").
MAX_PADDING = {"cpu": 0.5, "cuda": 4.0}


@contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """Scaled-dot-product attention without the cuDNN backend inside the block, unless the caller chose cuDNN
    alone (`torch.nn.attention.sdpa_kernel`). cuDNN builds and caches a graph per new shape, on the host, and a
    world's cache length is a new shape nearly every frame; the flash and memory-efficient kernels take any."""
    backends = torch.backends.cuda
    others = backends.flash_sdp_enabled() or backends.mem_efficient_sdp_enabled() or backends.math_sdp_enabled()
    if not (backends.cudnn_sdp_enabled() and others):
        yield
        return
    backends.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        backends.enable_cudnn_sdp(True)


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


class PrefillAttention:
    """The commit of several chunks at once into `caches` under a policy that keeps every token exactly (`dense`):
    pos (B, N, 3) of the chunks' tokens, world b's from frame first_frames[b]; mask (N, N) bool, frame-causal by
    chunk (`causal_mask`). In each layer every token attends to every cached slot of its world and to the tokens the
    mask lets it see, then the policy stores all of them: the keys and values that N / chunk commit passes, one
    after another, would store, in one forward (equal up to float rounding). The worlds' caches are read in one
    gather where they are rows of a pool (padded to the longest, the padding masked), else world by world."""

    def __init__(
        self,
        rope: Rope3D,
        policy: CachePolicy,
        caches: Sequence[WorldCache],
        pos: torch.Tensor,
        first_frames: Sequence[int],
        mask: torch.Tensor,
    ) -> None:
        self.rope = rope
        self.policy = policy
        self.caches = caches
        self.pos = pos
        self.first_frames = first_frames
        self.turns = rope.turns(pos)
        self.new = torch.zeros(mask.shape, device=pos.device).masked_fill(~mask, -math.inf)  # (N, N) additive

    def self_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q_rot, k_rot = Rope3D.rotate_by(torch.cat((q, k), dim=2), self.turns).chunk(2, dim=2)  # (B, N, h, d) each
        layers = [cache.layers[layer] for cache in self.caches]
        pooled = self.policy.view_worlds(layers)
        if pooled is not None:
            slots = max(pooled.lengths)
            key, value, pos, bias = pooled.padded(slots)
            out = self._attend(q_rot, k_rot, v, self.rope.rotate(key, pos), value, bias)
        else:
            out = torch.empty_like(q)
            for b, layer_cache in enumerate(layers):
                view = self.policy.view(layer_cache)
                key = self.rope.rotate(view.key, view.pos)[None]
                bias = None if view.bias is None else view.bias[None]
                out[b : b + 1] = self._attend(
                    q_rot[b : b + 1], k_rot[b : b + 1], v[b : b + 1], key, view.value[None], bias
                )
        self.policy.commit_worlds(layers, k, v, self.pos, self.first_frames)  # after every world has attended
        return out

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cached_key: torch.Tensor,
        cached_value: torch.Tensor,
        cached_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """q, k, v (B, N, h, d) (q and k rotated) over the cached slots (B, S, h, d) with their bias (B, S) or None,
        and the new tokens through the mask -> (B, N, h, d)."""
        B, N, S = q.shape[0], q.shape[1], cached_key.shape[1]
        old = torch.zeros(B, N, S, device=q.device) if cached_bias is None else cached_bias[:, None, :].expand(B, N, S)
        bias = torch.cat((old, self.new.expand(B, N, N)), dim=2).to(q.dtype)[:, None]  # (B, 1, N, S + N)
        keys, values = torch.cat((cached_key, k), dim=1), torch.cat((cached_value, v), dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=bias
        )
        return out.transpose(1, 2)

    def cross_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return cross_attend(q, k, v, mask)


@dataclass
class StackedSlots:
    """The visible slots of one layer of a batch's B worlds for one step, left-padded to the longest: key, value
    (B, S + N, h, d) hold world b's S_b slots (keys rotated) at [S - S_b, S), zeros before them and then N rows for
    the current chunk, which every pass writes in place for all worlds at once; bias (B, S + N) float32, -inf on
    the padding and log m on merged slots, or None where there is neither. Each world's `RotatedSlots` is a view
    of its row."""

    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    slots: int  # S

    @property
    def worlds(self) -> int:
        return self.key.shape[0]


@dataclass
class RotatedSlots:
    """One world's keys and values of one layer for one step: key, value (S + N, h, d) hold the S visible cache
    slots (keys rotated; the first `sinks` are sink slots) and then N rows for the current chunk, which every pass
    writes in place; bias (S + N,) or None. Once AnnSA needs them, `sorted` holds the same slots in its order.
    Where the batch attends together they are row `row` of `stack`."""

    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    sinks: int
    slots: int  # S
    sorted: SortedSlots | None = None
    sorted_row: int = 0  # this world's place among the worlds `sorted` lays out side by side
    stack: StackedSlots | None = None
    row: int = 0


class StepSlots:
    """What the passes of one engine step share: per world and layer, the visible slots rotated (and sorted for
    AnnSA) once. Valid until the cache changes: it is read-only while denoising, and the chunk's commit pass (run in
    the world's next step, `World.pending`) reads the same slots, each layer writing only after it has attended and
    then dropping its stale slots. A new step needs a new StepSlots."""

    def __init__(self) -> None:
        self._slots: dict[tuple[int, int], RotatedSlots] = {}
        self._stacks: dict[int, StackedSlots] = {}

    def get(self, world: int, layer: int) -> RotatedSlots | None:
        return self._slots.get((world, layer))

    def put(self, world: int, layer: int, slots: RotatedSlots) -> RotatedSlots:
        self._slots[(world, layer)] = slots
        return slots

    def drop(self, world: int, layer: int) -> None:
        self._slots.pop((world, layer), None)
        self._stacks.pop(layer, None)

    def stack(self, layer: int) -> StackedSlots | None:
        """Every world's slots of `layer`, padded and stacked, once the batch has attended together."""
        return self._stacks.get(layer)

    def put_stack(self, layer: int, stack: StackedSlots) -> StackedSlots:
        self._stacks[layer] = stack
        return stack

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
        stack = self._stack(layer, n)
        if sparse is not None:
            by_pass = [t.view(passes, worlds, *t.shape[1:]) for t in (q_rot, k_rot, v, out)]  # (P, B, N, h, d)
            for group, sorted_slots in self._sorted_groups(sparse, layer, n, passes, stack):
                # every pass of the group's worlds in one call: one layout and one kernel launch
                if len(group) == worlds:
                    by_pass[3].copy_(sparse.self_attention(layer, *by_pass[:3], sorted_slots))
                    continue
                index = to_device(group, q.device)
                q_g, k_g, v_g = (t.index_select(1, index) for t in by_pass[:3])
                by_pass[3].index_copy_(1, index, sparse.self_attention(layer, q_g, k_g, v_g, sorted_slots))
        elif stack is not None:
            for first in range(0, q.shape[0], worlds):  # pass by pass: rows p B .. p B + B - 1
                rows = slice(first, first + worlds)
                stack.key[:, stack.slots :], stack.value[:, stack.slots :] = k_rot[rows], v[rows]
                out[rows] = attend_worlds(q_rot[rows], stack.key, stack.value, stack.bias)
        else:
            for b in range(worlds):
                slots = self._slots(b, layer, n)
                for row in range(b, q.shape[0], worlds):
                    # the chunk's rows of the shared buffer are rewritten by each pass before it attends
                    slots.key[slots.slots :], slots.value[slots.slots :] = k_rot[row], v[row]
                    out[row] = attend(q_rot[row], slots.key, slots.value, slots.bias)
        if self.write:  # each world's cache changes only after every world has attended to it
            caches = [cache.layers[layer] for cache in self.caches]
            self.policy.commit_worlds(caches, k, v, self.pos, self.first_frames)
            for b in range(worlds):
                self.shared.drop(b, layer)  # stale now that the cache has changed; freed layer by layer
        return out

    def _sorted_groups(
        self, sparse: SparseAttention, layer: int, n: int, passes: int, stack: StackedSlots | None
    ) -> list[tuple[list[int], SortedSlots]]:
        """The batch's worlds in groups, each group's slots laid out side by side for AnnSA once per step and layer
        (`SparseAttention.sort_slots`, shorter worlds padded): every world with as many sinks in one group where the
        batch attends together (`stack`; a world's sinks differ only in its first frame), else each world alone.
        The layout a group's denoising made is what its commit pass reads, where the same worlds commit together."""
        every = [self._slots(b, layer, n) for b in range(len(self.caches))]
        by_sinks: dict[int, list[int]] = {}
        for b, slots in enumerate(every):
            by_sinks.setdefault(slots.sinks, []).append(b)
        groups = list(by_sinks.values()) if stack is not None else [[b] for b in range(len(every))]
        out = []
        for group in groups:
            members = [every[b] for b in group]
            laid = members[0].sorted  # the same worlds' layout, in the same order, for at least as many passes
            kept = laid is not None and laid.worlds == len(group) and laid.passes >= passes
            if not (kept and all(m.sorted is laid and m.sorted_row == i for i, m in enumerate(members))):
                laid = self._sort(sparse, members, stack, n, passes)
                for i, m in enumerate(members):
                    m.sorted, m.sorted_row = laid, i
            out.append((group, laid))
        return out

    @staticmethod
    def _sort(
        sparse: SparseAttention, members: list[RotatedSlots], stack: StackedSlots | None, n: int, passes: int
    ) -> SortedSlots:
        """`members`' slots as `sort_slots` takes them: (G, S, h, d), S the longest, each world's from its first
        slot (its first sink) on; several worlds are read from their rows of `stack` in one indexed read."""
        lengths = [m.slots for m in members]
        s, sinks = max(lengths), members[0].sinks
        if len(members) == 1:
            m = members[0]
            bias = None if m.bias is None else m.bias[None, :s]
            return sparse.sort_slots(m.key[None, :s], m.value[None, :s], bias, sinks, current=n, passes=passes)
        assert stack is not None and all(m.stack is stack for m in members)
        device = stack.key.device
        rows = to_device([m.row for m in members], device)[:, None]
        starts = to_device([stack.slots - m.slots for m in members], device)[:, None]  # left-padded in the stack
        index = (starts + torch.arange(s, device=device)).clamp(max=max(stack.slots - 1, 0))  # (G, S)
        key, value = stack.key[rows, index], stack.value[rows, index]
        bias = None if stack.bias is None else stack.bias[rows, index]
        return sparse.sort_slots(key, value, bias, sinks, current=n, passes=passes, lengths=lengths)

    def _stack(self, layer: int, n: int) -> StackedSlots | None:
        """The slots of every world of the batch for dense attention in one call per pass (`StackedSlots`), built
        once per step and layer; None for a single world, or where padding to the longest world would add more
        than `MAX_PADDING` of the slots attended (then each world attends alone)."""
        worlds = len(self.caches)
        if worlds == 1:
            return None
        stack = self.shared.stack(layer)
        if stack is not None:
            return stack
        carried = [self.shared.get(b, layer) for b in range(worlds)]  # a commit pass's: its denoising's slots
        first = carried[0].stack if carried[0] is not None else None
        if (
            first is not None
            and first.worlds == worlds
            and all(c is not None and c.stack is first and c.row == b for b, c in enumerate(carried))
        ):
            return self.shared.put_stack(layer, first)  # the same worlds in the same order: their stack as it was
        # a step's first forward reads every world's cache: in one gather where the caches share a pool (a bounded
        # policy's), else world by world; a commit pass reads what its worlds' denoising rotated
        pooled = None
        if all(c is None for c in carried):
            pooled = self.policy.view_worlds([cache.layers[layer] for cache in self.caches])
        views = {}
        if pooled is not None:
            lengths, sinks = pooled.lengths, pooled.sinks
        else:
            views = {b: self.policy.view(self.caches[b].layers[layer]) for b, c in enumerate(carried) if c is None}
            lengths = [c.slots if c is not None else views[b].key.shape[0] for b, c in enumerate(carried)]
            sinks = [c.sinks if c is not None else views[b].sinks for b, c in enumerate(carried)]
        S = max(lengths)
        limit = MAX_PADDING.get(self.pos.device.type, MAX_PADDING["cpu"])
        if worlds * (S + n) > (1 + limit) * (sum(lengths) + worlds * n):
            return None
        if pooled is not None:  # one gather is the stack, the chunk's rows included
            key, value, pos, bias = pooled.padded(S, room=n)
            key = self.rope.rotate(key, pos)  # every world's slots rotated at once (the chunk's rows: scratch)
        else:
            key, value, bias = self._copied_stack(layer, n, carried, lengths, views)
        stack = StackedSlots(key, value, bias, S)
        for b in range(worlds):
            start = S - lengths[b]
            row_bias = None if bias is None else bias[b, start:]
            self.shared.put(
                b,
                layer,
                RotatedSlots(key[b, start:], value[b, start:], row_bias, sinks[b], lengths[b], stack=stack, row=b),
            )
        return self.shared.put_stack(layer, stack)

    def _copied_stack(
        self, layer: int, n: int, carried: list[RotatedSlots | None], lengths: list[int], views: dict[int, KVView]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`_stack`'s key, value (B, S + n, h, d) and bias, copied world by world from the slots its denoising
        rotated (`carried`) or from its own view (`views`)."""
        worlds, S = len(carried), max(lengths)
        template = self.caches[0].layers[layer].key  # (C, h, d): the cache's dtype and device
        key = template.new_zeros(worlds, S + n, *template.shape[1:])  # zeros: a masked key must still score finite
        value = torch.zeros_like(key)
        merged = any(c is not None and c.bias is not None for c in carried)
        merged = merged or any(view.bias is not None for view in views.values())
        bias = key.new_zeros(worlds, S + n, dtype=torch.float32) if merged or min(lengths) < S else None
        for b, c in enumerate(carried):
            start, s = S - lengths[b], lengths[b]
            if c is not None:
                key[b, start:S], value[b, start:S] = c.key[:s], c.value[:s]
                given_bias = None if c.bias is None else c.bias[:s]
            else:
                view = views[b]
                key[b, start:S], value[b, start:S] = self.rope.rotate(view.key, view.pos), view.value
                given_bias = view.bias
            if bias is not None:
                bias[b, :start] = -math.inf
                if given_bias is not None:
                    bias[b, start:S] = given_bias
        return key, value, bias

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
