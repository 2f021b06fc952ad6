"""WorldClient: one session on a worldserve server, over protocol v1 (asyncio, websockets, msgpack).

    async with WorldClient.connect("ws://127.0.0.1:8000/ws", mode="lockstep", seed=0) as world:
        frames = await world.step(keys=["KeyW"], dx=4.0)  # exactly world.chunk_frames frames
        frames[-1].image                                 # uint8 (H, W, 3), RGB

    async with WorldClient.connect("ws://127.0.0.1:8000/ws", fps=15) as world:  # realtime
        await world.send_action(keys=["KeyW"])
        async for frame in world.frames():
            ...

How it works, and what it promises (docs/agents.md says the same for users):

- One reader task reads every message. Lockstep frames go to the `step` that asked for them (matched by `seq`) and
  are never dropped. Realtime frames go to a buffer of the newest `frame_buffer` frames: when the program reads
  slower than the server sends, the oldest are dropped and counted in `frames_dropped`, so memory stays bounded.
  The server has its own one-slot outbox (docs/protocol.md §8); this is the same rule on the client's side.
- At most `limits.max_pending_steps` steps are outstanding; further `step` calls wait their turn, so the server
  never answers `too_many_steps`. Every send is paced under `limits.rate_limit_per_s` / `rate_burst`, so the
  server never answers `rate_limited`. Messages are validated before they are sent (pydantic ValueError), so
  `bad_message` and `out_of_order` cannot come from this client either.
- Errors: a fatal `error` raises its typed `WorldError` (client/protocol.py) from every call that is waiting and
  every later one. Requests that the protocol does not answer (`reset`, `set_prompt`, `set_attention`, `pause`,
  `resume`) are followed by a `ping` on the same connection; the server answers in order, so an error that comes
  before that `pong` belongs to the request and is raised from it. A non-fatal error that belongs to no request
  is logged and kept in `errors` (the newest 32).
- Resume (`resume=True`): when the connection drops without a fatal error (or with one whose advice is
  "resume"), the client reconnects with its resume token, with back-off, until `limits.resume_grace_s` has
  passed. Steps waiting for frames get them on the new connection (the server keeps queued steps and the unsent
  rest of a chunk). A request waiting for its `pong` raises `ConnectionLost`, since it may or may not have taken
  effect; so does a `step` whose own send failed half-way. `send_action` is re-sent on the new connection.
  A step lost in transit (written into a connection that died before the server read it) cannot be told apart
  from one still queued: protocol v1 does not report which steps the server holds, and such a step waits forever;
  give `step` a timeout (`asyncio.timeout`) where that matters.
- `close()` closes with 1000: the session is over and the server frees the world at once. After a fatal error it
  waits for the server's close instead, as docs/protocol.md §2.6 asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from client import protocol as p
from client.frame import Frame, encode_init_frame, now_ms
from client.protocol import ConnectionLost, SessionClosed, WorldError

log = logging.getLogger("worldserve.client")

Mode = Literal["realtime", "lockstep"]

CLIENT_DONE = 1000  # closing with this ends the session; any other close or drop leaves it resumable
MAX_SERVER_MESSAGE_BYTES = 2**24  # largest server message read (frames are JPEGs, far smaller)
CLOSE_WAIT_S = 3.0  # how long to wait for the server's side of a close
RESUME_FIRST_DELAY_S = 0.05  # first resume attempt after a drop; the delay doubles up to RESUME_MAX_DELAY_S
RESUME_MAX_DELAY_S = 1.0
PACE_MARGIN = 0.9  # the client sends at most this fraction of the server's rate limit and burst
ERRORS_KEPT = 32


def _settle(future: asyncio.Future) -> None:
    """Mark a failed future's exception as seen when its caller has already gone with another error."""
    if future.done() and not future.cancelled():
        future.exception()


@dataclass
class _Ping:
    """A ping sent and not yet answered; `future` is None for heartbeats, which nobody waits for."""

    future: asyncio.Future[p.Pong] | None
    error: WorldError | None = None  # a non-fatal error that came before the pong: it belongs to this request


@dataclass
class _Step:
    """A lockstep step sent and not yet answered in full."""

    future: asyncio.Future[list[Frame]]
    need: int
    frames: list[Frame] = field(default_factory=list)


class _Pacer:
    """A token bucket just under the server's (docs/protocol.md §7), so this client is never rate-limited."""

    def __init__(self, limits: p.Limits) -> None:
        self.rate = limits.rate_limit_per_s * PACE_MARGIN
        self.burst = max(1.0, limits.rate_burst * PACE_MARGIN)
        self._tokens = self.burst
        self._at = time.monotonic()

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)


class _Connecting:
    """What `WorldClient.connect` returns: `await` it for a client, or `async with` it (closed on leaving)."""

    def __init__(self, opening: Callable[[], Awaitable[WorldClient]]) -> None:
        self._opening = opening
        self._client: WorldClient | None = None

    def __await__(self) -> Generator[Any, None, WorldClient]:
        return self._opening().__await__()

    async def __aenter__(self) -> WorldClient:
        self._client = await self._opening()
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.close()


class WorldClient:
    """One session. Make it with `WorldClient.connect(...)`; see the module docstring for the contract."""

    def __init__(
        self, url: str, hello: p.Hello, *, resume: bool = False, frame_buffer: int = 16, open_timeout_s: float = 10.0
    ) -> None:
        if frame_buffer < 1:
            raise ValueError(f"frame_buffer must be at least 1, got {frame_buffer}")
        self.url = url
        self._hello = hello
        self._auto_resume = resume
        self._open_timeout_s = open_timeout_s
        self.welcome: p.Welcome  # the latest welcome (a resume replaces it)
        self.prompt = hello.prompt  # the session's current settings: from the welcome, then as changed here
        self.seed = 0
        self.attention = ""
        self.frame_index = 0  # index of the next frame, as far as this client knows
        self.frames_dropped = 0  # realtime frames this client dropped because the program read too slowly
        self.resumes = 0  # successful automatic resumes
        self.errors: deque[WorldError] = deque(maxlen=ERRORS_KEPT)  # non-fatal errors that belong to no request
        self._ws: ClientConnection | None = None
        self._frames: deque[Frame] = deque(maxlen=frame_buffer)
        self._frame_ready = asyncio.Event()
        self._steps: dict[int, _Step] = {}
        self._pings: dict[float, _Ping] = {}  # by `t`, in the order sent
        self._step_slots: asyncio.Semaphore | None = None
        self._requests = asyncio.Lock()  # one request (message + ping) at a time, so errors are attributable
        self._pacer: _Pacer | None = None
        self._changed = asyncio.Event()  # set (and replaced) whenever the connection or the failure changes
        self._failure: WorldError | None = None  # set once: the client is finished
        self._fatal: WorldError | None = None  # a fatal error on the current connection, its close to follow
        self._closing = False
        self._seq = -1
        self._last_t = 0.0
        self._last_sent = time.monotonic()
        self._tasks: list[asyncio.Task] = []

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        mode: Mode = "realtime",
        world: Literal["model", "game"] = "model",
        prompt: str = "",
        seed: int | None = None,
        fps: float | None = None,
        attention: str | None = None,
        token: str | None = None,
        init_frame: np.ndarray | bytes | None = None,
        resume: bool = False,
        frame_buffer: int = 16,
        open_timeout_s: float = 10.0,
    ) -> _Connecting:
        """Open a session: hello, then welcome. `await WorldClient.connect(...)` or `async with ...connect(...)`.

        `world="game"` plays the reference game the model was trained on instead of the model (no attention, no
        init frame). `init_frame` is a uint8 (H, W, 3) picture of the server's frame size (or its JPEG).
        `resume=True` resumes the session automatically after a dropped connection. `frame_buffer` is how many
        realtime frames are kept unread before the oldest is dropped. A refusal raises its typed `WorldError`
        (`ServerFull`, `AuthenticationFailed`, `UnknownAttention`, ...); a network failure raises `ConnectionLost`;
        a bad argument raises ValueError at once.
        """
        hello = p.Hello(
            type="hello",
            protocol=p.PROTOCOL_VERSION,
            token=token,
            mode=mode,
            world=world,
            prompt=prompt,
            seed=seed,
            init_frame=None if init_frame is None else encode_init_frame(init_frame),
            fps=None if fps is None else float(fps),
            attention=attention,
        )

        async def opening() -> WorldClient:
            client = cls(url, hello, resume=resume, frame_buffer=frame_buffer, open_timeout_s=open_timeout_s)
            ws, welcome = await client._open(hello, open_timeout_s)
            client._install(ws, welcome)
            client._tasks = [
                asyncio.create_task(client._read(), name=f"worldclient-read-{welcome.session_id}"),
                asyncio.create_task(client._beat(), name=f"worldclient-beat-{welcome.session_id}"),
            ]
            return client

        return _Connecting(opening)

    async def __aenter__(self) -> WorldClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- what the welcome announced

    @property
    def session_id(self) -> str:
        return self.welcome.session_id

    @property
    def mode(self) -> Mode:
        return self.welcome.mode

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of every frame's image."""
        return (self.welcome.frame.height, self.welcome.frame.width, 3)

    @property
    def chunk_frames(self) -> int:
        """Frames per engine step: each `step` returns this many."""
        return self.welcome.chunk_frames

    @property
    def fps(self) -> float:
        return self.welcome.fps

    @property
    def action_keys(self) -> tuple[str, ...]:
        """The key names the model knows (`KeyboardEvent.code`), in the order of its action tensor."""
        return tuple(self.welcome.actions["keys"])

    @property
    def mouse_scale_px(self) -> float:
        """Mouse motion (CSS px) that the model sees as 1.0; larger motion is clamped."""
        return float(self.welcome.actions["mouse"]["scale_px"])

    @property
    def attention_choices(self) -> list[str]:
        return list(self.welcome.attention_choices)

    @property
    def limits(self) -> p.Limits:
        return self.welcome.limits

    @property
    def ws(self) -> ClientConnection | None:
        """The current connection (None while resuming)."""
        return self._ws

    @property
    def closed(self) -> bool:
        """True once the client is finished: closed, or ended by a fatal error or a lost connection."""
        return self._failure is not None

    # ---- realtime

    async def send_action(
        self, keys: Iterable[str] = (), dx: float = 0.0, dy: float = 0.0, buttons: int = 0, *, t: float | None = None
    ) -> int:
        """Send the current input (realtime): every key held now, mouse motion in CSS px since the last action,
        `MouseEvent.buttons`. Returns its seq, which the frames that apply it echo. `t` defaults to `now_ms()`."""
        self._require("realtime", "send_action")
        value = p.Input(keys=list(keys), dx=float(dx), dy=float(dy), buttons=int(buttons))
        sent: list[int] = []

        def build() -> p.Action:
            sent.append(self._next_seq())
            stamp = now_ms() if t is None else float(t)
            return p.Action(type="action", seq=sent[-1], t=stamp, **value.model_dump())

        await self._send(build, retry=True)
        return sent[-1]

    async def next_frame(self) -> Frame:
        """The oldest buffered realtime frame, waiting for one. Raises the client's failure once it has ended
        (`SessionClosed` after `close()`), after the frames that came before it."""
        self._require("realtime", "next_frame")
        while not self._frames:
            if self._failure is not None:
                raise self._failure
            self._frame_ready.clear()
            await self._frame_ready.wait()
        return self._frames.popleft()

    async def frames(self) -> AsyncIterator[Frame]:
        """Realtime frames as they come (see `frame_buffer`); ends when the client is closed, raises on failure."""
        while True:
            try:
                frame = await self.next_frame()
            except SessionClosed:
                return
            yield frame

    # ---- lockstep

    async def step(
        self, keys: Iterable[str] = (), dx: float = 0.0, dy: float = 0.0, buttons: int = 0, *, t: float | None = None
    ) -> list[Frame]:
        """Generate the next chunk under one input (lockstep) and return its `chunk_frames` frames. `dx`/`dy` are
        this step's mouse motion in CSS px. Steps may be awaited concurrently; they run in the order sent."""
        self._require("lockstep", "step")
        action = p.Input(keys=list(keys), dx=float(dx), dy=float(dy), buttons=int(buttons))
        assert self._step_slots is not None
        async with self._step_slots:
            pending = _Step(asyncio.get_running_loop().create_future(), self.chunk_frames)
            seqs: list[int] = []

            def build() -> p.Step:
                seqs.append(self._next_seq())
                self._steps[seqs[-1]] = pending
                return p.Step(type="step", seq=seqs[-1], t=now_ms() if t is None else float(t), action=action)

            try:
                await self._send(build, retry=False)
                return await pending.future
            finally:
                for seq in seqs:
                    self._steps.pop(seq, None)
                _settle(pending.future)

    # ---- both modes

    async def reset(
        self, seed: int | None = None, prompt: str | None = None, init_frame: np.ndarray | bytes | None = None
    ) -> None:
        """A new world with the same mode and attention; a field left None keeps its value (`init_frame`: none).
        Returns once the server has made it; a bad `init_frame` raises `BadInitFrame` and the old world goes on.
        In lockstep, only with no step outstanding (their frames could be lost)."""
        self._require_no_steps("reset")
        frame = None if init_frame is None else encode_init_frame(init_frame)
        await self._request(p.Reset(type="reset", seed=seed, prompt=prompt, init_frame=frame))
        self.seed = self.seed if seed is None else seed
        self.prompt = self.prompt if prompt is None else prompt

    async def set_prompt(self, prompt: str) -> None:
        """Continue the same world under a new prompt."""
        await self._request(p.SetPrompt(type="set_prompt", prompt=prompt))
        self.prompt = prompt

    async def set_attention(self, attention: str) -> None:
        """Continue under another of `attention_choices`: a new cache seeded with the frames shown last, so frame
        indices restart. Unknown names raise `UnknownAttention` (not fatal). Lockstep: no step outstanding."""
        self._require_no_steps("set_attention")
        await self._request(p.SetAttention(type="set_attention", attention=attention))
        self.attention = attention

    async def pause(self) -> None:
        """Stop generating (realtime frames stop; queued steps wait). The client keeps pinging meanwhile."""
        await self._request(p.Pause(type="pause"))

    async def resume(self) -> None:
        """Continue after `pause` (the protocol's `resume` message; unrelated to resuming a dropped session)."""
        await self._request(p.Resume(type="resume"))

    async def ping(self) -> float:
        """Round trip to the server's reader and back, in ms."""
        started = time.perf_counter()
        await self._request(None)
        return (time.perf_counter() - started) * 1e3

    async def close(self) -> None:
        """End the session (close code 1000: the server frees the world at once) and stop the client's tasks.
        Idempotent. Calls waiting at that moment raise `SessionClosed`."""
        if self._closing:
            return
        self._closing = True
        self._notify()
        ws = self._ws
        if ws is not None and self._fatal is None and ws.state is State.OPEN:
            try:
                await asyncio.wait_for(ws.close(CLIENT_DONE), CLOSE_WAIT_S)
            except (TimeoutError, OSError):
                ws.transport.abort()
        if self._tasks:
            reader, beat = self._tasks
            beat.cancel()
            if self._ws is None:  # resuming, or already finished: nothing more to read
                reader.cancel()
            await asyncio.wait([reader], timeout=CLOSE_WAIT_S)  # after a fatal error: the server's close
            reader.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:  # the server did not finish its close in time
            self._ws.transport.abort()
            self._ws = None
        self._finish(SessionClosed("the client closed the session"))

    # ---- connection

    async def _open(self, hello: p.Hello, timeout_s: float) -> tuple[ClientConnection, p.Welcome]:
        """Connect and say hello; returns the connection and its welcome, or raises the refusal's WorldError."""
        try:
            ws = await websockets.connect(
                self.url, max_size=MAX_SERVER_MESSAGE_BYTES, compression=None, open_timeout=timeout_s
            )
        except (OSError, TimeoutError, WebSocketException) as error:
            raise ConnectionLost(f"cannot connect to {self.url}: {error}") from error
        try:
            async with asyncio.timeout(timeout_s):
                await ws.send(p.encode(hello))
                reply = p.decode(await ws.recv())
        except (ConnectionClosed, TimeoutError, ValueError) as error:
            ws.transport.abort()
            raise ConnectionLost(f"no welcome from {self.url}: {error!r}") from error
        except BaseException:  # cancelled: leave nothing open
            ws.transport.abort()
            raise
        if isinstance(reply, p.Welcome) and reply.protocol == p.PROTOCOL_VERSION:
            return ws, reply
        if isinstance(reply, p.Welcome):
            await ws.close(CLIENT_DONE)
            raise p.UnsupportedProtocol(f"the server speaks protocol {reply.protocol}; this client speaks 1")
        ws_error = p.error_from(reply) if isinstance(reply, p.Error) else ConnectionLost(f"expected welcome: {reply}")
        try:  # after a refusal the server closes; closing first with 1000 would end a resumable world
            await asyncio.wait_for(ws.wait_closed(), CLOSE_WAIT_S)
        except TimeoutError:
            ws.transport.abort()
        raise ws_error

    def _install(self, ws: ClientConnection, welcome: p.Welcome) -> None:
        self._ws = ws
        self.welcome = welcome
        self.prompt, self.seed, self.attention = welcome.prompt, welcome.seed, welcome.attention
        if not welcome.resumed:  # on a resume, frames generated before the drop may still be on their way
            self.frame_index = welcome.frame_index
        self._fatal = None
        if self._pacer is None:
            self._pacer = _Pacer(welcome.limits)
            self._step_slots = asyncio.Semaphore(welcome.limits.max_pending_steps)
        self._notify()

    async def _connection(self) -> ClientConnection:
        """The open connection, waiting while a resume is under way; raises the failure once the client ended."""
        while True:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise SessionClosed("the client is closing")
            ws = self._ws
            if ws is not None and ws.state is State.OPEN:
                return ws
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _finish(self, error: WorldError) -> None:
        """The client is done: every waiting call raises `error` (or the first failure, if there was one)."""
        if self._failure is None:
            self._failure = error
        for step in self._steps.values():
            if not step.future.done():
                step.future.set_exception(self._failure)
        self._fail_pings(self._failure)
        self._frame_ready.set()
        self._notify()

    def _fail_pings(self, error: WorldError) -> None:
        for entry in self._pings.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(error)
        self._pings.clear()

    # ---- sending

    def _require(self, mode: Mode, call: str) -> None:
        if self.mode != mode:
            raise RuntimeError(f"{call}() is for {mode} sessions; this one is {self.mode}")

    def _require_no_steps(self, call: str) -> None:
        if self._steps:
            raise RuntimeError(f"{call}() with steps outstanding: their frames could be lost; await them first")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _next_t(self) -> float:
        """A ping `t`: the clock in ms, made unique so that a pong names its ping."""
        self._last_t = max(now_ms(), self._last_t + 1e-3)
        return self._last_t

    async def _send(self, build: Callable[[], p.ClientMessage], *, retry: bool) -> None:
        """Send one message on the open connection. `build` runs right before the write (no await in between), so
        seqs go out in the order they were given. A send that fails half-way is sent again on the resumed
        connection when `retry`, otherwise it raises ConnectionLost: it may or may not have reached the server."""
        assert self._pacer is not None
        await self._pacer.wait()
        while True:
            ws = await self._connection()
            try:
                await ws.send(p.encode(build()))
            except ConnectionClosed:
                if retry:
                    continue
                raise ConnectionLost("the connection dropped while sending; the message may not have arrived") from None
            self._last_sent = time.monotonic()
            return

    async def _request(self, message: p.ClientMessage | None) -> p.Pong:
        """Send `message` and a ping on the same connection and wait for the pong; raises the error that came
        before it (the server answers in order, so it was caused by `message`)."""
        assert self._pacer is not None
        async with self._requests:
            await self._pacer.wait()
            await self._pacer.wait()
            ws = await self._connection()
            t = self._next_t()
            entry = _Ping(asyncio.get_running_loop().create_future())
            self._pings[t] = entry  # before the first write: the reader may run while it drains
            try:
                if message is not None:
                    await ws.send(p.encode(message))
                await ws.send(p.encode(p.Ping(type="ping", t=t)))
            except ConnectionClosed:
                self._pings.pop(t, None)
                _settle(entry.future)
                what = message.type if message is not None else "ping"
                raise ConnectionLost(f"the connection dropped while sending {what}; it may not have arrived") from None
            self._last_sent = time.monotonic()
            return await entry.future

    async def _beat(self) -> None:
        """Ping when nothing was sent for `heartbeat_s`, so an idle session is not closed as idle."""
        while self._failure is None and not self._closing:
            quiet = time.monotonic() - self._last_sent
            if quiet < self.welcome.heartbeat_s:
                await asyncio.sleep(self.welcome.heartbeat_s - quiet)
                continue
            try:
                assert self._pacer is not None
                await self._pacer.wait()
                ws = await self._connection()
                t = self._next_t()
                self._pings[t] = _Ping(None)
                await ws.send(p.encode(p.Ping(type="ping", t=t)))
                self._last_sent = time.monotonic()
            except ConnectionClosed:
                continue  # `_connection` waits for the resume, or raises
            except WorldError:
                return

    # ---- receiving

    async def _read(self) -> None:
        try:
            while True:
                ws = self._ws
                assert ws is not None
                try:
                    async for data in ws:
                        self._dispatch(data)
                except ConnectionClosed:
                    pass
                if not await self._after_drop(ws):
                    return
        except Exception as error:  # a bug here must not leave callers waiting forever
            log.exception("the client's reader failed")
            self._finish(ConnectionLost(f"the client's reader failed: {error!r}"))

    def _dispatch(self, data: bytes | str) -> None:
        if isinstance(data, str):
            log.warning("ignoring a text message from the server")
            return
        try:
            message = p.decode(data)
        except ValueError as error:
            log.warning("ignoring a server message that is not protocol v1: %s", error)
            return
        if isinstance(message, p.Frame):
            self._on_frame(message)
        elif isinstance(message, p.Pong):
            entry = self._pings.pop(message.t, None)
            if entry is not None and entry.future is not None and not entry.future.done():
                if entry.error is not None:
                    entry.future.set_exception(entry.error)
                else:
                    entry.future.set_result(message)
        elif isinstance(message, p.Error):
            self._on_error(p.error_from(message))
        else:
            log.warning("ignoring an unexpected %s", message.type)

    def _on_frame(self, message: p.Frame) -> None:
        frame = Frame(**{name: value for name, value in message if name != "type"}, received_ms=now_ms())
        self.frame_index = message.index + 1
        if self.mode == "lockstep":
            step = self._steps.get(message.seq) if message.seq is not None else None
            if step is None:  # a step given up on (cancelled or timed out)
                log.debug("frame %d answers no outstanding step", message.index)
                return
            step.frames.append(frame)
            if len(step.frames) == step.need and not step.future.done():
                step.future.set_result(step.frames)
            return
        if len(self._frames) == self._frames.maxlen:
            self.frames_dropped += 1
        self._frames.append(frame)
        self._frame_ready.set()

    def _on_error(self, error: WorldError) -> None:
        if error.fatal:
            self._fatal = error
            if not (self._auto_resume and error.reconnect == "resume"):
                self._finish(error)
            return
        oldest = next(iter(self._pings.values()), None)
        if oldest is not None and oldest.future is not None and oldest.error is None:
            oldest.error = error
            return
        self.errors.append(error)
        log.warning("server error: %s", error)

    async def _after_drop(self, ws: ClientConnection) -> bool:
        """The connection ended; returns True when a resumed one replaced it."""
        self._ws = None
        self._notify()
        if self._closing:
            self._finish(SessionClosed("the client closed the session"))
            return False
        if self._failure is not None:
            return False
        if self._fatal is not None and not (self._auto_resume and self._fatal.reconnect == "resume"):
            self._finish(self._fatal)
            return False
        code = ws.close_code
        lost = ConnectionLost(f"the connection closed (code {code})", close_code=code)
        if not self._auto_resume:
            self._finish(lost)
            return False
        return await self._resume_session()

    async def _resume_session(self) -> bool:
        self._fail_pings(
            ConnectionLost("the connection dropped before the server answered; the request may not have taken effect")
        )
        grace = self.welcome.limits.resume_grace_s
        deadline = time.monotonic() + grace
        hello = p.Hello(
            type="hello", protocol=p.PROTOCOL_VERSION, token=self._hello.token, resume_token=self.welcome.resume_token
        )
        delay = RESUME_FIRST_DELAY_S
        while not self._closing:
            await asyncio.sleep(delay)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ws, welcome = await self._open(hello, min(self._open_timeout_s, left))
            except ConnectionLost as error:
                log.info("resume attempt failed: %s", error)
                delay = min(2 * delay, RESUME_MAX_DELAY_S)
                continue
            except WorldError as error:  # refused: resume_failed (the world is gone), shutting_down, ...
                self._finish(error)
                return False
            self._install(ws, welcome)
            self.resumes += 1
            log.info("session %s resumed at frame %d", welcome.session_id, welcome.frame_index)
            return True
        if self._closing:
            self._finish(SessionClosed("the client closed the session"))
        else:
            self._finish(ConnectionLost(f"the connection dropped and was not resumed within {grace:g} s"))
        return False
