"""KV cache storage: fixed-capacity slot buffers per layer, the per-world set of them, and the pool that holds the
bounded caches of many worlds as rows of a few buffers per layer.

A *slot* holds one cached token of one layer, shared by all heads: its pre-rotary key and its value per head,
the position (t, y, x) of its newest member, a count m of the tokens merged into it (1 unless a merging policy
merged several), and the frame index at which it was last written. Attention adds log m to the slot's logit
(FAST-AR Lemma 5.1), so a slot with mean value and count m stands for m identical keys exactly.

This module only stores. Which slots exist (append, overwrite, merge, evict) and which slots a query sees is the
job of a `CachePolicy` (engine/policies.py); how attention is computed is the job of engine/attention.py.
"""

from __future__ import annotations

import heapq
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.transfer import to_device


@dataclass
class KVView:
    """The slots a query may attend to; positions travel with them, so order does not matter, except that the
    first `sinks` slots are the attention-sink frames (always visible to sparse attention).

    key, value: (S, h, d) pre-rotary keys and values; pos: (S, 3) int32 (t, y, x);
    bias: (S,) float32 additive logit bias (log m), or None when every count is 1.
    """

    key: torch.Tensor
    value: torch.Tensor
    pos: torch.Tensor
    bias: torch.Tensor | None
    sinks: int = 0


class SlotPool:
    """The slot buffers of one layer for `rows` worlds, one row each: key, value (R, C, h, d), pos (R, C, 3) int32,
    count (R, C) float32, frame (R, C) int64. Batched cache work (a TempCache commit pass, a padded attention call)
    indexes every world's slots at once by (row, slot); a `LayerCache` is one row's views."""

    FIELDS = ("key", "value", "pos", "count", "frame")

    def __init__(
        self, rows: int, capacity: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.key = torch.zeros(rows, capacity, heads, head_dim, dtype=dtype, device=device)
        self.value = torch.zeros_like(self.key)
        self.pos = torch.zeros(rows, capacity, 3, dtype=torch.int32, device=device)
        self.count = torch.zeros(rows, capacity, dtype=torch.float32, device=device)
        self.frame = torch.zeros(rows, capacity, dtype=torch.int64, device=device)

    @property
    def rows(self) -> int:
        return self.key.shape[0]

    @property
    def capacity(self) -> int:
        return self.key.shape[1]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row: one world's slots of this layer."""
        return sum(getattr(self, f).shape[1:].numel() * getattr(self, f).element_size() for f in self.FIELDS)

    def resized(self, rows: int, capacity: int, keep: int) -> SlotPool:
        """A new pool of `rows` x `capacity` slots holding the first `keep` slots of each of this one's rows (this
        one is left as it was, so a failed allocation changes nothing)."""
        heads, head_dim = self.key.shape[2:]
        pool = SlotPool(rows, capacity, heads, head_dim, self.key.dtype, self.key.device)
        for name in self.FIELDS:
            getattr(pool, name)[: self.rows, :keep] = getattr(self, name)[:, :keep]
        return pool

    def clear(self, row: int) -> None:
        for name in self.FIELDS:
            getattr(self, name)[row].zero_()

    def write_at(
        self, rows: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor
    ) -> None:
        """Fresh slots (count 1) at (rows[i], slots[i]), each pair once: key, value (u, h, d); pos (u, 3)."""
        self.key[rows, slots] = key
        self.value[rows, slots] = value
        self.pos[rows, slots] = pos
        self.count[rows, slots] = 1.0
        self.frame[rows, slots] = pos[:, 0].to(torch.int64)

    def merge(
        self, rows: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor
    ) -> None:
        """Merge one new token into each slot (rows[i], slots[i]), each pair once: newest key and position, running
        mean value, count + 1."""
        count = self.count[rows, slots]  # (u,)
        mean = (self.value[rows, slots].float() * count[:, None, None] + value.float()) / (count[:, None, None] + 1)
        self.value[rows, slots] = mean.to(self.value.dtype)
        self.key[rows, slots] = key
        self.pos[rows, slots] = pos
        self.count[rows, slots] = count + 1
        self.frame[rows, slots] = pos[:, 0].to(torch.int64)


@dataclass
class PooledViews:
    """What B worlds whose layer caches are rows of a `CachePool` see, read in one gather per segment of the pool
    they occupy: each world its slots [0, lengths[b]), the first sinks[b] of them sink slots; `merged` if any of
    them holds a merged slot."""

    caches: list[LayerCache]
    lengths: list[int]
    sinks: list[int]
    merged: bool

    @classmethod
    def of(cls, caches: list[LayerCache], sinks: int) -> PooledViews | None:
        """Every slot in use of each cache (a `LayerCache.view` each), or None unless each is a row of a pool."""
        if not caches or not all(cache.shared for cache in caches):
            return None
        lengths = [cache.length for cache in caches]
        return cls(list(caches), lengths, [min(sinks, n) for n in lengths], any(c.merged for c in caches))

    def padded(self, slots: int, room: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The views left-padded to `slots` >= every length, world b's at [slots - lengths[b], slots), then `room`
        rows for the caller to fill: key, value (B, slots + room, h, d), pos (B, slots + room, 3) (padding and room
        hold the row's first slot: finite), bias (B, slots + room) float32, -inf on the padding, log m on the slots
        and 0 on the room, or None where nothing is padded or merged."""
        device = self.caches[0].key.device
        lengths = to_device(self.lengths, device)
        index = torch.arange(slots + room, device=device)
        offset = index - (slots - lengths[:, None])  # (B, slots + room): the slot each row holds; < 0 on padding
        source = torch.where((offset >= 0) & (index < slots), offset, 0)
        biased = self.merged or min(self.lengths) < slots
        names = ("key", "value", "pos", "count") if biased else ("key", "value", "pos")
        key, value, pos, *count = read_slots(self.caches, source, *names)
        bias = None
        if biased:
            bias = count[0].log().masked_fill(offset < 0, -math.inf).masked_fill(index >= slots, 0)
        return key, value, pos, bias


class LayerCache:
    """Fixed-capacity slot buffers of one layer of one world, row `row` of a `SlotPool` (a pool of its own unless a
    `CachePool` gave it one); slots [0, length) are in use. The buffers are views of the pool's row (set again when
    a cache of its own grows)."""

    def __init__(self, pool: SlotPool, row: int = 0, shared: bool = False) -> None:
        self.pool = pool
        self.row = row
        self.shared = shared  # a row of a `CachePool`'s segment, which other worlds' caches share: it cannot grow
        self.bind()
        self.length = 0
        self.merged = False  # True once any slot holds more than one token: attention then needs the log m bias
        self.merges = 0  # tokens merged into an existing slot, since creation
        self.evictions = 0  # slots evicted to make room, since creation
        self.recent: torch.Tensor | None = None  # slots the latest merged frame's tokens went to (tempcache's state)

    @classmethod
    def alone(cls, heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device) -> LayerCache:
        """A layer cache in a pool of its own."""
        return cls(SlotPool(1, capacity, heads, head_dim, dtype, device))

    def bind(self, pool: SlotPool | None = None) -> None:
        """Point the buffers at this row of `pool` (by default the one it is in)."""
        self.pool = pool if pool is not None else self.pool
        self.key, self.value, self.pos, self.count, self.frame = (
            getattr(self.pool, name)[self.row] for name in SlotPool.FIELDS
        )

    @property
    def capacity(self) -> int:
        return self.key.shape[0]

    def reserve(self, slots: int, grow: int) -> None:
        """Make room for `slots` slots in total, growing by at least `grow` slots at once (one copy per growth).
        Only a cache in a pool of its own can grow: the rows of a shared pool are bounded."""
        if slots <= self.capacity:
            return
        if self.shared:
            raise RuntimeError(f"a pooled cache holds {self.capacity} slots and cannot grow to {slots}")
        self.bind(self.pool.resized(1, max(slots, self.capacity + grow), keep=self.length))

    def write(self, start: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Write N fresh slots (count 1) at [start, start + N): key, value (N, h, d); pos (N, 3)."""
        end = start + key.shape[0]
        assert end <= self.capacity, f"write past capacity ({end} > {self.capacity})"
        self.key[start:end] = key
        self.value[start:end] = value
        self.pos[start:end] = pos
        self.count[start:end] = 1.0
        self.frame[start:end] = pos[:, 0].to(torch.int64)
        self.length = max(self.length, end)

    def view(self, sinks: int = 0) -> KVView:
        """All slots in use; the first `sinks` of them are sink slots."""
        n = self.length
        bias = self.count[:n].log() if self.merged else None
        return KVView(self.key[:n], self.value[:n], self.pos[:n], bias, min(sinks, n))

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's buffers (its row of the pool, not only the slots in use)."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.pos, self.count, self.frame))


class WorldCache:
    """The KV cache of one world: one `LayerCache` per transformer block."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers

    @classmethod
    def alone(
        cls, depth: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> WorldCache:
        """A cache whose layers are pools of their own: what an unbounded (growing) policy needs."""
        return cls([LayerCache.alone(heads, head_dim, capacity, dtype, device) for _ in range(depth)])

    def tokens_per_layer(self) -> list[int]:
        return [layer.length for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def stats(self) -> dict[str, list]:
        """Per layer: slots in use, merges and evictions so far, mean tokens per slot."""
        return {
            "slots": self.tokens_per_layer(),
            "merges": [layer.merges for layer in self.layers],
            "evictions": [layer.evictions for layer in self.layers],
            "mean_count": [
                round(float(layer.count[: layer.length].mean()), 4) if layer.length else 0.0 for layer in self.layers
            ],
        }


def by_pool(caches: Sequence[LayerCache]) -> list[list[int]]:
    """The indices of `caches` grouped by the pool they are rows of, each group in order, groups in order of their
    first cache: what batched cache work (one indexed operation per pool) runs over."""
    groups: dict[int, list[int]] = {}
    for b, cache in enumerate(caches):
        groups.setdefault(id(cache.pool), []).append(b)
    return list(groups.values())


def read_slots(caches: Sequence[LayerCache], slots: torch.Tensor, *names: str) -> list[torch.Tensor]:
    """Buffers `names` ("key", "value", "pos", "count", "frame") of each cache at its slots: slots (B, m) -> one
    (B, m, ...) tensor per name, one indexed read per name and buffer the caches are rows of, in the caches' order."""
    device = slots.device
    groups = by_pool(caches)
    parts = []
    for group in groups:
        rows = to_device([caches[b].row for b in group], device)[:, None]
        taken = slots if len(groups) == 1 else slots[to_device(group, device)]
        pool = caches[group[0]].pool
        parts.append([getattr(pool, name)[rows, taken] for name in names])
    if len(parts) == 1:
        return parts[0]
    order = [b for group in groups for b in group]  # the worlds as the parts hold them
    back = to_device(sorted(range(len(order)), key=order.__getitem__), device)
    return [torch.cat(tensors).index_select(0, back) for tensors in zip(*parts)]


def by_buffer(
    caches: Sequence[LayerCache], worlds: torch.Tensor
) -> list[tuple[SlotPool, torch.Tensor, torch.Tensor | None]]:
    """For entries that belong to worlds `worlds` (u,) (host; indices into `caches`): per buffer the caches are rows
    of, that buffer, the rows of its entries and which entries they are (u',), or None for all of them (on the
    buffers' device): what indexed writes to several buffers run over."""
    device = caches[0].key.device
    rows = torch.tensor([cache.row for cache in caches])
    groups = by_pool(caches)
    if len(groups) == 1:
        return [(caches[0].pool, to_device(rows[worlds], device), None)]
    out = []
    for group in groups:
        picked = torch.isin(worlds, torch.tensor(group)).nonzero().squeeze(1)
        if len(picked):
            out.append((caches[group[0]].pool, to_device(rows[worlds[picked]], device), to_device(picked, device)))
    return out


def write_blocks(
    caches: Sequence[LayerCache], starts: Sequence[int], key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor
) -> None:
    """Write world b's N tokens (key, value (B, N, h, d); pos (B, N, 3)) as fresh slots [starts[b], starts[b] + N)
    of caches[b], for caches that are rows of one pool: one indexed write per buffer for them all."""
    n, device = key.shape[1], key.device
    assert max(starts) + n <= caches[0].capacity, f"write past capacity ({max(starts) + n} > {caches[0].capacity})"
    rows = to_device([cache.row for cache in caches], device).repeat_interleave(n)
    slots = (to_device(list(starts), device)[:, None] + torch.arange(n, device=device)).flatten()
    caches[0].pool.write_at(rows, slots, key.flatten(0, 1), value.flatten(0, 1), pos.flatten(0, 1))
    for cache, start in zip(caches, starts):
        cache.length = max(cache.length, start + n)


class CachePool:
    """The bounded caches of many worlds, as rows of a few buffers per layer: `new_cache` hands out a free row (the
    first, in the oldest segment, cleared), which returns to the pool when its `WorldCache` is garbage-collected.
    With every row taken the pool adds a segment (one `SlotPool` per layer) of twice the rows of the last, from
    `FIRST_ROWS`, but of no more than `SEGMENT_BYTES` (at least one row): nothing is ever copied or moved, so
    growing needs only the new segment's memory (out of memory, nothing has changed), and a model whose world caches
    are large gets a segment per world. The last segments are given back once every row of them is free (the first
    is kept), so the pool holds at most about twice the bytes of the worlds it holds, and at least the first
    segment. Worlds of one segment attend and commit in a few batched operations per layer, whatever their number
    (engine/attention.py, engine/tempcache.py); `reserve` makes room for many worlds made together in one segment
    instead of several doubling ones."""

    FIRST_ROWS = 8
    SEGMENT_BYTES = 1 << 30

    def __init__(
        self, depth: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.depth, self.heads, self.head_dim, self.capacity = depth, heads, head_dim, capacity
        self.dtype, self.device = dtype, device
        self.segments: list[list[SlotPool]] = []  # per segment, one SlotPool per layer
        self._free: list[tuple[int, int]] = []  # a heap of free (segment, row)
        # a cache may be collected on any thread, and by the cycle collector inside this pool's own locked code
        self._lock = threading.RLock()

    @property
    def rows(self) -> int:
        with self._lock:
            return sum(layers[0].rows for layers in self.segments)

    @property
    def nbytes(self) -> int:
        """Bytes of every segment's buffers: every row, taken or free."""
        with self._lock:
            return sum(layer.rows * layer.row_bytes for layers in self.segments for layer in layers)

    def new_cache(self) -> WorldCache:
        with self._lock:
            while not self._free:  # (a collection while it adds a segment could give that segment back at once)
                self._add_segment()
            segment, row = heapq.heappop(self._free)
            layers = self.segments[segment]
        for layer in layers:
            layer.clear(row)
        cache = WorldCache([LayerCache(layer, row, shared=True) for layer in layers])
        weakref.finalize(cache, self._release, (segment, row))
        return cache

    def reserve(self, count: int) -> None:
        """Make sure `count` rows are free: where fewer are, add one segment of at least the rows missing (still of
        no more than `SEGMENT_BYTES`, at least one row; then more segments), so that worlds made together share as
        few segments as memory allows."""
        with self._lock:
            while len(self._free) < count:
                self._add_segment(least=count - len(self._free))

    def _add_segment(self, least: int = 1) -> None:
        world_bytes = (
            self.depth * SlotPool(0, self.capacity, self.heads, self.head_dim, self.dtype, self.device).row_bytes
        )
        rows = max(least, 2 * self.segments[-1][0].rows if self.segments else self.FIRST_ROWS)
        rows = max(1, min(rows, self.SEGMENT_BYTES // world_bytes))
        layers = [
            SlotPool(rows, self.capacity, self.heads, self.head_dim, self.dtype, self.device) for _ in range(self.depth)
        ]
        self.segments.append(layers)
        for row in range(rows):
            heapq.heappush(self._free, (len(self.segments) - 1, row))

    def _release(self, place: tuple[int, int]) -> None:
        with self._lock:
            heapq.heappush(self._free, place)
            # the last segments, while every row of them is free: no cache refers to them any more
            while len(self.segments) > 1:
                last = len(self.segments) - 1
                if sum(segment == last for segment, _ in self._free) < self.segments[last][0].rows:
                    break
                self.segments.pop()
                self._free = [free for free in self._free if free[0] != last]
                heapq.heapify(self._free)
