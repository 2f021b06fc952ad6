"""Cache policies: `window` is bounded by construction, `dense` grows by whole chunks, never per frame, or is bounded
where its caller knows how long its worlds live."""

from __future__ import annotations

import pytest
import torch

from engine import IDLE, CacheFull, WorldEngine
from engine.kv_cache import CachePool, LayerCache
from engine.policies import make_policy
from tests.conftest import tiny_config


def _engine(policy: str, **cache) -> WorldEngine:
    return WorldEngine.from_config(tiny_config(cache={"policy": policy, **cache}))


def test_window_bytes_after_ten_times_capacity_equal_bytes_at_capacity() -> None:
    engine = _engine("window", sink_frames=1, window_frames=3)
    world = engine.new_world(seed=1)
    capacity_frames = 1 + 3
    for _ in range(capacity_frames):
        engine.step([world], [IDLE])
    engine.flush([world])
    at_capacity = (world.cache.nbytes, world.cache.tokens_per_layer())
    assert at_capacity[0] == engine.sizes.capacity_bytes
    for _ in range(9 * capacity_frames):
        engine.step([world], [IDLE])
        assert world.cache.nbytes == at_capacity[0]
    engine.flush([world])
    assert (world.cache.nbytes, world.cache.tokens_per_layer()) == at_capacity


def test_window_keeps_the_sinks_and_the_most_recent_frames() -> None:
    engine = _engine("window", sink_frames=2, window_frames=3)
    world = engine.new_world(seed=1)
    for _ in range(17):
        engine.step([world], [IDLE])
    engine.flush([world])
    n = engine.sizes.tokens_per_frame
    for layer in world.cache.layers:
        frames = sorted(set(layer.pos[: layer.length, 0].tolist()))
        assert frames == [0, 1, 14, 15, 16]
        assert layer.length == 5 * n
        assert torch.equal(layer.frame[: layer.length], layer.pos[: layer.length, 0].long())


def test_dense_grows_with_every_frame_and_reallocates_only_in_chunks() -> None:
    engine = _engine("dense", grow_frames=4)
    world = engine.new_world(seed=1)
    n = engine.sizes.tokens_per_frame
    capacities = []
    for frame in range(1, 11):
        engine.step([world], [IDLE])
        engine.flush([world])
        assert world.cache.tokens_per_layer() == [frame * n] * 2
        capacities.append(world.cache.layers[0].capacity)
    assert capacities == [4 * n] * 4 + [8 * n] * 4 + [12 * n] * 2
    assert world.cache.nbytes == 12 * n * engine.sizes.slot_bytes * 2


def test_window_equals_dense_until_the_window_is_full() -> None:
    dense, window = _engine("dense"), _engine("window", sink_frames=1, window_frames=3)
    a, b = dense.new_world(seed=3), window.new_world(seed=3)
    for _ in range(1 + 3 + 1):  # frame S + W still sees every earlier frame; its commit evicts frame 1
        [fa], [fb] = dense.step([a], [IDLE]), window.step([b], [IDLE])
        assert all((x == y).all() for x, y in zip(fa, fb))
    [fa], [fb] = dense.step([a], [IDLE]), window.step([b], [IDLE])
    assert not all((x == y).all() for x, y in zip(fa, fb)), "after eviction the two must differ"


def test_window_worlds_of_one_pool_committed_together_end_as_each_alone() -> None:
    """`commit_worlds` writes every world's frames into its ring blocks in one indexed write per pool and frame:
    worlds at different frames, chunks of two frames, through the ring's wrap, the same slots as world by world."""
    config = tiny_config(cache={"policy": "window", "sink_frames": 1, "window_frames": 3})
    policy = make_policy(config.cache, config.sizes())
    m, n = config.model, config.sizes().tokens_per_frame
    pool = CachePool(1, m.heads, m.head_dim, policy.capacity, torch.float32, torch.device("cpu"))
    owners = [pool.new_cache() for _ in range(3)]
    together = [owner.layers[0] for owner in owners]
    alone = [LayerCache.alone(m.heads, m.head_dim, policy.capacity, torch.float32, torch.device("cpu")) for _ in owners]
    firsts = [0, 2, 6]  # each world's next frame
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        key, value = (torch.randn(3, 2 * n, m.heads, m.head_dim, generator=generator) for _ in range(2))
        pos = torch.zeros(3, 2 * n, 3, dtype=torch.int32)
        for b, first in enumerate(firsts):
            pos[b, :, 0] = torch.arange(first, first + 2).repeat_interleave(n)
        policy.commit_worlds(together, key, value, pos, firsts)
        for b, first in enumerate(firsts):
            policy.commit(alone[b], key[b], value[b], pos[b], first)
        firsts = [first + 2 for first in firsts]
    for a, b in zip(together, alone):
        assert a.length == b.length == 4 * n
        for name in ("key", "value", "pos", "count", "frame"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    for layer, last in zip(together, firsts):  # the ring holds each world's 3 latest frames, block (f - 1) % 3 + 1
        held = [int(layer.frame[block * n]) for block in (1, 2, 3)]
        assert sorted(held) == [last - 3, last - 2, last - 1]
        assert all((f - 1) % 3 + 1 == block for block, f in zip((1, 2, 3), held))
    assert int(together[0].frame[0]) == 0 and not together[1].count[:n].any()  # world 1 began after the sink frame


def test_bounded_dense_worlds_of_one_pool_committed_together_end_as_each_alone_growing() -> None:
    """Under `cache.max_slots` a dense world's cache is a row of the engine's pool: `commit_worlds` appends every
    world's chunk in one indexed write per buffer, to the same slots as an unbounded cache of its own; a chunk that
    would pass the bound fails before anything is written, in any world."""
    config = tiny_config(cache={"policy": "dense", "max_slots": 5 * 16, "grow_frames": 5})  # within one growth
    bounded = make_policy(config.cache, config.sizes())
    unbounded = tiny_config(cache={"policy": "dense", "grow_frames": 2})
    growing = make_policy(unbounded.cache, unbounded.sizes())
    m, n = config.model, config.sizes().tokens_per_frame
    assert n == 16 and bounded.capacity == 5 * n and bounded.pooled and not growing.pooled
    pool = CachePool(1, m.heads, m.head_dim, bounded.capacity, torch.float32, torch.device("cpu"))
    owners = [pool.new_cache() for _ in range(3)]
    together = [owner.layers[0] for owner in owners]
    alone = [
        LayerCache.alone(m.heads, m.head_dim, growing.capacity, torch.float32, torch.device("cpu")) for _ in owners
    ]
    generator = torch.Generator().manual_seed(0)
    firsts = [0, 0, 40]  # dense appends wherever the frames lie (a training clip skips ahead after its sink)

    def chunk() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key, value = (torch.randn(3, n, m.heads, m.head_dim, generator=generator) for _ in range(2))
        pos = torch.zeros(3, n, 3, dtype=torch.int32)
        for b, first in enumerate(firsts):
            pos[b, :, 0] = first
        return key, value, pos

    for _ in range(5):
        key, value, pos = chunk()
        bounded.commit_worlds(together, key, value, pos, firsts)
        for b, first in enumerate(firsts):
            growing.commit(alone[b], key[b], value[b], pos[b], first)
        firsts = [first + 1 for first in firsts]
    for a, b in zip(together, alone):
        assert a.length == b.length == 5 * n and b.capacity == 6 * n  # the growing one grew by 2 frames at a time
        for name in ("key", "value", "pos", "count", "frame"):
            assert torch.equal(getattr(a, name), getattr(b, name)[: 5 * n]), name
    before = {name: getattr(pool.segments[0][0], name).clone() for name in ("key", "value", "pos", "count", "frame")}
    with pytest.raises(CacheFull, match=r"a dense cache bounded at 80 slots per layer \(cache.max_slots\) is full"):
        bounded.commit_worlds(together, *chunk(), firsts)
    assert [layer.length for layer in together] == [5 * n] * 3
    assert all(torch.equal(getattr(pool.segments[0][0], name), kept) for name, kept in before.items())


def _frame_shape(engine: WorldEngine) -> tuple[int, int, int]:
    return (engine.config.model.frame_height, engine.config.model.frame_width, 3)


@pytest.mark.parametrize("grow_frames", [6, 4], ids=["pooled", "growing"])
def test_a_bounded_dense_engine_makes_the_frames_of_an_unbounded_one_until_its_bound_and_then_fails_clearly(
    grow_frames: int,
) -> None:
    """A bound within one growth is allocated whole, as rows of the pool; a larger one caps caches that grow on their
    own, by whole growths and then to the bound (4 frames, then 2). Either way the frames are the unbounded cache's
    until a world is full, and then the step fails before it does anything."""
    growing, bounded = _engine("dense"), _engine("dense", max_slots=6 * 16, grow_frames=grow_frames)
    assert growing.pool is None and (bounded.pool is not None) == (grow_frames == 6)
    worlds = {engine: [engine.new_world(seed=s) for s in (1, 2, 3)] for engine in (growing, bounded)}
    for engine in (growing, bounded):  # worlds of different ages
        engine.step(worlds[engine][:1], [IDLE])
        engine.step(worlds[engine][:2], [IDLE, IDLE])
    for _ in range(5):  # the oldest world's cache fills: 6 frames written, its seventh waits for the next step
        frames = {engine: engine.step(worlds[engine], [IDLE] * 3) for engine in (growing, bounded)}
        for a, b in zip(frames[growing], frames[bounded]):
            assert all((x == y).all() for x, y in zip(a, b))
    oldest = worlds[bounded][0]
    slots = oldest.cache.tokens_per_layer()
    assert slots == [6 * 16] * 2 and oldest.cache.layers[0].capacity == 6 * 16, "grown no further than the bound"
    draws = [world.generator.get_state() for world in worlds[bounded]]
    with pytest.raises(CacheFull, match=r"bounded at 96 slots per layer \(cache.max_slots\) is full") as full:
        bounded.step(worlds[bounded], [IDLE] * 3)
    assert full.value.worlds == [oldest], "the error names the world that is full, not its batch mates"
    assert oldest.cache.tokens_per_layer() == slots and oldest.pending is not None, "nothing written, nothing lost"
    assert all(torch.equal(w.generator.get_state(), d) for w, d in zip(worlds[bounded], draws)), "no noise drawn"
    mate = worlds[bounded][1]
    written = mate.cache.tokens_per_layer()[0]
    [frames] = bounded.step([mate], [IDLE])  # its batch mates step on: their pending frame written now
    assert frames[0].shape == _frame_shape(bounded) and mate.cache.tokens_per_layer()[0] == written + 16
