"""The engine worker's account of KV cache memory, per attention configuration, and what it does with a world whose
bounded cache is full."""

from __future__ import annotations

from engine import IDLE, WorldEngine
from engine.kv_cache import CachePool
from server.engine_worker import EngineWorker
from server.metrics import Metrics
from server.session import Applied, Order
from tests.conftest import tiny_config


class _Session:
    """What the worker reads of a session here: its attention configuration and its world."""

    def __init__(self, attention: str, world) -> None:
        self.attention, self.world = attention, world
        self.mode = "realtime"

    def stepped(self, at: float) -> None:
        pass


def _worker_with(engine: WorldEngine, attention: str, worlds: list) -> EngineWorker:
    worker = EngineWorker(Metrics(), on_chunk=lambda *_: None, on_failure=lambda *_: None)
    worker.engines[attention] = engine
    for world in worlds:
        worker.add(_Session(attention, world))
    worker.add(_Session("other", None))  # another configuration's session: not counted
    return worker


def test_a_bounded_configuration_reports_its_pool_and_an_unbounded_one_its_worlds() -> None:
    bounded = WorldEngine.from_config(tiny_config(cache={"policy": "window"}))
    worlds = [bounded.new_world(seed=s) for s in range(3)]  # rows of the pool's first segment
    worker = _worker_with(bounded, "window", worlds[:1])
    held = CachePool.FIRST_ROWS * worlds[0].cache.nbytes
    assert worker._cache_bytes(bounded, "window") == bounded.pool.nbytes == held

    dense = WorldEngine.from_config(tiny_config(cache={"policy": "dense", "grow_frames": 2}))
    worlds = [dense.new_world(seed=s) for s in range(2)]
    for _ in range(4):
        dense.step(worlds[1:], [IDLE])  # the second world's cache grows past the first's
    dense.flush(worlds[1:])
    worker = _worker_with(dense, "dense", worlds)
    assert dense.pool is None and worlds[0].cache.nbytes < worlds[1].cache.nbytes
    assert worker._cache_bytes(dense, "dense") == worlds[0].cache.nbytes + worlds[1].cache.nbytes


def test_a_world_whose_bounded_dense_cache_is_full_ends_its_own_session_and_its_batch_mates_step_on() -> None:
    engine = WorldEngine.from_config(tiny_config(cache={"policy": "dense", "max_slots": 3 * 16}))
    old, young = engine.new_world(seed=0), engine.new_world(seed=1)
    for _ in range(4):  # 3 frames written, the fourth pending: the old world's cache is full
        engine.step([old], [IDLE])
    chunks, failures = [], []
    worker = EngineWorker(
        Metrics(), on_chunk=lambda s, c: chunks.append((s, c)), on_failure=lambda *a: failures.append(a)
    )
    worker.engines["dense"] = engine
    sessions = [_Session("dense", world) for world in (old, young)]
    worker._step([Order(s, s.world, Applied(IDLE), due_at=0.0, generation=0) for s in sessions])
    assert [(s, m.split(":")[0]) for s, m in failures] == [(sessions[0], "CacheFull")]
    assert "cache.max_slots" in failures[0][1]
    assert [s for s, _ in chunks] == [sessions[1]] and young.frame_index == 1
    assert old.frame_index == 4 and old.cache.tokens_per_layer()[0] == 3 * 16, "the full world is left as it was"
