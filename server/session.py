"""One session: a player's or agent's world, its latest input, its schedule and its one-slot outbox.

A session outlives its connection: when the socket drops, it waits `resume_grace_s` for a `hello` with its resume
token. Two threads touch it, each through the methods meant for it:

- the event loop (server/connection.py) updates the input, queues lockstep steps and pauses; it owns the outbox;
- the engine worker (server/engine_worker.py) takes an `Order` when the session is due, and owns `world`.

Everything the engine thread reads is guarded by `lock`; the outbox is event-loop only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engine import Action, World
from server.protocol import AppliedInput, Input

Mode = Literal["realtime", "lockstep"]

# `MouseEvent.buttons` bits, as the key names the model may know them by (none of the default model's keys)
BUTTON_KEYS = ("MousePrimary", "MouseSecondary", "MouseAuxiliary", "MouseBack", "MouseForward")


def to_action(value: Input) -> Action:
    buttons = {name for bit, name in enumerate(BUTTON_KEYS) if value.buttons >> bit & 1}
    return Action(frozenset(value.keys) | buttons, value.dx, value.dy)


def applied_input(action: Action) -> AppliedInput:
    """The inverse of `to_action`: the input an engine action applied, as frames report it (keys sorted, buttons as
    bits)."""
    buttons = sum(1 << bit for bit, name in enumerate(BUTTON_KEYS) if name in action.keys)
    keys = sorted(action.keys - set(BUTTON_KEYS))
    return AppliedInput(keys=keys, dx=action.mouse_dx, dy=action.mouse_dy, buttons=buttons)


@dataclass(frozen=True)
class Applied:
    """The input an engine step applied: its action and the seq / client time / arrival of the message it came from
    (None before the first one)."""

    action: Action
    seq: int | None = None
    t: float | None = None
    received_at: float | None = None  # time.monotonic() when the server got the message
    fresh: bool = False  # the first frame that applies this seq: it ends that input's input-to-frame latency


class InputState:
    """The latest realtime input. Held keys are state; mouse motion accumulates until a frame takes it; a key that
    was pressed and released again before the next frame is still held for that frame, so a quick tap is never
    lost. Written by the event loop, taken by the engine thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: frozenset[str] = frozenset()
        self._tapped: set[str] = set()
        self._dx = self._dy = 0.0
        self._seq: int | None = None
        self._t: float | None = None
        self._received_at: float | None = None
        self._taken_seq: int | None = None

    def update(self, value: Input, seq: int, t: float, received_at: float) -> None:
        action = to_action(value)
        with self._lock:
            self._tapped |= action.keys - self._keys
            self._keys = action.keys
            self._dx += action.mouse_dx
            self._dy += action.mouse_dy
            self._seq, self._t, self._received_at = seq, t, received_at

    def take(self) -> Applied:
        with self._lock:
            action = Action(self._keys | self._tapped, self._dx, self._dy)
            fresh = self._seq is not None and self._seq != self._taken_seq
            self._tapped.clear()
            self._dx = self._dy = 0.0
            self._taken_seq = self._seq
            return Applied(action, self._seq, self._t, self._received_at, fresh)


@dataclass(frozen=True)
class Order:
    """One session's part of an engine step."""

    session: Session
    world: World
    applied: Applied
    due_at: float  # time.monotonic() the frame was due (realtime) or its step arrived (lockstep)
    generation: int


@dataclass
class Chunk:
    """What one engine step made for one session, on its way to the socket."""

    generation: int
    first_index: int
    frames: list[np.ndarray]  # uint8 (H, W, 3) each
    applied: Applied
    attention: str
    queue_ms: float
    step_ms: float
    cache_slots: int
    cache_bytes: int
    lockstep: bool
    messages: list[bytes] = field(default_factory=list)  # encoded `frame` messages, filled by the event loop
    encode_ms: float = 0.0


class Outbox:
    """The session's one frame slot: a newer chunk replaces an unsent one, and the replaced frames count as
    dropped, so memory stays bounded however slowly the client reads. Event loop only. The connection currently
    attached to the session takes from it and is woken through `listener`."""

    def __init__(self) -> None:
        self._chunk: Chunk | None = None
        self.listener: asyncio.Event | None = None
        self.dropped = 0

    def put(self, chunk: Chunk) -> int:
        """Queue a chunk; returns how many frames it replaced (0 or the old chunk's length)."""
        replaced = 0
        if self._chunk is not None:
            replaced = len(self._chunk.frames)
            self.dropped += replaced
        self._chunk = chunk
        if self.listener is not None:
            self.listener.set()
        return replaced

    def take(self) -> Chunk | None:
        chunk, self._chunk = self._chunk, None
        return chunk

    def clear(self) -> None:
        self._chunk = None


@dataclass
class SessionStats:
    frames_sent: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # input-to-frame, most recent

    def summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self.latencies_ms)

        def quantile(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None

        return {"frames": self.frames_sent, "latency_ms_p50": quantile(0.5), "latency_ms_p95": quantile(0.95)}


class Session:
    def __init__(
        self,
        session_id: str,
        resume_token: str,
        mode: Mode,
        fps: float,
        attention: str,
        prompt: str,
        seed: int,
        world: World,
        chunk_frames: int,
        prime_frames: int,
    ) -> None:
        self.id = session_id
        self.resume_token = resume_token
        self.mode = mode
        self.fps = fps  # frames per second; one engine step makes `chunk_frames` of them
        self.chunk_frames = chunk_frames
        self.created_at = time.monotonic()
        self.last_message_at = self.created_at
        self.detached_at: float | None = None  # when the socket dropped; None while connected
        self.closed = False
        self.outbox = Outbox()
        self.stats = SessionStats()
        self.input = InputState()
        self.recent_frames: deque[np.ndarray] = deque(maxlen=prime_frames)  # what was shown last (event loop)

        # shared with the engine thread (guarded by `lock`); `world`, `attention`, `prompt` and `seed` are
        # replaced only by jobs running on the engine thread
        self.lock = threading.Lock()
        self.world = world
        self.attention = attention
        self.prompt = prompt
        self.seed = seed
        self.generation = 0  # bumped with every new world, so frames of an old world are never sent
        self.paused = False
        self.connected = True
        self._steps: deque[tuple[int, float, Action, float]] = deque()  # lockstep: (seq, t, action, received_at)
        self._awaiting_delivery = False  # lockstep: a chunk is on its way; the next step waits for it
        self._next_due = self.created_at
        self._stepped_at = self.created_at  # when this session's last step ended

    @property
    def interval(self) -> float:
        """Seconds between two engine steps of this session (realtime)."""
        return self.chunk_frames / self.fps

    # ---- event loop

    def queue_step(self, seq: int, t: float, action: Action, received_at: float, limit: int) -> bool:
        """Queue a lockstep step; False when `limit` steps are already waiting."""
        with self.lock:
            if len(self._steps) >= limit:
                return False
            self._steps.append((seq, t, action, received_at))
            return True

    def set_paused(self, paused: bool) -> None:
        with self.lock:
            self.paused = paused
            self._next_due = time.monotonic()

    def set_connected(self, connected: bool) -> None:
        with self.lock:
            self.connected = connected
            self._next_due = time.monotonic()
        self.detached_at = None if connected else time.monotonic()

    def delivered(self) -> None:
        """A lockstep chunk reached the socket (or was discarded): the next step may run."""
        with self.lock:
            self._awaiting_delivery = False

    # ---- engine thread

    def next_due(self) -> float:
        """When this session next wants a frame (inf: not until something happens)."""
        with self.lock:
            if self.closed or self.paused or not self.connected or self.mode == "lockstep":
                return float("inf")
            return self._next_due

    def take_order(self, now: float, slack: float) -> Order | None:
        """The work for this session if it is due by `now + slack` (realtime) or has a step waiting (lockstep)."""
        with self.lock:
            if self.closed or self.paused or not self.connected:
                return None
            if self.mode == "realtime":
                if now + slack < self._next_due:
                    return None
                # queue time counts from when the frame was due or, when the engine is behind, from when this
                # session's previous step ended: the earliest the engine could have made this frame
                due_at = max(self._next_due, self._stepped_at)
                # keep the average rate; after a stall, start again from now instead of catching up in a burst
                self._next_due = max(self._next_due + self.interval, now - self.interval)
                return Order(self, self.world, self.input.take(), due_at, self.generation)
            if self._awaiting_delivery or not self._steps:
                return None
            seq, t, action, received_at = self._steps.popleft()
            self._awaiting_delivery = True
            return Order(self, self.world, Applied(action, seq, t, received_at, True), received_at, self.generation)

    def stepped(self, at: float) -> None:
        with self.lock:
            self._stepped_at = at

    def replace_world(self, world: World, attention: str, prompt: str, seed: int) -> None:
        """Install a new world (reset, attention switch); pending lockstep steps stay queued for it."""
        with self.lock:
            self.world, self.attention, self.prompt, self.seed = world, attention, prompt, seed
            self.generation += 1
            self._awaiting_delivery = False
            self._next_due = time.monotonic()
