"""The engine worker: the one thread per device that makes every torch call.

Each tick it (1) runs queued jobs (new worlds, prompt changes, resets), (2) takes an `Order` from every session
that is due (realtime sessions at their frame rate, lockstep sessions with a step waiting), (3) steps the due worlds
of each attention configuration in one batched `WorldEngine.step` call, and (4) hands each session its `Chunk`
through `on_chunk`, which the app makes thread-safe. It never waits on a socket, so a client that stops reading
cannot slow anyone else down.

The server runs a second worker, on a thread of its own, for the sessions of the reference game (`GameWorlds`, pure
numpy, no torch): a game step takes well under a millisecond, and on the model's worker a lockstep game session
would wait for model steps of hundreds of milliseconds on a CPU, then for its previous frame to be sent, and so take
one step every second tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any

from engine import CacheFull, WorldEngine
from server.game_worlds import GameWorlds
from server.metrics import Metrics
from server.session import Chunk, Order, Session

log = logging.getLogger("worldserve.engine")

IDLE_WAIT_S = 0.25  # longest sleep between heartbeats when nothing is due
BATCH_SLACK = 0.5  # a realtime session due within this fraction of its frame interval joins the current batch


class EngineWorker:
    def __init__(
        self,
        metrics: Metrics,
        on_chunk: Callable[[Session, Chunk], None],
        on_failure: Callable[[Session, str], None],
        name: str = "engine-worker",
    ) -> None:
        # attention configuration name -> engine, all sharing one model (built by a job on this thread, then set);
        # or, in the server's second worker, "game" -> the reference game
        self.engines: dict[str, WorldEngine | GameWorlds] = {}
        self._metrics = metrics
        self._on_chunk = on_chunk
        self._on_failure = on_failure
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[tuple[Callable[[], Any], Future]] = SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.heartbeat = time.monotonic()  # refreshed every tick; /healthz reads it

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps; the future holds its result or exception."""
        future: Future = Future()
        self._jobs.put((fn, future))
        self._wake.set()
        return future

    def add(self, session: Session) -> None:
        with self._lock:
            self._sessions.add(session)
        self._wake.set()

    def remove(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self.heartbeat = time.monotonic()
            self._run_jobs()
            with self._lock:
                sessions = list(self._sessions)
            now = time.monotonic()
            orders = []
            for session in sessions:
                order = session.take_order(now, BATCH_SLACK * session.interval)
                if order is not None:
                    orders.append(order)
            if orders:
                self._step(orders)
                self.heartbeat = time.monotonic()
                continue
            next_due = min((session.next_due() for session in sessions), default=float("inf"))
            self._wake.wait(max(0.0, min(IDLE_WAIT_S, next_due - time.monotonic())))
            self._wake.clear()

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, future = self._jobs.get_nowait()
            except Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller, who decides what it means
                future.set_exception(error)
            self.heartbeat = time.monotonic()  # a long job (loading the model) is not a stall once it is done

    def _cache_bytes(self, engine: WorldEngine, attention: str) -> int:
        """The KV cache memory of `attention`'s worlds: its engine's pool, or (an unbounded policy's caches, each
        its own) the sum over the worlds of this worker's sessions under it."""
        if engine.pool is not None:
            return engine.pool.nbytes
        with self._lock:
            worlds = [s.world for s in self._sessions if s.attention == attention and s.world is not None]
        return sum(world.cache.nbytes for world in worlds)

    def _step(self, orders: list[Order]) -> None:
        groups: dict[str, list[Order]] = {}
        for order in orders:
            groups.setdefault(order.session.attention, []).append(order)
        for attention, group in groups.items():
            engine = self.engines[attention]
            started = time.monotonic()
            try:
                try:
                    frames = engine.step([o.world for o in group], [o.applied.action for o in group])
                except CacheFull as full:  # raised before the step did anything: the others step without them
                    if not full.worlds:
                        raise
                    ended = {id(world) for world in full.worlds}
                    for order in group:
                        if id(order.world) in ended:
                            self._on_failure(order.session, f"CacheFull: {full}")
                    group = [order for order in group if id(order.world) not in ended]
                    if not group:
                        continue
                    frames = engine.step([o.world for o in group], [o.applied.action for o in group])
            except Exception as error:  # an engine failure ends the sessions it hit, never the worker
                log.exception("engine step failed for %d world(s) under %s", len(group), attention)
                for order in group:
                    self._on_failure(order.session, f"{type(error).__name__}: {error}")
                continue
            finished = time.monotonic()
            step_s = finished - started
            self._metrics.step_seconds.observe(step_s)
            self._metrics.batch_size.observe(len(group))
            if isinstance(engine, WorldEngine):
                self._metrics.kv_cache_bytes.labels(attention).set(self._cache_bytes(engine, attention))
            for order, chunk_frames in zip(group, frames):
                order.session.stepped(finished)
                world = order.world
                self._on_chunk(
                    order.session,
                    Chunk(
                        generation=order.generation,
                        first_index=world.frame_index - len(chunk_frames),
                        frames=chunk_frames,
                        applied=order.applied,
                        attention=attention,
                        queue_ms=max(0.0, (started - order.due_at) * 1e3),
                        step_ms=step_s * 1e3,
                        cache_slots=sum(world.cache.tokens_per_layer()) if world.cache is not None else 0,
                        cache_bytes=world.cache.nbytes if world.cache is not None else 0,
                        lockstep=order.session.mode == "lockstep",
                    ),
                )
