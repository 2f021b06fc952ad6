"""The cache pool: one buffer per layer for many worlds' bounded caches, rows handed out, grown and given back."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from engine.kv_cache import CachePool, LayerCache, PooledViews

H, D, C = 2, 4, 6  # heads, head dim, slots per layer


def _pool(depth: int = 2) -> CachePool:
    return CachePool(depth, H, D, C, torch.float32, torch.device("cpu"))


def _fill(layer: LayerCache, slots: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(slots, H, D, generator=generator) for _ in range(2))
    pos = torch.zeros(slots, 3, dtype=torch.int32)
    pos[:, 0] = torch.arange(slots)
    layer.write(0, key, value, pos)


def test_a_world_cache_is_a_row_of_every_layer_buffer_of_the_pool() -> None:
    pool = _pool()
    first, second = pool.new_cache(), pool.new_cache()
    assert [layer.row for layer in first.layers] == [0, 0] and [layer.row for layer in second.layers] == [1, 1]
    _fill(second.layers[1], 3, seed=0)
    assert torch.equal(pool.layers[1].key[1, :3], second.layers[1].key[:3])
    assert not pool.layers[1].key[0].any() and not pool.layers[0].key.any()  # the other rows and layers untouched
    assert first.nbytes == second.nbytes == 2 * C * (2 * H * D * 4 + 3 * 4 + 4 + 8)


def test_growing_the_pool_keeps_every_live_cache_and_points_it_at_the_new_buffers() -> None:
    pool = _pool()
    caches = [pool.new_cache() for _ in range(3)]  # the pool grows from 1 row to 2, then to 4
    for b, cache in enumerate(caches):
        _fill(cache.layers[0], 2 + b, seed=b)
    before = [cache.layers[0].key[: 2 + b].clone() for b, cache in enumerate(caches)]
    caches += [pool.new_cache() for _ in range(2)]  # 5 rows: 8
    assert pool.rows == 8
    for b, cache in enumerate(caches[:3]):
        layer = cache.layers[0]
        assert layer.key.data_ptr() == pool.layers[0].key[layer.row].data_ptr()  # a view of the new buffer
        assert torch.equal(layer.key[: 2 + b], before[b]) and layer.length == 2 + b
    _fill(caches[0].layers[0], 5, seed=9)  # writes land in the pool
    assert torch.equal(pool.layers[0].key[0, :5], caches[0].layers[0].key[:5])


def test_a_row_goes_back_to_the_pool_when_its_cache_is_dropped_and_comes_back_cleared() -> None:
    pool = _pool()
    kept, dropped = pool.new_cache(), pool.new_cache()
    _fill(dropped.layers[0], 4, seed=1)
    del dropped
    gc.collect()
    again = pool.new_cache()
    assert again.layers[0].row == 1 and pool.rows == 2  # the freed row, not a new one
    assert again.layers[0].length == 0 and not again.layers[0].key.any() and not again.layers[0].count.any()
    assert kept.layers[0].row == 0


def test_a_pooled_cache_cannot_grow_and_a_cache_alone_can() -> None:
    owner = _pool().new_cache()
    pooled = owner.layers[0]
    _fill(pooled, C, seed=0)
    with pytest.raises(RuntimeError, match="cannot grow"):
        pooled.reserve(C + 1, grow=4)
    alone = LayerCache.alone(H, D, C, torch.float32, torch.device("cpu"))
    _fill(alone, C, seed=0)
    alone.reserve(C + 1, grow=4)
    assert alone.capacity == C + 4 and torch.equal(alone.key[:C], pooled.key)


def test_pooled_views_are_left_padded_and_masked_with_room_for_the_chunk() -> None:
    pool = _pool(depth=1)
    caches = [pool.new_cache() for _ in range(3)]
    for b, length in enumerate((4, 2, 0)):
        if length:
            _fill(caches[b].layers[0], length, seed=b)
    merged = caches[0].layers[0]
    merged.count[1], merged.merged = 3.0, True
    views = PooledViews.of([cache.layers[0] for cache in caches], sinks=1)
    assert views.lengths == [4, 2, 0] and views.sinks == [1, 1, 0] and views.merged
    key, value, pos, bias = views.padded(4, room=2)
    assert key.shape == (3, 6, H, D) and pos.shape == (3, 6, 3)
    for b, length in enumerate((4, 2, 0)):
        layer = caches[b].layers[0]
        assert torch.equal(key[b, 4 - length : 4], layer.key[:length])
        assert torch.equal(value[b, 4 - length : 4], layer.value[:length])
        assert torch.equal(pos[b, 4 - length : 4], layer.pos[:length])
        assert (bias[b, : 4 - length] == -math.inf).all() and (bias[b, 4:] == 0).all()
        assert torch.isfinite(key[b]).all() and torch.isfinite(value[b]).all()  # padding: finite, masked
    assert torch.equal(bias[0, :4], torch.tensor([0.0, math.log(3.0), 0.0, 0.0]))
    assert torch.equal(bias[1, 2:4], torch.zeros(2))


def test_views_of_caches_in_different_pools_are_not_pooled() -> None:
    one, two = _pool(), _pool()
    a, b = one.new_cache(), two.new_cache()
    assert PooledViews.of([a.layers[0], b.layers[0]], sinks=0) is None
    assert PooledViews.of([a.layers[0]], sinks=0) is not None
    unmerged = PooledViews.of([a.layers[0]], sinks=0)
    assert unmerged.padded(0)[3] is None  # nothing padded, nothing merged: no bias
