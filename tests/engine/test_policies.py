"""Cache policies: `window` is bounded by construction, `dense` grows by whole chunks, never per frame."""

from __future__ import annotations

import torch

from engine import IDLE, WorldEngine
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
