"""The session manager: admission, world creation and changes (as engine-thread jobs), frame delivery, expiry.

It owns the registry of sessions and decides their fate; `Connection` (server/connection.py) owns a socket and
decides nothing about the world. Every method runs on the event loop except `on_chunk` and `on_failure`, which the
engine worker calls from its thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import World
from server.encoder import FrameEncoder
from server.engine_worker import EngineWorker
from server.game_worlds import GAME, GameWorld, GameWorlds
from server.metrics import Metrics
from server.protocol import (
    PROTOCOL_VERSION,
    CacheInfo,
    ErrorCode,
    Frame,
    FrameSpec,
    Hello,
    Limits,
    ProtocolError,
    Reset,
    Timings,
    Welcome,
    encode,
)
from server.session import Chunk, Session, applied_input
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.connection import Connection

log = logging.getLogger("worldserve.sessions")

REAP_INTERVAL_S = 0.25


class SessionManager:
    def __init__(
        self,
        settings: ServerSettings,
        worker: EngineWorker,
        game_worker: EngineWorker,
        encoder: FrameEncoder,
        metrics: Metrics,
        default_attention: str,
    ) -> None:
        self.settings = settings
        self.worker = worker  # the model's engines
        self.game_worker = game_worker  # the reference game's sessions
        self.encoder = encoder
        self.metrics = metrics
        self.default_attention = default_attention
        self.attention_choices = list(worker.engines)
        self.admitting = True
        self.sessions: dict[str, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._connections: dict[Session, Connection] = {}
        self._reserved = 0  # admitted hellos whose world is still being made
        self._loop = asyncio.get_running_loop()
        engine = next(iter(worker.engines.values()))
        self._engine_shape = (engine.config.model.frame_height, engine.config.model.frame_width)
        self._chunk_frames = engine.chunk_frames
        self._action_spec = engine.action_space.spec()

    @property
    def capacity_left(self) -> int:
        return self.settings.max_sessions - len(self.sessions) - self._reserved

    # ---- joining

    async def join(self, hello: Hello, connection: Connection) -> tuple[Session, bool]:
        """Admit a new session or resume one; returns (session, resumed). Raises a fatal ProtocolError to refuse,
        counted by its code."""
        try:
            return await self._join(hello, connection)
        except ProtocolError as error:
            self.metrics.sessions_refused.labels(reason=error.code.value).inc()
            raise

    async def _join(self, hello: Hello, connection: Connection) -> tuple[Session, bool]:
        self._check_hello(hello)
        if hello.resume_token is not None:
            return self._resume(hello.resume_token, connection), True
        if not self.admitting:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if self.capacity_left <= 0:
            raise ProtocolError(
                ErrorCode.SERVER_FULL, f"the server is full ({self.settings.max_sessions} sessions); try again later"
            )
        self._reserved += 1
        try:
            session = await self._open(hello)
        finally:
            self._reserved -= 1
        self.sessions[session.id] = session
        self._by_token[session.resume_token] = session
        self._connections[session] = connection
        if not self.admitting:  # the drain ran while this world was being made
            self.end(session, None, "the server is shutting down")
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        self.worker_for(session.attention).add(session)
        self.metrics.sessions_admitted.inc()
        self.metrics.sessions_active.set(len(self.sessions))
        log.info(
            "session open",
            extra={"session": session.id, "mode": session.mode, "fps": session.fps, "attention": session.attention},
        )
        return session, False

    def _check_hello(self, hello: Hello) -> None:
        if hello.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_PROTOCOL, f"protocol {hello.protocol} is not supported; this server speaks 1"
            )
        expected = self.settings.token
        if expected is not None:
            given = (hello.token or "").encode()
            if not hmac.compare_digest(given, expected.get_secret_value().encode()):
                raise ProtocolError(ErrorCode.BAD_TOKEN, "missing or wrong token")
        if hello.attention is not None and hello.attention not in self.attention_choices:
            raise ProtocolError(
                ErrorCode.UNKNOWN_ATTENTION,
                f"unknown attention {hello.attention!r}; choose from {', '.join(self.attention_choices)}",
            )
        if hello.world == "game" and hello.resume_token is None:
            if hello.attention is not None:
                raise ProtocolError(ErrorCode.BAD_HELLO, "the game has no attention configuration; leave it out")
            if hello.init_frame is not None:
                raise ProtocolError(ErrorCode.BAD_INIT_FRAME, "the game starts in its own maze; it takes no init frame")

    async def _open(self, hello: Hello) -> Session:
        attention = GAME if hello.world == "game" else hello.attention or self.default_attention
        seed = hello.seed if hello.seed is not None else secrets.randbelow(2**31)
        init = await self._init_frames(hello.init_frame, fatal=True)
        world = await asyncio.wrap_future(
            self.worker_for(attention).call(lambda: self._make_world(attention, hello.prompt, seed, init))
        )
        fps = min(hello.fps or self.settings.default_fps, self.settings.max_fps)
        return Session(
            session_id=uuid.uuid4().hex[:12],
            resume_token=secrets.token_urlsafe(24),
            mode=hello.mode,
            fps=fps,
            attention=attention,
            prompt=hello.prompt,
            seed=seed,
            world=world,
            chunk_frames=self._chunk_frames,
            prime_frames=self.settings.switch_prime_frames,
        )

    async def _init_frames(self, jpeg: bytes | None, fatal: bool) -> np.ndarray | None:
        """A client's init frame, repeated to fill one chunk: (chunk_frames, H, W, 3) uint8."""
        if jpeg is None:
            return None
        try:
            frame = await self.encoder.decode(jpeg)
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_INIT_FRAME, f"init_frame: {error}", fatal=fatal) from None
        height, width = self._engine_shape
        if frame.shape != (height, width, 3):
            raise ProtocolError(
                ErrorCode.BAD_INIT_FRAME,
                f"init_frame is {frame.shape[1]}x{frame.shape[0]}; this model needs {width}x{height}",
                fatal=fatal,
            )
        return np.repeat(frame[None], self._chunk_frames, axis=0)

    def _resume(self, token: str, connection: Connection) -> Session:
        session = self._by_token.get(token)
        if session is None or session.closed:
            raise ProtocolError(ErrorCode.RESUME_FAILED, "unknown or expired resume token; send a hello without it")
        previous = self._connections.get(session)
        if previous is not None and previous is not connection:
            previous.close(ErrorCode.REPLACED, "another connection resumed this session")
        self._connections[session] = connection
        session.last_message_at = time.monotonic()
        session.set_connected(True)
        self.wake(session)
        self.metrics.sessions_resumed.inc()
        log.info("session resumed", extra={"session": session.id})
        return session

    def welcome(self, session: Session, resumed: bool) -> Welcome:
        height, width = self._engine_shape
        return Welcome(
            session_id=session.id,
            resume_token=session.resume_token,
            resumed=resumed,
            paused=session.paused,
            world="game" if session.attention == GAME else "model",
            mode=session.mode,
            frame=FrameSpec(height=height, width=width),
            actions=self._action_spec,
            chunk_frames=self._chunk_frames,
            fps=session.fps,
            frame_index=session.world.frame_index,
            attention=session.attention,
            attention_choices=[] if session.attention == GAME else self.attention_choices,
            prompt=session.prompt,
            seed=session.seed,
            heartbeat_s=self.settings.heartbeat_s,
            limits=self.welcome_limits(),
        )

    def welcome_limits(self) -> Limits:
        s = self.settings
        return Limits(
            max_message_bytes=s.max_message_bytes,
            rate_limit_per_s=s.rate_limit_per_s,
            rate_burst=s.rate_burst,
            max_pending_steps=s.max_pending_steps,
            idle_timeout_s=s.idle_timeout_s,
            max_session_s=s.max_session_s,
            resume_grace_s=s.resume_grace_s,
            max_fps=s.max_fps,
        )

    # ---- changing the world (engine-thread jobs)

    async def reset(self, session: Session, message: Reset) -> None:
        seed = message.seed if message.seed is not None else session.seed
        prompt = message.prompt if message.prompt is not None else session.prompt
        if session.attention == GAME and message.init_frame is not None:
            raise ProtocolError(ErrorCode.BAD_INIT_FRAME, "the game starts in its own maze", fatal=False)
        init = await self._init_frames(message.init_frame, fatal=False)
        await self._new_world(session, session.attention, prompt, seed, init)

    async def set_attention(self, session: Session, attention: str) -> None:
        """Continue under another attention configuration: a new cache seeded with the frames shown last."""
        if session.attention == GAME:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, "a game session has no attention configuration")
        if attention not in self.attention_choices:
            raise ProtocolError(
                ErrorCode.UNKNOWN_ATTENTION,
                f"unknown attention {attention!r}; choose from {', '.join(self.attention_choices)}",
                fatal=False,
            )
        recent = list(session.recent_frames)
        keep = len(recent) - len(recent) % self._chunk_frames
        init = np.stack(recent[len(recent) - keep :]) if keep else None
        await self._new_world(session, attention, session.prompt, session.seed, init)

    async def _new_world(
        self, session: Session, attention: str, prompt: str, seed: int, init: np.ndarray | None
    ) -> None:
        def make() -> None:  # on the engine thread, between two steps
            session.replace_world(self._make_world(attention, prompt, seed, init), attention, prompt, seed)

        await asyncio.wrap_future(self.worker_for(attention).call(make))
        session.outbox.clear()
        session.recent_frames.clear()

    def worker_for(self, attention: str) -> EngineWorker:
        """The worker that steps sessions of this attention configuration (or of the game)."""
        return self.game_worker if attention == GAME else self.worker

    def wake(self, session: Session) -> None:
        """A session has work (a step, a resume): its worker looks at once."""
        self.worker_for(session.attention).wake()

    def _make_world(self, attention: str, prompt: str, seed: int, init: np.ndarray | None) -> World | GameWorld:
        """On the session's worker thread: a new world. A model world given no frames begins with the game's start
        view of its seed and prompt (`game_start_frames`), where a game session of the same seed begins (the game
        renders it here: `start_view` reads no state of the game's worker)."""
        game: GameWorlds = self.game_worker.engines[GAME]
        if init is None and attention != GAME and game.start_frames:
            init = game.start_view(prompt, seed)
        return self.worker_for(attention).engines[attention].new_world(prompt, seed, init)

    async def set_prompt(self, session: Session, prompt: str) -> None:
        worker = self.worker_for(session.attention)
        engine = worker.engines[session.attention]

        def change() -> None:
            engine.set_prompt(session.world, prompt)
            session.prompt = prompt

        await asyncio.wrap_future(worker.call(change))

    # ---- frames (engine thread -> event loop -> outbox)

    def on_chunk(self, session: Session, chunk: Chunk) -> None:
        """Engine thread: a step's frames for `session`."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._deliver(session, chunk)))

    def on_failure(self, session: Session, message: str) -> None:
        """Engine thread: stepping this session's world failed."""
        self._loop.call_soon_threadsafe(self.end, session, ErrorCode.ENGINE_ERROR, f"the engine failed: {message}")

    async def _deliver(self, session: Session, chunk: Chunk) -> None:
        if session.closed or chunk.generation != session.generation:
            return  # a session that ended, or a world that has since been replaced
        try:
            jpegs, encode_ms = await self.encoder.encode(chunk.frames)
        except RuntimeError:  # the encoder's pool is shut down: the server is stopping
            return
        if session.closed or chunk.generation != session.generation:
            return
        self.metrics.encode_seconds.observe(encode_ms / 1e3)
        session.recent_frames.extend(chunk.frames)
        chunk.encode_ms = encode_ms
        cache = CacheInfo(slots=chunk.cache_slots, bytes=chunk.cache_bytes)
        timings = Timings(
            queue_ms=round(chunk.queue_ms, 3), step_ms=round(chunk.step_ms, 3), encode_ms=round(encode_ms, 3)
        )
        dropped_before = session.outbox.dropped
        applied = applied_input(chunk.applied.action)
        chunk.messages = [
            encode(
                Frame(
                    index=chunk.first_index + i,
                    seq=chunk.applied.seq,
                    t=chunk.applied.t,
                    attention=chunk.attention,
                    timings=timings,
                    cache=cache,
                    dropped=dropped_before,
                    input=applied,
                    jpeg=jpeg,
                )
            )
            for i, jpeg in enumerate(jpegs)
        ]
        replaced = session.outbox.put(chunk)
        if replaced:
            self.metrics.frames_dropped.inc(replaced)

    def sent(self, session: Session, chunk: Chunk) -> None:
        """Connection: every frame of `chunk` went out."""
        now = time.monotonic()
        session.stats.frames_sent += len(chunk.frames)
        self.metrics.frames_sent.inc(len(chunk.frames))
        if chunk.applied.fresh and chunk.applied.received_at is not None:
            latency = now - chunk.applied.received_at
            session.stats.latencies_ms.append(latency * 1e3)
            self.metrics.input_to_frame_seconds.observe(latency)
        if chunk.lockstep:
            session.delivered()
            self.wake(session)

    def unsent(self, session: Session, chunk: Chunk) -> None:
        """Connection: `chunk` could not be sent. A lockstep chunk waits for the next connection."""
        if chunk.lockstep and not session.closed and chunk.generation == session.generation:
            session.outbox.put(chunk)

    # ---- leaving

    def detach(self, session: Session, connection: Connection) -> None:
        """The socket dropped: keep the world for `resume_grace_s`, paused."""
        if self._connections.get(session) is not connection or session.closed:
            return
        del self._connections[session]
        if self.settings.resume_grace_s <= 0:
            self.end(session, None, "disconnected")
            return
        session.set_connected(False)
        log.info("session detached", extra={"session": session.id})

    def finish(self, session: Session, connection: Connection) -> None:
        """The client closed with 1000: it is done, so its world goes now (unless another connection took over)."""
        if self._connections.get(session) is connection:
            self.end(session, None, "the client closed the session")

    def end(self, session: Session, code: ErrorCode | None, reason: str) -> None:
        """End a session for good: tell its connection (with `code`), free its world, log its summary."""
        if session.closed:
            return
        with session.lock:
            session.closed = True
        self.worker_for(session.attention).remove(session)
        connection = self._connections.pop(session, None)
        if connection is not None and code is not None:
            connection.close(code, reason)
        self.sessions.pop(session.id, None)
        self._by_token.pop(session.resume_token, None)
        session.outbox.clear()
        session.recent_frames.clear()
        # the world (and its KV cache) is freed by dropping the last reference, on the engine thread's terms:
        # the worker holds none once the session is removed
        self.worker_for(session.attention).call(lambda: setattr(session, "world", None))
        self.metrics.sessions_active.set(len(self.sessions))
        log.info(
            "session end",
            extra={
                "session": session.id,
                "reason": reason,
                "dropped": session.outbox.dropped,
                "seconds": round(time.monotonic() - session.created_at, 1),
                **session.stats.summary(),
            },
        )

    async def reap_forever(self) -> None:
        """Close idle and over-age sessions and forget dropped ones past their grace period."""
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            self.reap(time.monotonic())

    def reap(self, now: float) -> None:
        s = self.settings
        for session in list(self.sessions.values()):
            if now - session.created_at > s.max_session_s:
                self.end(session, ErrorCode.SESSION_EXPIRED, f"the session reached its {s.max_session_s:g} s limit")
            elif session.detached_at is not None and now - session.detached_at > s.resume_grace_s:
                self.end(session, None, "not resumed within the grace period")
            elif session.detached_at is None and now - session.last_message_at > s.idle_timeout_s:
                self.end(session, ErrorCode.IDLE_TIMEOUT, f"no message for {s.idle_timeout_s:g} s")

    async def drain(self) -> None:
        """Shutdown: stop admitting, close every session with SHUTTING_DOWN, wait for their sockets."""
        self.admitting = False
        connections = list(self._connections.values())
        for session in list(self.sessions.values()):
            self.end(session, ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if connections:
            await asyncio.wait(
                [asyncio.ensure_future(c.finished.wait()) for c in connections], timeout=self.settings.shutdown_grace_s
            )

    def info(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "capacity_left": self.capacity_left, "admitting": self.admitting}
