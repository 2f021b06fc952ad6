"""TempCache: a KV cache compressed by temporal correspondence, under a hard bound (FAST-AR section 5.2).

The `exact_frames` most recent frames stay exact, one slot per token, in a ring of slot blocks after the sinks: the
next frame's prediction leans on them most (the paper's reason for keeping the last key), and averaging their values
into older ones cost the shipped model 2.7 dB of next-frame PSNR (docs/engine.md). When a frame leaves the ring,
each of its tokens looks up its top-1 match among the slots the frame before it went to (an approximate
nearest-neighbour search on pre-rotary keys, all heads of the layer concatenated: one slot layout per layer,
DESIGN.md decision 3). When the cosine similarity is at least `tau`, the token is merged into that slot:

    key, position <- the new token's (the "last key" representative)
    value         <- (m * value + v_new) / (m + 1)      running mean of the members' values
    m             <- m + 1                              attention adds log m to the slot's logit (Lemma 5.1)

Otherwise the token gets a slot of its own. A slot takes at most one new token per frame (the best-matching one; of
equally good ones, the first), so a slot keeps following one piece of content through time. A commit pass merges
the frames of all its worlds together: one batched search, one set of decisions, and the writes of every world in a
few indexed writes per buffer their caches are rows of (engine/kv_cache.py, `CachePool`).
With `exact_frames` 0 every frame is merged as it is written, the paper's form.

The bound (DESIGN.md decision 1): at most `capacity` slots per layer, allocated once. When a frame's new slots do
not fit, the least recently touched slots are evicted first (smallest frame of their newest member; ties: lowest
slot index); sink slots (the first `sink_frames` frames, which are never merge targets either) and the exact
frames' slots are never evicted. So cache bytes are flat by construction, whatever the content.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.ann import AnnBackend
from engine.config import CacheConfig, Sizes
from engine.kv_cache import LayerCache, by_buffer, by_pool, read_slots, write_blocks
from engine.policies import CachePolicy
from engine.transfer import to_device


class TempCachePolicy(CachePolicy):
    name = "tempcache"

    def __init__(self, config: CacheConfig, sizes: Sizes, ann: AnnBackend) -> None:
        super().__init__(config, sizes)
        self.ann = ann
        self.tau = config.tau
        self.exact = config.exact_frames
        # sinks, then the ring of exact frames: never merge targets, never evicted
        self.fixed_slots = (config.sink_frames + config.exact_frames) * sizes.tokens_per_frame

    def commit_worlds(
        self,
        caches: Sequence[LayerCache],
        key: torch.Tensor,
        value: torch.Tensor,
        pos: torch.Tensor,
        first_frames: Sequence[int],
    ) -> None:
        """Frame by frame, every world's tokens that are merged now (a frame leaving the exact ring, or every frame
        with `exact_frames` 0) are matched in one batched search and one set of decisions, and the worlds' merges,
        fresh slots and ring writes go to the buffers their caches are rows of in a few indexed writes per buffer
        (`_merge_frames`, `write_blocks`)."""
        n, sinks = self.sizes.tokens_per_frame, self.config.sink_frames
        for i in range(key.shape[1] // n):
            tokens = slice(i * n, (i + 1) * n)
            merging, leaving, writes = [], [], []  # worlds that merge (and the block of those whose frame leaves
            for b, (cache, first) in enumerate(zip(caches, first_frames)):  # the ring); (world, block) to write
                frame = first + i
                if frame < sinks:
                    writes.append((b, frame * n))
                    cache.recent = None  # the frame after the sinks has nothing to merge into
                elif self.exact == 0:
                    merging.append(b)
                else:
                    start = (sinks + (frame - sinks) % self.exact) * n  # the ring block of this frame
                    if frame - self.exact >= sinks:  # the block holds frame - exact, which leaves the exact frames
                        merging.append(b)
                        leaving.append(start)
                    writes.append((b, start))
            if merging:
                worlds, merged = to_device(merging, key.device), [caches[b] for b in merging]
                if self.exact == 0:
                    frames = [t[worlds, tokens] for t in (key, value, pos)]
                else:  # read before this frame's writes overwrite the ring block
                    slots = to_device(leaving, key.device)[:, None] + torch.arange(n, device=key.device)
                    frames = read_slots(merged, slots, "key", "value", "pos")
                self._merge_frames(merged, *frames)
            for group in by_pool([caches[b] for b, _ in writes]):
                blocks = [writes[j] for j in group]
                index = to_device([b for b, _ in blocks], key.device)
                fresh = (t[index, tokens] for t in (key, value, pos))
                write_blocks([caches[b] for b, _ in blocks], [start for _, start in blocks], *fresh)

    def _merge_frames(
        self, caches: Sequence[LayerCache], key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor
    ) -> None:
        """Merge one frame of each world (key, value (B, n, h, d); pos (B, n, 3); world b's into caches[b]) into the
        slots of the frame that world merged before it (`cache.recent`), or give its tokens slots of their own
        (`_allocate`)."""
        B, n = key.shape[:2]
        device = key.device
        merged = torch.zeros(B, n, dtype=torch.bool, device=device)  # token -> merged into target[b, token]
        target = torch.zeros(B, n, dtype=torch.long, device=device)
        matching = [b for b, cache in enumerate(caches) if cache.recent is not None]  # none right after the sinks
        if matching:
            worlds = to_device(matching, device)
            previous = torch.stack([caches[b].recent for b in matching])  # (B', n) slots of the previous frames
            [candidates] = read_slots([caches[b] for b in matching], previous, "key")  # (B', n, h, d)
            merged[worlds], target[worlds] = self._match(key[worlds], candidates, previous, caches[0].capacity)
        # one transfer of the decisions for the whole batch (a host sync on a GPU); the writes are indexed from it
        merged_host = merged.cpu()
        into = merged_host.nonzero()  # (world, token) pairs that merge, world-major
        fresh = (~merged_host).nonzero()  # the others, world-major, tokens in order
        merges = torch.bincount(into[:, 0], minlength=B).tolist()
        if len(into):
            b, t = to_device(into, device).unbind(1)
            for pool, rows, picked in by_buffer(caches, into[:, 0]):
                w, k = (b, t) if picked is None else (b[picked], t[picked])
                pool.merge(rows, target[w, k], key[w, k], value[w, k], pos[w, k])
        slot_of = torch.where(merged, target, -1)  # (B, n) the slot each token ends up in
        if len(fresh):
            b, t = to_device(fresh, device).unbind(1)
            slots = self._allocate(caches, n - merged_host.sum(1), merged, target)
            for pool, rows, picked in by_buffer(caches, fresh[:, 0]):
                w, k, s = (b, t, slots) if picked is None else (b[picked], t[picked], slots[picked])
                pool.write_at(rows, s, key[w, k], value[w, k], pos[w, k])
            slot_of[b, t] = slots
        for b, cache in enumerate(caches):
            if merges[b]:
                cache.merged = True
                cache.merges += merges[b]
            cache.recent = slot_of[b]

    def _allocate(
        self, caches: Sequence[LayerCache], counts: torch.Tensor, merged: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Slots for `counts[b]` new tokens of each world, world-major: its unused slots first, in order, then its
        least recently touched ones (smallest frame of their newest member; among equals the lowest index), never a
        sink or exact frame's slot, nor one this frame merged into (`merged`, `target` (B, n))."""
        device = merged.device
        B, C = merged.shape[0], caches[0].capacity
        never = torch.iinfo(torch.int64).max
        lengths = to_device([cache.length for cache in caches], device)
        every = torch.arange(C, device=device)
        # (B, C + 1): the frame of each slot's newest member, and a column that the unmerged tokens mark below
        [frames] = read_slots(caches, every.expand(B, C), "frame")
        age = torch.cat((frames, lengths.new_zeros(B, 1)), dim=1)
        age[:, :C][every >= lengths[:, None]] = -1  # unused: first, in slot order
        age[:, : self.fixed_slots] = never  # sinks and exact frames are never evicted
        age.scatter_(1, torch.where(merged, target, C), never)  # nor the slots this frame merged into
        order = torch.sort(age[:, :C], dim=1, stable=True).indices  # (B, C)
        take = []
        for b, (cache, count) in enumerate(zip(caches, counts.tolist())):
            free = min(count, cache.capacity - cache.length)
            need = count - free
            protected = merged.shape[1] - count  # the tokens merged, one slot each
            if need > cache.length - min(self.fixed_slots, cache.length) - protected:
                # impossible with the capacity check in WorldConfig
                raise RuntimeError(f"tempcache cannot place {need} new slots in a cache of {cache.capacity}")
            cache.length += free
            cache.evictions += need
            take.extend(range(b * C, b * C + count))  # the world's first `count` slots in that order
        return order.flatten()[to_device(take, device)]

    def _match(
        self, key: torch.Tensor, candidates: torch.Tensor, previous: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of each world's tokens merge, and into which slot: key (B, n, h, d) the new tokens, candidates
        (B, m, h, d) the keys of the slots `previous` (B, m) that the world's previous frame went to, every slot
        below `capacity` -> merged (B, n) bool, target (B, n) slot. A token merges into the slot its best match went
        to when their exact cosine on pre-rotary keys is at least tau; a slot takes at most one token, the most
        similar one (on a tie, the first)."""
        B, n = key.shape[:2]
        queries, candidates = key.reshape(B, n, -1), candidates.reshape(B, candidates.shape[1], -1)  # (B, ., h d)
        _, best = self.ann.top1(queries, candidates)  # (B, n)
        # the ANN proposes; the decision uses the exact cosine of the proposed pair
        proposed = candidates.gather(1, best[..., None].expand(-1, -1, candidates.shape[2]))
        similarity = torch.nn.functional.cosine_similarity(queries.float(), proposed.float(), dim=-1)  # (B, n)
        target = previous.gather(1, best)  # (B, n) slot per token
        accept = similarity >= self.tau
        # one token per slot: per (world, slot), the highest accepted similarity, then the first token that has it
        group = (torch.arange(B, device=key.device)[:, None] * capacity + target).flatten()  # (B n,)
        score = torch.where(accept, similarity, -torch.inf).flatten()
        top = score.new_full((B * capacity,), -torch.inf).scatter_reduce(0, group, score, "amax")
        token = torch.arange(n, device=key.device).repeat(B)
        candidate = torch.where(accept.flatten() & (score == top[group]), token, n)
        first = token.new_full((B * capacity,), n).scatter_reduce(0, group, candidate, "amin")
        merged = (candidate == first[group]) & (candidate < n)
        return merged.view(B, n), target
