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

Otherwise the token gets a slot of its own. A slot takes at most one new token per frame (the best-matching one),
so a slot keeps following one piece of content through time. With `exact_frames` 0 every frame is merged as it is
written, the paper's form.

The bound (DESIGN.md decision 1): at most `capacity` slots per layer, allocated once. When a frame's new slots do
not fit, the least recently touched slots are evicted first (smallest frame of their newest member; ties: lowest
slot index); sink slots (the first `sink_frames` frames, which are never merge targets either) and the exact
frames' slots are never evicted. So cache bytes are flat by construction, whatever the content.
"""

from __future__ import annotations

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
        n, sinks = self.sizes.tokens_per_frame, self.config.sink_frames
        for frame, rows in self.frames(key.shape[0], first_frame):
            if frame < sinks:
                cache.write(frame * n, key[rows], value[rows], pos[rows])
                cache.recent = None  # the frame after the sinks has nothing to merge into
            elif self.exact == 0:
                self._compress(cache, key[rows], value[rows], pos[rows])
            else:
                start = (sinks + (frame - sinks) % self.exact) * n  # the ring block of this frame
                if frame - self.exact >= sinks:  # the block holds frame - exact, which leaves the exact frames
                    leaving = [t[start : start + n].clone() for t in (cache.key, cache.value, cache.pos)]
                    self._compress(cache, *leaving)
                cache.write(start, key[rows], value[rows], pos[rows])

    def _compress(self, cache: LayerCache, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge one frame's tokens (key, value (n, h, d); pos (n, 3)) into the slots of the frame merged before it
        (`cache.recent`), or give them slots of their own."""
        n = key.shape[0]
        slot_of = torch.full((n,), -1, dtype=torch.long, device=key.device)  # where each token ends up
        previous = cache.recent  # (n,) slots of the previous frame's tokens, None after the sinks
        if previous is not None:
            merged_tokens, merged_slots = self._match(cache, key, previous)
            if merged_tokens.numel():
                cache.merge(merged_slots, key[merged_tokens], value[merged_tokens], pos[merged_tokens])
                slot_of[merged_tokens] = merged_slots
        fresh = (slot_of < 0).nonzero().squeeze(1)  # host sync: how many slots to allocate is data-dependent
        if fresh.numel():
            slots = self._allocate(cache, fresh.numel(), protect=slot_of[slot_of >= 0])
            cache.write_at(slots, key[fresh], value[fresh], pos[fresh])
            slot_of[fresh] = slots
        cache.recent = slot_of

    def _match(self, cache: LayerCache, key: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens to merge and their target slots, one token per slot, cosine >= tau on pre-rotary keys."""
        n = key.shape[0]
        candidates = cache.key[previous].reshape(previous.shape[0], -1)  # (n_prev, h d)
        queries = key.reshape(n, -1)  # (n, h d)
        _, best = self.ann.top1(queries, candidates)
        # the ANN proposes; the decision uses the exact cosine of the proposed pair
        similarity = torch.nn.functional.cosine_similarity(queries.float(), candidates[best].float(), dim=-1)
        target = previous[best]  # (n,) slot per token
        accept = similarity >= self.tau
        # one token per slot: the most similar one wins, the others get fresh slots
        order = torch.argsort(torch.where(accept, similarity, similarity.new_tensor(-2.0)), descending=True)
        ranked_target = target[order]
        first = torch.ones_like(ranked_target, dtype=torch.bool)
        sorted_target, by_target = torch.sort(ranked_target, stable=True)
        repeat = torch.zeros_like(first)
        repeat[1:] = sorted_target[1:] == sorted_target[:-1]
        first[by_target] = ~repeat
        winners = order[first & accept[order]]
        return winners, target[winners]

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
