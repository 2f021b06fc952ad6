"""client/protocol.py mirrors server/protocol.py one-to-one: the same messages, fields, types, bounds and defaults,
the same codes; messages from either side decode on the other; and the SDK imports neither `server` nor `engine`."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from client import protocol as c
from server import protocol as s

ROOT = Path(__file__).resolve().parents[2]


def models(module) -> dict[str, type[BaseModel]]:
    return {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, BaseModel) and value.__module__ == module.__name__
    }


def _strip_descriptions(schema: Any) -> Any:
    """Docstrings become JSON-schema descriptions; the mirror need not copy prose."""
    if isinstance(schema, dict):
        return {k: _strip_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_strip_descriptions(v) for v in schema]
    return schema


def _same_text(value: Any) -> str:
    return repr(value).replace("client.protocol.", "").replace("server.protocol.", "")


def test_the_same_models_exist() -> None:
    assert sorted(models(c)) == sorted(models(s))


@pytest.mark.parametrize("name", sorted(models(s)))
def test_each_model_has_the_same_fields(name: str) -> None:
    mine, theirs = models(c)[name], models(s)[name]
    assert mine.model_config == theirs.model_config
    assert [b.__name__ for b in mine.__mro__[1:3]] == [b.__name__ for b in theirs.__mro__[1:3]]
    assert list(mine.model_fields) == list(theirs.model_fields)
    for field, theirs_info in theirs.model_fields.items():
        mine_info = mine.model_fields[field]
        where = f"{name}.{field}"
        assert _same_text(mine_info.annotation) == _same_text(theirs_info.annotation), where
        assert mine_info.is_required() == theirs_info.is_required(), where
        assert _same_text(mine_info.metadata) == _same_text(theirs_info.metadata), where
        if not theirs_info.is_required():
            mine_default = mine_info.get_default(call_default_factory=True)
            theirs_default = theirs_info.get_default(call_default_factory=True)
            assert _same_text(mine_default) == _same_text(theirs_default), where
    assert _strip_descriptions(mine.model_json_schema()) == _strip_descriptions(theirs.model_json_schema())


def test_codes_and_constants_are_the_same() -> None:
    assert {e.name: e.value for e in c.ErrorCode} == {e.name: e.value for e in s.ErrorCode}
    assert {e.name: e.value for e in c.CloseCode} == {e.name: e.value for e in s.CloseCode}
    assert {k.name: v for k, v in c.RECONNECT.items()} == {k.name: v for k, v in s.RECONNECT.items()}
    assert {k.name: v.name for k, v in c.FATAL.items()} == {k.name: v.name for k, v in s.FATAL.items()}
    assert c.CLIENT_TYPES == s.CLIENT_TYPES
    for name in ("PROTOCOL_VERSION", "MAX_STRING_BYTES", "MAX_ARRAY_ITEMS", "MAX_MAP_ITEMS", "MAX_KEYS_HELD"):
        assert getattr(c, name) == getattr(s, name), name
    assert c.MAX_PROMPT_CHARS == s.MAX_PROMPT_CHARS
    union = [m.__name__ for m in c.ClientMessage.__origin__.__args__]
    assert union == [m.__name__ for m in s.ClientMessage.__origin__.__args__]
    assert [m.__name__ for m in c.ServerMessage.__args__] == [m.__name__ for m in s.ServerMessage.__args__]


def test_every_error_code_has_its_exception() -> None:
    assert set(c.ERRORS) == set(c.ErrorCode)
    for code, cls in c.ERRORS.items():
        error = c.error_from(c.Error(code=code, message="m", fatal=code in c.FATAL))
        assert type(error) is cls and issubclass(cls, c.WorldError) and error.code == code
        assert error.close_code == (c.FATAL.get(code)) and error.reconnect == c.RECONNECT.get(error.close_code)


CLIENT_MESSAGES = [
    c.Hello(type="hello", protocol=1, token="t", mode="lockstep", prompt="p", seed=7, init_frame=b"\xff\xd8", fps=30.0),
    c.Hello(type="hello", protocol=1, resume_token="r", attention="window"),
    c.Action(type="action", seq=3, t=12.5, keys=["KeyW", "ArrowLeft"], dx=-4.0, dy=2.5, buttons=1),
    c.Step(type="step", seq=4, t=1.0, action=c.Input(keys=["KeyS"], dx=1.0)),
    c.Step(type="step", seq=5),
    c.Reset(type="reset", seed=1, prompt="neon grid", init_frame=b"\xff\xd8"),
    c.Reset(type="reset"),
    c.SetPrompt(type="set_prompt", prompt="wooden cabin"),
    c.SetAttention(type="set_attention", attention="dense"),
    c.Pause(type="pause"),
    c.Resume(type="resume"),
    c.Ping(type="ping", t=99.0),
]


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: m.type)
def test_client_messages_are_what_the_server_reads(message: BaseModel) -> None:
    decoded = s.decode_client(c.encode(message), max_bytes=2**20)
    assert type(decoded).__name__ == type(message).__name__
    assert decoded.model_dump() == message.model_dump()


def test_server_messages_are_what_the_client_reads() -> None:
    limits = dict(max_message_bytes=1024, rate_limit_per_s=10.0, rate_burst=20, max_pending_steps=4)
    limits |= dict(idle_timeout_s=60.0, max_session_s=600.0, resume_grace_s=30.0, max_fps=60.0)
    sent = [
        s.Welcome(
            session_id="abc",
            resume_token="tok",
            resumed=False,
            paused=False,
            world="model",
            mode="lockstep",
            frame=s.FrameSpec(height=64, width=64),
            actions={"keys": ["KeyW"], "mouse": {"scale_px": 20.0, "range": [-1.0, 1.0]}},
            chunk_frames=1,
            fps=15.0,
            frame_index=0,
            attention="tempcache",
            attention_choices=["tempcache", "dense"],
            prompt="",
            seed=3,
            heartbeat_s=10.0,
            limits=s.Limits(**limits),
        ),
        s.Frame(
            index=5,
            seq=None,
            t=None,
            attention="dense",
            timings=s.Timings(queue_ms=0.5, step_ms=20.0, encode_ms=0.3),
            cache=s.CacheInfo(slots=64, bytes=1024),
            dropped=2,
            input=s.AppliedInput(keys=["KeyW", "ShiftLeft"], dx=-2.5, dy=0.0, buttons=0),
            jpeg=b"\xff\xd8\xff\xd9",
        ),
        s.Pong(t=1.5, server_time=1.7e9),
        s.Error(code=s.ErrorCode.TOO_MANY_STEPS, message="full", fatal=False),
    ]
    for message in sent:
        decoded = c.decode(s.encode(message))
        assert type(decoded).__name__ == type(message).__name__
        assert decoded.model_dump() == message.model_dump()


def test_the_sdk_imports_neither_server_nor_engine() -> None:
    code = (
        "import sys, client, client.world_env, client.world_client, client.protocol\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'server', 'engine', 'torch', 'fastapi'})\n"
        "assert not bad, bad\n"
        "import client as c; assert 'gymnasium' in sys.modules and c.WorldEnv.__name__ == 'WorldEnv'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
