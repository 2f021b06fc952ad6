"""TempCache: exact for duplicate keys (Lemma 5.1), equal to dense without merging, bounded without redundancy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import IDLE, WorldEngine
from engine.ann import make_ann
from engine.attention import attend
from engine.kv_cache import CachePool, LayerCache
from engine.rope import Rope3D
from engine.tempcache import TempCachePolicy
from tests.conftest import tiny_config

H, D, N = 2, 16, 8  # heads, head dim, tokens per frame of these cache-level tests


def _policy(
    capacity: int, tau: float = 0.9, sink_frames: int = 1, exact_frames: int = 0, ann: str = "exact"
) -> TempCachePolicy:
    """exact_frames 0 unless a test is about them: each frame is merged as it is written."""
    config = tiny_config(
        model={"frame_height": 16, "frame_width": 32, "heads": 2, "dim": 32, "patch_size": 2},
        cache={
            "policy": "tempcache",
            "max_slots": capacity,
            "tau": tau,
            "sink_frames": sink_frames,
            "exact_frames": exact_frames,
        },
    )
    sizes = config.sizes()
    assert sizes.tokens_per_frame == N
    return TempCachePolicy(config.cache, sizes, make_ann(ann))


def _cache(policy: TempCachePolicy) -> LayerCache:
    return LayerCache.alone(H, D, policy.capacity, torch.float32, torch.device("cpu"))


def _positions(frame: int) -> torch.Tensor:
    pos = torch.zeros(N, 3, dtype=torch.int32)
    pos[:, 0] = frame
    pos[:, 2] = torch.arange(N)
    return pos


@pytest.mark.parametrize("exact", [0, 2])
def test_duplicate_keys_merge_and_attention_equals_dense(exact: int) -> None:
    """Lemma 5.1: slots with mean values and a log m bias attend exactly like the duplicates they replace. With
    exact frames, the latest `exact` frames stay as they are and the ones before them merge."""
    torch.manual_seed(0)
    policy, rope = _policy(capacity=64, exact_frames=exact), Rope3D(D, 10000.0)
    cache = _cache(policy)
    keys, values, positions = [], [], []
    base = torch.randn(N, H, D)
    for frame in range(6):
        key = torch.randn(N, H, D) if frame == 0 else base  # frames 2.. repeat frame 1's keys exactly
        value = torch.randn(N, H, D)
        pos = _positions(0)  # one position for every frame, so duplicate keys are duplicates after rotation too
        policy.commit(cache, key, value, pos, first_frame=frame)
        keys.append(key), values.append(value), positions.append(pos)

    merged = slice((1 + exact) * N, (2 + exact) * N)  # after the sinks and the ring of exact frames
    assert cache.length == (2 + exact) * N and cache.merges == (4 - exact) * N
    assert cache.count[: (1 + exact) * N].tolist() == [1.0] * (1 + exact) * N
    assert cache.count[merged].tolist() == [5.0 - exact] * N
    torch.testing.assert_close(cache.value[merged], torch.stack(values[1 : 6 - exact]).mean(0))
    for frame in range(6 - exact, 6):  # frame f sits in ring block (f - 1) % exact
        block = slice((1 + (frame - 1) % exact) * N, (2 + (frame - 1) % exact) * N)
        assert torch.equal(cache.value[block], values[frame]) and torch.equal(cache.key[block], keys[frame])

    q = torch.randn(5, H, D)
    q_pos = torch.zeros(5, 3, dtype=torch.int32)
    k_all, p_all = torch.cat(keys), torch.cat(positions)
    dense = attend(rope.rotate(q, q_pos), rope.rotate(k_all, p_all), torch.cat(values), None)
    view = policy.view(cache)
    merged = attend(rope.rotate(q, q_pos), rope.rotate(view.key, view.pos), view.value, view.bias)
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=0)


def test_merge_keeps_newest_key_and_position_and_one_token_per_slot() -> None:
    torch.manual_seed(1)
    policy = _policy(capacity=64)
    cache = _cache(policy)
    policy.commit(cache, torch.randn(N, H, D), torch.randn(N, H, D), _positions(0), first_frame=0)  # sink
    first = torch.randn(N, H, D)
    policy.commit(cache, first, torch.randn(N, H, D), _positions(1), first_frame=1)
    # frame 2: token 0 and token 1 both near-copies of frame 1's token 0; the closer one merges, the other appends
    nxt = torch.randn(N, H, D)
    nxt[0] = first[0] + 0.01 * torch.randn(H, D)
    nxt[1] = first[0] + 0.05 * torch.randn(H, D)
    policy.commit(cache, nxt, torch.randn(N, H, D), _positions(2), first_frame=2)
    slot = N  # frame 1's token 0 went to the first slot after the sinks
    assert cache.merges == 1 and cache.count[slot] == 2
    assert torch.equal(cache.key[slot], nxt[0]) and torch.equal(cache.pos[slot], _positions(2)[0])
    assert cache.length == 2 * N + (N - 1)


def test_equally_similar_tokens_leave_the_slot_to_the_first() -> None:
    policy = _policy(capacity=64)
    cache = _cache(policy)
    policy.commit(cache, torch.randn(N, H, D), torch.randn(N, H, D), _positions(0), first_frame=0)  # sink
    first, first_value = torch.randn(N, H, D), torch.randn(N, H, D)
    policy.commit(cache, first, first_value, _positions(1), first_frame=1)
    nxt, value = torch.randn(N, H, D), torch.randn(N, H, D)
    nxt[2] = nxt[5] = first[3]  # two copies of one key: the same cosine with its slot
    policy.commit(cache, nxt, value, _positions(2), first_frame=2)
    slot = N + 3  # frame 1's token 3
    assert cache.merges == 1 and cache.recent[2] == slot and cache.recent[5] != slot
    torch.testing.assert_close(cache.value[slot], (first_value[3] + value[2]) / 2)


@pytest.mark.parametrize("exact", [0, 2])
@pytest.mark.parametrize("ann", ["exact", "torch"])
@pytest.mark.parametrize("pools", ["one pool", "two segments", "two pools"])
def test_worlds_committed_together_end_as_each_committed_alone(pools: str, ann: str, exact: int, monkeypatch) -> None:
    """A commit pass hands every world's frame over at once (`commit_worlds`: one batched search, one set of
    decisions, indexed writes per buffer): each cache ends slot for slot as if its world had committed alone,
    whether the world is writing its sinks, filling the ring of exact frames, merging or evicting, and whether the
    worlds are rows of one buffer (as an engine's few first worlds are), of two segments of a pool, or of two
    pools."""
    monkeypatch.setattr(CachePool, "FIRST_ROWS", 2 if pools == "two segments" else 8)
    torch.manual_seed(5)
    policy = _policy(capacity=(5 + exact) * N, exact_frames=exact, ann=ann)
    starts = [0, 1, 4, 9]  # world b writes its first frame in step starts[b]: the worlds stay at different stages
    shared = [CachePool(1, H, D, policy.capacity, torch.float32, torch.device("cpu")) for _ in range(2)]
    owners = [shared[b % 2 if pools == "two pools" else 0].new_cache() for b in range(len(starts))]
    assert len({id(owner.layers[0].pool) for owner in owners}) == (1 if pools == "one pool" else 2)
    together = [owner.layers[0] for owner in owners]  # a row is the pool's while its WorldCache lives
    alone = [_cache(policy) for _ in starts]
    static = [torch.randn(N // 2, H, D) for _ in starts]  # each world's own unchanging content: merges
    for step in range(24):
        worlds = [b for b, start in enumerate(starts) if step >= start]
        frames = [step - starts[b] for b in worlds]
        keys = torch.stack(
            [torch.cat((static[b] + 0.01 * torch.randn(N // 2, H, D), torch.randn(N // 2, H, D))) for b in worlds]
        )
        values = torch.randn(len(worlds), N, H, D)
        pos = torch.stack([_positions(f) for f in frames])
        policy.commit_worlds([together[b] for b in worlds], keys, values, pos, frames)
        for i, (b, frame) in enumerate(zip(worlds, frames)):
            policy.commit(alone[b], keys[i], values[i], pos[i], first_frame=frame)
        for a, b in zip(together, alone):
            assert (a.length, a.merges, a.evictions) == (b.length, b.merges, b.evictions)
            for name in ("key", "value", "pos", "count", "frame"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert (a.recent is None) == (b.recent is None) and (a.recent is None or torch.equal(a.recent, b.recent))
    assert all(c.merges > 0 and c.evictions > 0 for c in together[:3])


def test_sinks_are_never_merge_targets() -> None:
    policy = _policy(capacity=64)
    cache = _cache(policy)
    key = torch.randn(N, H, D)
    policy.commit(cache, key, torch.randn(N, H, D), _positions(0), first_frame=0)
    policy.commit(cache, key, torch.randn(N, H, D), _positions(1), first_frame=1)  # identical to the sink frame
    assert cache.merges == 0 and cache.length == 2 * N


def test_exact_frames_delay_merging_and_are_never_evicted() -> None:
    """With exact frames, the merged part of the cache is, slot for slot, what merging each frame as it is written
    holds `exact` frames earlier; the ring holds the latest frames as they were written, through evictions."""
    torch.manual_seed(4)
    exact, capacity = 3, 6 * N  # merged part: the same 6 N slots in both caches
    delayed, at_once = _policy(capacity + exact * N, exact_frames=exact), _policy(capacity)
    late, early = _cache(delayed), _cache(at_once)
    static = torch.randn(N // 2, H, D)
    frames = []
    for frame in range(30):  # half static content (merges), half new every frame (evictions)
        key = torch.cat((static + 0.01 * torch.randn(N // 2, H, D), torch.randn(N - N // 2, H, D)))
        frames.append((key, torch.randn(N, H, D), _positions(frame)))
        delayed.commit(late, *frames[-1], first_frame=frame)
        if frame < exact:
            continue
        at_once.commit(early, *frames[frame - exact], first_frame=frame - exact)
        assert late.length == early.length + exact * N
        compressed = slice((1 + exact) * N, late.length)
        for name in ("key", "value", "pos", "count", "frame"):
            assert torch.equal(getattr(late, name)[compressed], getattr(early, name)[N : early.length]), name
    assert early.evictions > 0 and late.evictions == early.evictions and late.merges == early.merges > 0
    for frame in range(30 - exact, 30):
        block = slice((1 + (frame - 1) % exact) * N, (2 + (frame - 1) % exact) * N)
        key, value, pos = frames[frame]
        assert torch.equal(late.key[block], key) and torch.equal(late.value[block], value)
        assert torch.equal(late.pos[block], pos) and (late.count[block] == 1).all()


def test_no_redundancy_stays_within_the_bound_and_evicts_least_recently_touched() -> None:
    torch.manual_seed(2)
    capacity = 5 * N  # 1 sink frame + 4 frames
    policy = _policy(capacity=capacity)
    cache = _cache(policy)
    allocated = cache.nbytes
    for frame in range(50):  # 10x the capacity of fresh random content: nothing to merge
        policy.commit(cache, torch.randn(N, H, D), torch.randn(N, H, D), _positions(frame), first_frame=frame)
        assert cache.length <= capacity and cache.nbytes == allocated
    assert cache.merges == 0 and cache.evictions == 45 * N
    assert sorted(set(cache.frame[: cache.length].tolist())) == [0, 46, 47, 48, 49]


def test_recently_merged_slots_outlive_older_ones() -> None:
    torch.manual_seed(3)
    policy = _policy(capacity=4 * N)
    cache = _cache(policy)
    policy.commit(cache, torch.randn(N, H, D), torch.randn(N, H, D), _positions(0), first_frame=0)
    static = torch.randn(N // 2, H, D)
    for frame in range(1, 12):
        # half the tokens are static content (merged every frame), half are new every frame
        key = torch.cat((static, torch.randn(N - N // 2, H, D)))
        policy.commit(cache, key, torch.randn(N, H, D), _positions(frame), first_frame=frame)
    live = cache.frame[: cache.length]
    counts = cache.count[: cache.length]
    assert (counts == 11).sum() == N // 2, "the static half lives on in merged slots touched every frame"
    assert (live[counts == 11] == 11).all()
    assert cache.length == 4 * N and cache.evictions > 0


@pytest.mark.parametrize("ann", ["exact", "torch", "faiss"])
def test_without_merging_tempcache_equals_dense(ann: str) -> None:
    dense = WorldEngine.from_config(tiny_config(cache={"policy": "dense"}))
    temp = WorldEngine.from_config(
        tiny_config(cache={"policy": "tempcache", "tau": 1.5, "max_slots": 64 * 16, "ann": ann})
    )
    a, b = dense.new_world(seed=4, prompt="icy cave"), temp.new_world(seed=4, prompt="icy cave")
    for _ in range(8):
        [[fa]], [[fb]] = dense.step([a], [IDLE]), temp.step([b], [IDLE])
        assert np.array_equal(fa, fb)
    assert b.cache.stats()["merges"] == [0, 0] and b.cache.tokens_per_layer() == a.cache.tokens_per_layer()


def test_frames_within_the_exact_ones_are_generated_as_with_a_dense_cache() -> None:
    """However eagerly tempcache merges (tau -1: every best match), a world no older than its exact frames sees
    the dense cache's keys and values; merging each frame as it is written does not."""

    def frames(cache: dict) -> list[np.ndarray]:
        engine = WorldEngine.from_config(tiny_config(cache=cache))
        world = engine.new_world(seed=4, prompt="icy cave")
        return [engine.step([world], [IDLE])[0][0] for _ in range(7)]

    dense = frames({"policy": "dense"})
    eager = {"policy": "tempcache", "tau": -1.0, "max_slots": 64 * 16}
    assert all(np.array_equal(a, b) for a, b in zip(dense, frames({**eager, "exact_frames": 6})))
    assert not all(np.array_equal(a, b) for a, b in zip(dense, frames({**eager, "exact_frames": 0})))


def test_engine_cache_never_exceeds_its_budget() -> None:
    engine = WorldEngine.from_config(
        tiny_config(cache={"policy": "tempcache", "sink_frames": 1, "window_frames": 3, "exact_frames": 1})
    )
    world = engine.new_world(seed=5)
    budget = engine.sizes.capacity_bytes
    assert world.cache.nbytes == budget
    for _ in range(40):  # 10x the capacity
        engine.step([world], [IDLE])
        assert world.cache.nbytes == budget
        assert max(world.cache.tokens_per_layer()) <= engine.sizes.capacity_slots
    stats = world.cache.stats()
    assert all(e > 0 for e in stats["evictions"])
