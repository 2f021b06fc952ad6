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
the frames of all its worlds together: one batched search and one set of decisions, then each world's writes.
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
from engine.kv_cache import LayerCache
from engine.policies import CachePolicy


class TempCachePolicy(CachePolicy):
    name = "tempcache"

    def __init__(self, config: CacheConfig, sizes: Sizes, ann: AnnBackend) -> None:
        super().__init__(config, sizes)
        self.ann = ann
        self.tau = config.tau
        self.exact = config.exact_frames
        # sinks, then the ring of exact frames: never merge targets, never evicted
        self.fixed_slots = (config.sink_frames + config.exact_frames) * sizes.tokens_per_frame

    def commit(
        self, cache: LayerCache, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, first_frame: int
    ) -> None:
        self.commit_worlds([cache], key[None], value[None], pos[None], [first_frame])

    def commit_worlds(
        self,
        caches: Sequence[LayerCache],
        key: torch.Tensor,
        value: torch.Tensor,
        pos: torch.Tensor,
        first_frames: Sequence[int],
    ) -> None:
        """Frame by frame, every world's tokens that are merged now (a frame leaving the exact ring, or every frame
        with `exact_frames` 0) are matched in one batched search and one set of decisions (`_merge_frames`); each
        world's cache then takes its merges, fresh slots and ring writes."""
        n, sinks = self.sizes.tokens_per_frame, self.config.sink_frames
        for i in range(key.shape[1] // n):
            rows = slice(i * n, (i + 1) * n)
            merging, writes = [], []  # (world, key, value, pos) to merge; (world, start slot) to write in place
            for b, (cache, first) in enumerate(zip(caches, first_frames)):
                frame = first + i
                if frame < sinks:
                    writes.append((b, frame * n))
                    cache.recent = None  # the frame after the sinks has nothing to merge into
                elif self.exact == 0:
                    merging.append((b, key[b, rows], value[b, rows], pos[b, rows]))
                else:
                    start = (sinks + (frame - sinks) % self.exact) * n  # the ring block of this frame
                    if frame - self.exact >= sinks:  # the block holds frame - exact, which leaves the exact frames
                        leaving = (t[start : start + n].clone() for t in (cache.key, cache.value, cache.pos))
                        merging.append((b, *leaving))
                    writes.append((b, start))
            if merging:
                frames = (torch.stack(t) for t in zip(*(m[1:] for m in merging)))  # key, value, pos (B', n, ...)
                self._merge_frames([caches[b] for b, *_ in merging], *frames)
            for b, start in writes:
                caches[b].write(start, key[b, rows], value[b, rows], pos[b, rows])

    def _merge_frames(
        self, caches: Sequence[LayerCache], key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor
    ) -> None:
        """Merge one frame of each world (key, value (B, n, h, d); pos (B, n, 3); world b's into caches[b]) into the
        slots of the frame that world merged before it (`cache.recent`), or give its tokens slots of their own."""
        B, n = key.shape[:2]
        merged = torch.zeros(B, n, dtype=torch.bool, device=key.device)  # token -> merged into target[b, token]
        target = torch.zeros(B, n, dtype=torch.long, device=key.device)
        matching = [b for b, cache in enumerate(caches) if cache.recent is not None]  # none right after the sinks
        if matching:
            previous = torch.stack([caches[b].recent for b in matching])  # (B', n) slots of the previous frames
            candidates = torch.stack([caches[b].key[p] for b, p in zip(matching, previous)])  # (B', n, h, d)
            rows = torch.tensor(matching, device=key.device)
            capacity = max(caches[b].capacity for b in matching)
            merged[rows], target[rows] = self._match(key[rows], candidates, previous, capacity)
        # one transfer of the decisions for the whole batch (a host sync on a GPU), then each world's writes
        merged_host = merged.cpu()
        for b, cache in enumerate(caches):
            slot_of = torch.full((n,), -1, dtype=torch.long, device=key.device)  # where each token ends up
            tokens = merged_host[b].nonzero().squeeze(1).to(key.device)
            if tokens.numel():
                slots = target[b, tokens]
                cache.merge(slots, key[b, tokens], value[b, tokens], pos[b, tokens])
                slot_of[tokens] = slots
            fresh = (~merged_host[b]).nonzero().squeeze(1).to(key.device)
            if fresh.numel():
                slots = self._allocate(cache, fresh.numel(), protect=slot_of[tokens])
                cache.write_at(slots, key[b, fresh], value[b, fresh], pos[b, fresh])
                slot_of[fresh] = slots
            cache.recent = slot_of

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

    def _allocate(self, cache: LayerCache, count: int, protect: torch.Tensor) -> torch.Tensor:
        """`count` slot indices for new tokens: unused slots first, then evict the least recently touched."""
        free = min(count, cache.capacity - cache.length)
        slots = torch.arange(cache.length, cache.length + free, device=cache.key.device)
        need = count - free
        if need:
            never = torch.iinfo(torch.int64).max
            age = cache.frame[: cache.length].clone()  # frame of each slot's newest member
            age[: min(self.fixed_slots, cache.length)] = never  # sinks and exact frames are never evicted
            age[protect] = never  # nor slots this frame just merged into
            if int((age < never).sum()) < need:  # impossible with the capacity check in WorldConfig
                raise RuntimeError(f"tempcache cannot place {need} new slots in a cache of {cache.capacity}")
            # least recently touched first; among equals the lowest slot index (stable sort)
            victims = torch.sort(age, stable=True).indices[:need]
            cache.evict(victims)
            slots = torch.cat((slots, victims))
        cache.length += free
        return slots
