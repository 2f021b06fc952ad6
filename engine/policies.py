"""KV cache policies: which slots exist after each commit, and which slots a query sees.

A policy is chosen once when the engine is built and is shared by every world; it holds no per-world state (that
lives in the `LayerCache` it is handed). Model code never branches on the policy's name.

- `dense`: keeps every token of every frame; the unbounded baseline of the paper. Memory and per-frame attention
  work grow linearly with the frame index, up to `cache.max_slots` where one is set (a training rollout's worlds,
  which live a clip's frames; the server's, so that no world takes the memory every session shares).
- `window`: keeps the first `sink_frames` frames forever plus the `window_frames` most recent frames, in a ring of
  fixed slot blocks: frame f >= S overwrites the block of frame f - W. Capacity (S + W) x tokens per frame is
  allocated once, so memory is flat by construction.
- `tempcache`: merges near-duplicate tokens into counted slots under a hard bound (engine/tempcache.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import CacheConfig, Sizes
from engine.kv_cache import KVView, LayerCache, PooledViews, by_pool, write_blocks
from engine.transfer import to_device


class CacheFull(RuntimeError):
    """A bounded cache cannot take the next chunk (only a bounded `dense` one can fill: the other policies merge or
    evict); `worlds` are the worlds whose caches are full, where the caller knows them."""

    def __init__(self, message: str, worlds: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.worlds = list(worlds)


class CachePolicy:
    """Interface: `capacity` (slots to preallocate), `commit` (store a chunk's tokens), `view` (what queries see)."""

    name: str
    # whether every token written stays in the cache as it was: then several chunks may be written in one pass, each
    # seeing the ones before it exactly as it would after their own passes (engine/attention.py, PrefillAttention)
    keeps_every_token = False

    def __init__(self, config: CacheConfig, sizes: Sizes) -> None:
        self.config = config
        self.sizes = sizes

    @property
    def capacity(self) -> int:
        """Bounded policies allocate their whole capacity once."""
        assert self.sizes.capacity_slots is not None, f"{self.name} has no capacity in the config's sizes"
        return self.sizes.capacity_slots

    @property
    def pooled(self) -> bool:
        """Whether every world's cache is a row of the engine's pool (`CachePool`), allocated whole at `capacity`
        slots per layer: a bounded policy's are; caches that grow are buffers of their own."""
        return self.sizes.capacity_slots is not None

    def commit(
        self, cache: LayerCache, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, first_frame: int
    ) -> None:
        """Store a chunk just generated: keys, values (N, h, d), positions (N, 3), frame by frame from
        `first_frame` (N = frames x tokens_per_frame): `commit_worlds` for one world."""
        self.commit_worlds([cache], key[None], value[None], pos[None], [first_frame])

    def commit_worlds(
        self,
        caches: Sequence[LayerCache],
        key: torch.Tensor,
        value: torch.Tensor,
        pos: torch.Tensor,
        first_frames: Sequence[int],
    ) -> None:
        """Store a chunk for a batch of worlds at once, world b's (key, value (B, N, h, d); pos (B, N, 3)) into
        caches[b] from frame first_frames[b]: what a commit pass hands over, layer by layer. Every policy batches
        its work over the worlds whose caches are rows of one pool (one indexed write per buffer for them all)."""
        raise NotImplementedError

    def full(self, cache: LayerCache, slots: int) -> bool:
        """Whether `slots` more tokens would pass the cache's bound: never, unless the policy appends under one."""
        return False

    def ensure_room(self, caches: Sequence[LayerCache], slots: int, worlds: Sequence[object] = ()) -> None:
        """Raise `CacheFull` (naming `worlds[b]` for each full caches[b], where given) unless every cache can take
        `slots` more tokens: what a commit checks before it writes anything."""
        full = [b for b, cache in enumerate(caches) if self.full(cache, slots)]
        if full:
            cache = caches[full[0]]
            bound = cache.capacity if self.sizes.capacity_slots is None else self.sizes.capacity_slots
            raise CacheFull(
                f"a {self.name} cache bounded at {bound} slots per layer (cache.max_slots) is full: it "
                f"holds {cache.length} and cannot take {slots} more",
                [worlds[b] for b in full] if worlds else (),
            )

    def view(self, cache: LayerCache) -> KVView:
        """Every slot in use; every policy stores the sink frames' tokens first and never moves them."""
        return cache.view(sinks=self.config.sink_frames * self.sizes.tokens_per_frame)

    def view_worlds(self, caches: Sequence[LayerCache]) -> PooledViews | None:
        """`view` of several worlds read in one gather per buffer, where their caches are rows of a pool (None where
        they are not: then each is viewed alone). A policy that overrides `view` overrides this too."""
        return PooledViews.of(list(caches), sinks=self.config.sink_frames * self.sizes.tokens_per_frame)


class DensePolicy(CachePolicy):
    """Appends every chunk; each world's buffers are its own and grow `grow_frames` at a time, without bound unless
    `cache.max_slots` sets one, and a commit that would pass the bound fails before it writes anything (`CacheFull`).
    A bound within one growth (`max_slots` <= `grow_frames` x tokens per frame, what a cache's first growth would
    allocate anyway) is allocated whole, every world's cache a row of the engine's pool: one indexed write per buffer
    for a batch's worlds, as a training rollout's short-lived worlds of one age write."""

    name = "dense"
    keeps_every_token = True

    @property
    def capacity(self) -> int:
        """Slots allocated for a new world: the bound, where it is pooled, else a first growth."""
        return self.sizes.capacity_slots if self.pooled else self.sizes.grow_slots

    @property
    def pooled(self) -> bool:
        bound = self.sizes.capacity_slots
        return bound is not None and bound <= self.sizes.grow_slots

    def full(self, cache: LayerCache, slots: int) -> bool:
        bound = self.sizes.capacity_slots
        return bound is not None and cache.length + slots > bound

    def commit_worlds(
        self,
        caches: Sequence[LayerCache],
        key: torch.Tensor,
        value: torch.Tensor,
        pos: torch.Tensor,
        first_frames: Sequence[int],
    ) -> None:
        n = key.shape[1]
        self.ensure_room(caches, n)
        for worlds in by_pool(caches):
            group = [caches[b] for b in worlds]
            if not group[0].shared:  # a cache of its own: it grows, by a whole growth where the bound leaves room
                [b] = worlds
                cache, grow = group[0], self.sizes.grow_slots
                if self.sizes.capacity_slots is not None:
                    grow = min(grow, self.sizes.capacity_slots - cache.capacity)
                cache.reserve(cache.length + n, grow)
                cache.write(cache.length, key[b], value[b], pos[b])
                continue
            index = to_device(worlds, key.device)
            tokens = (t.index_select(0, index) for t in (key, value, pos))
            write_blocks(group, [c.length for c in group], *tokens)


class WindowPolicy(CachePolicy):
    name = "window"

    def commit_worlds(
        self,
        caches: Sequence[LayerCache],
        key: torch.Tensor,
        value: torch.Tensor,
        pos: torch.Tensor,
        first_frames: Sequence[int],
    ) -> None:
        """Frame by frame, every world's frame into its block of the ring: one indexed write per buffer (segment of
        the pool) the worlds' caches are rows of."""
        n = self.sizes.tokens_per_frame
        sinks, window = self.config.sink_frames, self.config.window_frames
        for worlds in by_pool(caches):
            index = to_device(worlds, key.device)
            for i in range(key.shape[1] // n):
                frames = [first_frames[b] + i for b in worlds]
                blocks = [f if f < sinks else sinks + (f - sinks) % window for f in frames]
                tokens = (t[index, i * n : (i + 1) * n] for t in (key, value, pos))
                write_blocks([caches[b] for b in worlds], [block * n for block in blocks], *tokens)


def make_policy(config: CacheConfig, sizes: Sizes) -> CachePolicy:
    if config.policy == "tempcache":  # imported here: engine.tempcache builds on CachePolicy from this module
        from engine.ann import make_ann
        from engine.tempcache import TempCachePolicy

        return TempCachePolicy(config, sizes, make_ann(config.ann))
    return {"dense": DensePolicy, "window": WindowPolicy}[config.policy](config, sizes)
