"""Protocol v1 on `/ws`: every wire message, as typed models (docs/protocol.md is the prose version).

Each WebSocket message is one binary frame holding one msgpack map with a `type` field. The clients (the browser
page and the Python SDK under client/) mirror these models one-to-one and invent no messages of their own.

    client -> server: hello, action, step, reset, set_prompt, set_attention, pause, resume, ping
    server -> client: welcome, frame, pong, error

`decode_client` turns bytes into a model or raises `ProtocolError` with a code from `ErrorCode`; `encode` turns a
server model into bytes. Nothing here knows about sessions or the engine.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1

# Bounds of what a client may send, enforced while unpacking (before validation) so that a small message cannot
# expand into a large object.
MAX_STRING_BYTES = 4096
MAX_ARRAY_ITEMS = 64
MAX_MAP_ITEMS = 32
MAX_KEYS_HELD = 32
MAX_PROMPT_CHARS = 1000


class ErrorCode(StrEnum):
    BAD_MESSAGE = "bad_message"  # not msgpack, not a map, or fields of the wrong type
    UNKNOWN_TYPE = "unknown_type"  # a `type` this protocol version does not have
    OUT_OF_ORDER = "out_of_order"  # valid, but not now (a second hello, step in realtime mode, ...)
    BAD_HELLO = "bad_hello"  # the first message is not a valid hello
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    BAD_TOKEN = "bad_token"
    BAD_INIT_FRAME = "bad_init_frame"  # not a JPEG of the announced frame size
    UNKNOWN_ATTENTION = "unknown_attention"
    TOO_MANY_STEPS = "too_many_steps"  # lockstep queue full; this step is dropped
    RATE_LIMITED = "rate_limited"  # messages over the rate limit are dropped
    FLOOD = "flood"  # far over the rate limit: the connection is closed
    SERVER_FULL = "server_full"
    RESUME_FAILED = "resume_failed"  # unknown or expired resume token
    IDLE_TIMEOUT = "idle_timeout"
    SESSION_EXPIRED = "session_expired"  # the maximum session length was reached
    SHUTTING_DOWN = "shutting_down"
    REPLACED = "replaced"  # another connection resumed this session
    ENGINE_ERROR = "engine_error"  # the engine failed to step this world


class CloseCode(IntEnum):
    """WebSocket close codes the server uses; `RECONNECT` says what a client should do after each."""

    BAD_HELLO = 4000
    BAD_TOKEN = 4001
    UNSUPPORTED_PROTOCOL = 4002
    RESUME_FAILED = 4004
    FLOOD = 4008
    SERVER_FULL = 4009
    IDLE_TIMEOUT = 4010
    SESSION_EXPIRED = 4011
    SHUTTING_DOWN = 4012
    REPLACED = 4013
    ENGINE_ERROR = 4014


# "no": the same request fails again; "later": retry with back-off and a fresh hello; "new": a fresh hello now
# (the old world is gone); "resume": hello with the resume token within the grace period continues the world.
RECONNECT: dict[CloseCode, str] = {
    CloseCode.BAD_HELLO: "no",
    CloseCode.BAD_TOKEN: "no",
    CloseCode.UNSUPPORTED_PROTOCOL: "no",
    CloseCode.RESUME_FAILED: "new",
    CloseCode.FLOOD: "resume",
    CloseCode.SERVER_FULL: "later",
    CloseCode.IDLE_TIMEOUT: "new",
    CloseCode.SESSION_EXPIRED: "new",
    CloseCode.SHUTTING_DOWN: "later",
    CloseCode.REPLACED: "no",
    CloseCode.ENGINE_ERROR: "new",
}

# Fatal errors end the connection with this close code; every other code is answered and the session goes on.
FATAL: dict[ErrorCode, CloseCode] = {
    ErrorCode.BAD_HELLO: CloseCode.BAD_HELLO,
    ErrorCode.UNSUPPORTED_PROTOCOL: CloseCode.UNSUPPORTED_PROTOCOL,
    ErrorCode.BAD_TOKEN: CloseCode.BAD_TOKEN,
    ErrorCode.BAD_INIT_FRAME: CloseCode.BAD_HELLO,
    ErrorCode.UNKNOWN_ATTENTION: CloseCode.BAD_HELLO,
    ErrorCode.FLOOD: CloseCode.FLOOD,
    ErrorCode.SERVER_FULL: CloseCode.SERVER_FULL,
    ErrorCode.RESUME_FAILED: CloseCode.RESUME_FAILED,
    ErrorCode.IDLE_TIMEOUT: CloseCode.IDLE_TIMEOUT,
    ErrorCode.SESSION_EXPIRED: CloseCode.SESSION_EXPIRED,
    ErrorCode.SHUTTING_DOWN: CloseCode.SHUTTING_DOWN,
    ErrorCode.REPLACED: CloseCode.REPLACED,
    ErrorCode.ENGINE_ERROR: CloseCode.ENGINE_ERROR,
}


class ProtocolError(Exception):
    """A message the server cannot use. `fatal` errors close the connection (with `close_code`)."""

    def __init__(self, code: ErrorCode, message: str, fatal: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = FATAL.get(code)
        self.fatal = self.close_code is not None if fatal is None else fatal


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Seq = Annotated[int, Field(ge=0, lt=2**53)]
Millis = Annotated[float, Field(allow_inf_nan=False)]
Mouse = Annotated[float, Field(ge=-1e4, le=1e4, allow_inf_nan=False)]
KeyName = Annotated[str, Field(min_length=1, max_length=64)]


class Input(_Message):
    """What the player holds and moves: W3C `KeyboardEvent.code` names, mouse motion in CSS px since the last
    input, and `MouseEvent.buttons` (bit 0 primary, 1 secondary, 2 auxiliary)."""

    keys: list[KeyName] = Field(default_factory=list, max_length=MAX_KEYS_HELD)
    dx: Mouse = 0.0
    dy: Mouse = 0.0
    buttons: int = Field(0, ge=0, le=31)


# ---- client -> server


class Hello(_Message):
    type: Literal["hello"]
    protocol: int
    token: str | None = Field(None, max_length=512)
    mode: Literal["realtime", "lockstep"] = "realtime"
    world: Literal["model", "game"] = "model"  # the world model, or the reference game it was trained on
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, lt=2**63)
    init_frame: bytes | None = None  # JPEG of the announced frame size: the world starts from this picture
    fps: float | None = Field(None, gt=0, le=1000)
    attention: str | None = Field(None, max_length=64)
    resume_token: str | None = Field(None, max_length=128)


class Action(Input):
    """Realtime mode: the current input state, sent on change; the server keeps only the latest (held keys are
    state, mouse motion accumulates until a frame consumes it)."""

    type: Literal["action"]
    seq: Seq
    t: Millis  # client clock (ms), echoed in every frame that applies this action (until a newer one)

    def input(self) -> Input:
        return Input(keys=self.keys, dx=self.dx, dy=self.dy, buttons=self.buttons)


class Step(_Message):
    """Lockstep mode: generate the next chunk under this input; answered by exactly `chunk_frames` frames."""

    type: Literal["step"]
    seq: Seq
    t: Millis = 0.0  # client clock (ms), echoed in the step's frames
    action: Input = Field(default_factory=Input)


class Reset(_Message):
    """Start a new world (same mode and attention); omitted fields keep their current value."""

    type: Literal["reset"]
    seed: int | None = Field(None, ge=0, lt=2**63)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    init_frame: bytes | None = None


class SetPrompt(_Message):
    type: Literal["set_prompt"]
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)


class SetAttention(_Message):
    """Switch the attention configuration; the new cache is seeded with the frames shown last."""

    type: Literal["set_attention"]
    attention: str = Field(max_length=64)


class Pause(_Message):
    type: Literal["pause"]


class Resume(_Message):
    type: Literal["resume"]


class Ping(_Message):
    type: Literal["ping"]
    t: Millis = 0.0


ClientMessage = Annotated[
    Hello | Action | Step | Reset | SetPrompt | SetAttention | Pause | Resume | Ping, Field(discriminator="type")
]
_client = TypeAdapter(ClientMessage)
CLIENT_TYPES = frozenset(
    model.model_fields["type"].annotation.__args__[0]
    for model in (Hello, Action, Step, Reset, SetPrompt, SetAttention, Pause, Resume, Ping)
)


# ---- server -> client


class FrameSpec(_Message):
    height: int
    width: int
    channels: int = 3
    encoding: Literal["jpeg"] = "jpeg"


class Limits(_Message):
    max_message_bytes: int
    rate_limit_per_s: float
    rate_burst: int
    max_pending_steps: int
    idle_timeout_s: float
    max_session_s: float
    resume_grace_s: float
    max_fps: float


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    protocol: int = PROTOCOL_VERSION
    session_id: str
    resume_token: str
    resumed: bool  # True: this continues an existing world (frame index and settings as they were)
    paused: bool  # the world is paused (a resumed session keeps its pause)
    world: Literal["model", "game"]
    mode: Literal["realtime", "lockstep"]
    frame: FrameSpec
    actions: dict[str, Any]  # the engine's action spec: keys, mouse scale, tensor layout
    chunk_frames: int
    fps: float
    frame_index: int  # index of the next frame
    attention: str
    attention_choices: list[str]
    prompt: str
    seed: int
    heartbeat_s: float
    limits: Limits


class Timings(_Message):
    # from when the frame was due (realtime: its scheduled time, or the end of the session's previous step if the
    # engine is behind; lockstep: the step's arrival) to the start of the engine step that made it
    queue_ms: float
    step_ms: float  # the engine step (the whole batch it was part of)
    encode_ms: float  # JPEG encoding per frame (the mean over the step's chunk)


class CacheInfo(_Message):
    slots: int  # KV cache slots in use, summed over layers
    bytes: int  # KV cache memory allocated for this world


class AppliedInput(_Message):
    """The input a frame applied: the keys held and tapped since the frame before, `MouseEvent.buttons` bits, and
    the mouse motion it took (realtime); a step's input (lockstep). Unbounded: taps and motion accumulate between
    two frames, so it may hold more than one `action` may send."""

    keys: list[str]
    dx: float
    dy: float
    buttons: int


class Frame(_Message):
    type: Literal["frame"] = "frame"
    index: int  # frame index in this world: frames so far, counting init and seed frames (see docs/protocol.md)
    seq: int | None  # seq of the last action (realtime) or the step (lockstep) applied; None before any
    t: float | None  # the client timestamp of that action, echoed
    attention: str
    timings: Timings
    cache: CacheInfo
    dropped: int  # frames of this session replaced before they were sent, up to when this frame was made
    input: AppliedInput
    jpeg: bytes


class Pong(_Message):
    type: Literal["pong"] = "pong"
    t: float  # the ping's client timestamp, echoed
    server_time: float  # server wall clock (Unix seconds)


class Error(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    fatal: bool


ServerMessage = Welcome | Frame | Pong | Error


def unpack(data: bytes, max_bytes: int) -> Any:
    """msgpack bytes -> Python objects, with size limits on every container and string."""
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_bin_len=max_bytes,
        max_str_len=MAX_STRING_BYTES,
        max_array_len=MAX_ARRAY_ITEMS,
        max_map_len=MAX_MAP_ITEMS,
        max_ext_len=0,
    )


def decode_client(data: bytes | str, max_bytes: int) -> ClientMessage:
    """Validate one client message; raises ProtocolError (BAD_MESSAGE or UNKNOWN_TYPE) naming what is wrong."""
    if isinstance(data, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "messages must be binary msgpack, not text", fatal=False)
    try:
        obj = unpack(data, max_bytes)
    except Exception as error:  # msgpack raises several types for malformed or over-limit input
        reason = f"{type(error).__name__}: {error}".rstrip(": ")
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a valid msgpack message ({reason})", fatal=False) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"expected a map, got {type(obj).__name__}", fatal=False)
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", fatal=False)
    try:
        return _client.validate_python(obj)
    except ValidationError as error:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad {kind}: {_first_problem(error)}", fatal=False) from None


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"][1:]) or "message"
    return f"{where}: {problem['msg']}"


def encode(message: ServerMessage | ClientMessage) -> bytes:
    """A model -> one msgpack map (bytes fields stay binary)."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


_server = TypeAdapter(Annotated[ServerMessage, Field(discriminator="type")])


def decode_server(data: bytes) -> ServerMessage:
    """Parse a server message (for clients and tests)."""
    return _server.validate_python(msgpack.unpackb(data, raw=False), strict=False)
