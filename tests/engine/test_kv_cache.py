"""The cache pool: many worlds' bounded caches as rows of a few buffers per layer, handed out and given back."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from engine.kv_cache import CachePool, LayerCache, PooledViews

H, D, C = 2, 4, 6  # heads, head dim, slots per layer
ROW_BYTES = C * (2 * H * D * 4 + 3 * 4 + 4 + 8)  # one world's slots of one layer, float32


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
    [[_, layer1]] = pool.segments
    assert torch.equal(layer1.key[1, :3], second.layers[1].key[:3])
    assert not layer1.key[0].any() and not pool.segments[0][0].key.any()  # the other rows and layers untouched
    assert first.nbytes == second.nbytes == 2 * ROW_BYTES
    assert pool.rows == CachePool.FIRST_ROWS and pool.nbytes == CachePool.FIRST_ROWS * 2 * ROW_BYTES


def test_a_full_pool_adds_a_segment_twice_as_large_and_moves_nothing() -> None:
    pool = _pool()
    caches = [pool.new_cache() for _ in range(CachePool.FIRST_ROWS)]
    for b, cache in enumerate(caches):
        _fill(cache.layers[0], 1 + b % C, seed=b)
    before = [(cache.layers[0].key.data_ptr(), cache.layers[0].key.clone()) for cache in caches]
    extra = pool.new_cache()  # a new segment
    assert [len(layers) for layers in pool.segments] == [2, 2] and pool.rows == 3 * CachePool.FIRST_ROWS
    assert extra.layers[0].pool is pool.segments[1][0] and extra.layers[0].row == 0
    for cache, (pointer, key) in zip(caches, before):
        assert cache.layers[0].key.data_ptr() == pointer and torch.equal(cache.layers[0].key, key)


def test_the_last_segments_are_given_back_once_their_rows_are_free_and_the_first_is_kept() -> None:
    pool = _pool()
    caches = [pool.new_cache() for _ in range(CachePool.FIRST_ROWS + 1)]  # 8 + 16 rows
    assert pool.rows == 3 * CachePool.FIRST_ROWS
    last = caches.pop()  # the second segment's only world
    del last
    gc.collect()
    assert pool.rows == CachePool.FIRST_ROWS and pool.nbytes == CachePool.FIRST_ROWS * 2 * ROW_BYTES
    again = pool.new_cache()  # the second segment again, as large as before
    assert pool.rows == 3 * CachePool.FIRST_ROWS and again.layers[0].pool is pool.segments[1][0]
    del caches, again
    gc.collect()
    assert pool.rows == CachePool.FIRST_ROWS  # every world gone: the first segment stays
    assert [pool.new_cache().layers[0].row for _ in range(2)] == [0, 0]  # (each dropped at once: row 0 again)


def test_segments_stop_doubling_at_their_byte_budget(monkeypatch) -> None:
    monkeypatch.setattr(CachePool, "SEGMENT_BYTES", 2 * 2 * ROW_BYTES)  # two worlds' caches of 2 layers
    pool = _pool()
    caches = [pool.new_cache() for _ in range(5)]
    assert [layers[0].rows for layers in pool.segments] == [2, 2, 2] and len(caches) == 5
    monkeypatch.setattr(CachePool, "SEGMENT_BYTES", 1)  # a model whose one world is over budget: a world a segment
    big = _pool()
    owners = [big.new_cache() for _ in range(3)]
    assert [layers[0].rows for layers in big.segments] == [1, 1, 1] and len(owners) == 3


def test_rows_reserved_together_come_from_one_segment_within_its_byte_budget(monkeypatch) -> None:
    pool = _pool()
    pool.reserve(20)  # a fresh pool: one segment of 20 rows, not 8 + 16
    caches = [pool.new_cache() for _ in range(20)]
    assert [layers[0].rows for layers in pool.segments] == [20]
    assert {cache.layers[0].pool for cache in caches} == {pool.segments[0][0]}
    pool.reserve(3)  # none free: a segment doubling the last's rows (40) holds them
    assert [layers[0].rows for layers in pool.segments] == [20, 40]
    pool.reserve(3)  # free already: nothing added
    assert pool.rows == 60
    monkeypatch.setattr(CachePool, "SEGMENT_BYTES", 2 * 2 * ROW_BYTES)  # two worlds' caches of 2 layers
    small = _pool()
    taken = small.new_cache()  # one row of the first segment taken, one free
    small.reserve(4)  # 3 missing, but a segment holds 2 at most
    assert [layers[0].rows for layers in small.segments] == [2, 2, 2] and taken.layers[0].row == 0


def test_a_row_goes_back_to_the_pool_when_its_cache_is_dropped_and_comes_back_cleared() -> None:
    pool = _pool()
    kept, dropped = pool.new_cache(), pool.new_cache()
    _fill(dropped.layers[0], 4, seed=1)
    del dropped
    gc.collect()
    again = pool.new_cache()
    assert again.layers[0].row == 1 and pool.rows == CachePool.FIRST_ROWS  # the freed row, the first free one
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


@pytest.mark.parametrize("segments", [1, 2])
def test_pooled_views_are_left_padded_and_masked_with_room_for_the_chunk(segments: int, monkeypatch) -> None:
    """Read in one gather per segment, in the worlds' order whichever segments they occupy."""
    monkeypatch.setattr(CachePool, "FIRST_ROWS", 2 if segments == 2 else 8)
    pool = _pool(depth=1)
    owners = [pool.new_cache() for _ in range(3)]  # with 2 first rows: worlds 0 and 1 in one segment, 2 in the next
    assert len(pool.segments) == segments
    order = [2, 0, 1]  # not the pool's order
    caches = [owners[b].layers[0] for b in order]
    for cache, length in zip(caches, (4, 2, 0)):
        if length:
            _fill(cache, length, seed=length)
    caches[0].count[1], caches[0].merged = 3.0, True
    views = PooledViews.of(caches, sinks=1)
    assert views.lengths == [4, 2, 0] and views.sinks == [1, 1, 0] and views.merged
    key, value, pos, bias = views.padded(4, room=2)
    assert key.shape == (3, 6, H, D) and pos.shape == (3, 6, 3)
    for b, (layer, length) in enumerate(zip(caches, (4, 2, 0))):
        assert torch.equal(key[b, 4 - length : 4], layer.key[:length])
        assert torch.equal(value[b, 4 - length : 4], layer.value[:length])
        assert torch.equal(pos[b, 4 - length : 4], layer.pos[:length])
        assert (bias[b, : 4 - length] == -math.inf).all() and (bias[b, 4:] == 0).all()
        assert torch.isfinite(key[b]).all() and torch.isfinite(value[b]).all()  # padding: finite, masked
    assert torch.equal(bias[0, :4], torch.tensor([0.0, math.log(3.0), 0.0, 0.0]))
    assert torch.equal(bias[1, 2:4], torch.zeros(2))


def test_caches_alone_are_not_pooled_views() -> None:
    owner = _pool().new_cache()
    alone = LayerCache.alone(H, D, C, torch.float32, torch.device("cpu"))
    assert PooledViews.of([owner.layers[0], alone], sinks=0) is None
    unmerged = PooledViews.of([owner.layers[0]], sinks=0)
    assert unmerged is not None and unmerged.padded(0)[3] is None  # nothing padded, nothing merged: no bias
