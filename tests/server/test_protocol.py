"""Protocol v1 models: every message round-trips through msgpack; bad bytes get typed errors; the doc covers all."""

from __future__ import annotations

import typing
from pathlib import Path

import msgpack
import pytest

from server import protocol as p

ROOT = Path(__file__).resolve().parents[2]

CLIENT_EXAMPLES = [
    p.Hello(
        type="hello",
        protocol=1,
        token="t",
        mode="lockstep",
        world="game",
        prompt="icy cave",
        seed=7,
        init_frame=b"\xff\xd8jpeg",
        fps=30.0,
        attention="window",
        resume_token="r",
    ),
    p.Hello(type="hello", protocol=1),
    p.Action(type="action", seq=3, t=12.5, keys=["KeyW", "ArrowLeft"], dx=-4.0, dy=2.5, buttons=1),
    p.Step(type="step", seq=4, t=1.0, action=p.Input(keys=["KeyS"], dx=1.0)),
    p.Reset(type="reset", seed=1, prompt="neon grid", init_frame=b"\xff\xd8"),
    p.SetPrompt(type="set_prompt", prompt="wooden cabin"),
    p.SetAttention(type="set_attention", attention="dense"),
    p.Pause(type="pause"),
    p.Resume(type="resume"),
    p.Ping(type="ping", t=99.0),
]

LIMITS = p.Limits(
    max_message_bytes=1024,
    rate_limit_per_s=10.0,
    rate_burst=20,
    max_pending_steps=4,
    idle_timeout_s=60.0,
    max_session_s=600.0,
    resume_grace_s=30.0,
    max_fps=60.0,
)
SERVER_EXAMPLES = [
    p.Welcome(
        session_id="abc",
        resume_token="tok",
        resumed=False,
        paused=False,
        world="model",
        mode="realtime",
        frame=p.FrameSpec(height=64, width=64),
        actions={"keys": ["KeyW"], "mouse": {"scale_px": 20.0}},
        chunk_frames=1,
        fps=15.0,
        frame_index=0,
        attention="tempcache",
        attention_choices=["tempcache", "dense"],
        prompt="",
        seed=3,
        heartbeat_s=10.0,
        limits=LIMITS,
    ),
    p.Frame(
        index=5,
        seq=2,
        t=1.5,
        attention="dense",
        timings=p.Timings(queue_ms=1.0, step_ms=20.0, encode_ms=0.1),
        cache=p.CacheInfo(slots=96, bytes=1 << 20),
        dropped=0,
        input=p.AppliedInput(keys=["KeyW"], dx=3.0, dy=0.0, buttons=1),
        jpeg=b"\xff\xd8\xff",
    ),
    p.Pong(t=1.0, server_time=2.0),
    p.Error(code=p.ErrorCode.RATE_LIMITED, message="slow down", fatal=False),
]


def _types(union: object) -> set[str]:
    members = typing.get_args(typing.get_args(union)[0]) if typing.get_origin(union) is typing.Annotated else ()
    members = members or typing.get_args(union)
    return {m.model_fields["type"].annotation.__args__[0] for m in members}


def test_examples_cover_every_message_type() -> None:
    assert {m.type for m in CLIENT_EXAMPLES} == _types(p.ClientMessage) == p.CLIENT_TYPES
    assert {m.type for m in SERVER_EXAMPLES} == _types(p.ServerMessage)


@pytest.mark.parametrize("message", CLIENT_EXAMPLES, ids=lambda m: m.type)
def test_client_messages_round_trip(message: p.BaseModel) -> None:
    data = p.encode(message)
    assert isinstance(msgpack.unpackb(data), dict)
    assert p.decode_client(data, max_bytes=4096) == message


@pytest.mark.parametrize("message", SERVER_EXAMPLES, ids=lambda m: m.type)
def test_server_messages_round_trip(message: p.BaseModel) -> None:
    data = p.encode(message)
    raw = msgpack.unpackb(data)
    assert raw["type"] == message.type
    if message.type == "frame":
        assert isinstance(raw["jpeg"], bytes)  # binary, not a list of ints or base64
    assert p.decode_server(data) == message


def test_action_input_ignores_the_envelope() -> None:
    action = p.Action(type="action", seq=1, t=0.0, keys=["KeyW"], dx=2.0, buttons=4)
    assert action.input() == p.Input(keys=["KeyW"], dx=2.0, buttons=4)


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"\xc1", p.ErrorCode.BAD_MESSAGE, "msgpack"),
        (msgpack.packb([1, 2]), p.ErrorCode.BAD_MESSAGE, "expected a map"),
        (msgpack.packb({"type": "teleport"}), p.ErrorCode.UNKNOWN_TYPE, "teleport"),
        (msgpack.packb({"seq": 1}), p.ErrorCode.UNKNOWN_TYPE, "None"),
        (msgpack.packb({"type": "action", "seq": "1", "t": 0}), p.ErrorCode.BAD_MESSAGE, "seq"),
        (msgpack.packb({"type": "action", "seq": 1}), p.ErrorCode.BAD_MESSAGE, "t"),
        (msgpack.packb({"type": "action", "seq": -1, "t": 0}), p.ErrorCode.BAD_MESSAGE, "seq"),
        (msgpack.packb({"type": "action", "seq": 1, "t": 0, "warp": 9}), p.ErrorCode.BAD_MESSAGE, "warp"),
        (msgpack.packb({"type": "action", "seq": 1, "t": float("nan")}), p.ErrorCode.BAD_MESSAGE, "t"),
        (msgpack.packb({"type": "action", "seq": 1, "t": 0, "dx": 1e9}), p.ErrorCode.BAD_MESSAGE, "dx"),
        (msgpack.packb({"type": "action", "seq": 1, "t": 0, "keys": ["K"] * 40}), p.ErrorCode.BAD_MESSAGE, "keys"),
        (msgpack.packb({"type": "step", "seq": 1, "action": [1]}), p.ErrorCode.BAD_MESSAGE, "action"),
        (msgpack.packb({"type": "hello", "protocol": 1, "mode": "turbo"}), p.ErrorCode.BAD_MESSAGE, "mode"),
        (msgpack.packb({"type": "ping", "t": "now"}), p.ErrorCode.BAD_MESSAGE, "t"),
        (msgpack.packb({"type": "set_prompt", "prompt": "x" * 5000}), p.ErrorCode.BAD_MESSAGE, "msgpack"),
        (msgpack.packb({"type": "ping", "t": 0, "x": list(range(100))}), p.ErrorCode.BAD_MESSAGE, "max_array_len"),
        (msgpack.packb({"type": "ping"}) + b"\x00", p.ErrorCode.BAD_MESSAGE, "msgpack"),
        (msgpack.packb({1: 2}), p.ErrorCode.BAD_MESSAGE, "msgpack"),
        (b"\xd4\x01\x00", p.ErrorCode.BAD_MESSAGE, "msgpack"),  # an ext type
    ],
)
def test_bad_messages_get_typed_non_fatal_errors(data: bytes, code: p.ErrorCode, words: str) -> None:
    with pytest.raises(p.ProtocolError) as raised:
        p.decode_client(data, max_bytes=4096)
    assert raised.value.code == code
    assert words in raised.value.message
    assert not raised.value.fatal


def test_text_frames_are_refused() -> None:
    with pytest.raises(p.ProtocolError, match="binary"):
        p.decode_client('{"type": "ping"}', max_bytes=4096)


def test_binary_fields_are_bounded_by_the_message_limit() -> None:
    big = p.encode(p.Reset(type="reset", init_frame=b"\x00" * 3000))
    assert p.decode_client(big, max_bytes=4096).init_frame == b"\x00" * 3000
    with pytest.raises(p.ProtocolError):
        p.decode_client(big, max_bytes=2048)


def test_every_fatal_code_has_a_documented_close_and_reconnect_rule() -> None:
    assert set(p.FATAL.values()) <= set(p.CloseCode)
    assert set(p.RECONNECT) == set(p.CloseCode)
    assert all(rule in {"no", "later", "new", "resume"} for rule in p.RECONNECT.values())
    assert all(4000 <= code < 5000 for code in p.CloseCode)
    assert p.ProtocolError(p.ErrorCode.SERVER_FULL, "x").fatal
    assert not p.ProtocolError(p.ErrorCode.OUT_OF_ORDER, "x").fatal


def test_protocol_doc_covers_every_message_error_and_close_code() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for kind in p.CLIENT_TYPES | _types(p.ServerMessage):
        assert f"`{kind}`" in doc, kind
    for code in p.ErrorCode:
        assert f"`{code.value}`" in doc, code
    for code in p.CloseCode:
        assert str(int(code)) in doc, code
