"""Bad input on a real server: each gets its documented error or close, and other sessions never notice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack
import pytest
import websockets

from server.protocol import CloseCode, ErrorCode
from tests.server.conftest import Client, run_server


async def _count_frames(client: Client, seconds: float) -> int:
    count, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await client.recv(timeout=left)
        except TimeoutError:
            break
        count += message.type == "frame"
    return count


async def test_malformed_messages_get_errors_and_the_session_goes_on(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server, server.connect() as client:
        await client.hello(mode="lockstep", seed=0)
        bad = [
            (b"\xc1\xc1", ErrorCode.BAD_MESSAGE),
            (msgpack.packb([1, 2, 3]), ErrorCode.BAD_MESSAGE),
            (msgpack.packb({"type": "step", "seq": "one"}), ErrorCode.BAD_MESSAGE),
            (msgpack.packb({"type": "fly"}), ErrorCode.UNKNOWN_TYPE),
            (msgpack.packb({"type": "action", "seq": 1, "t": 0.0}), ErrorCode.OUT_OF_ORDER),  # realtime only
            (msgpack.packb({"type": "hello", "protocol": 1}), ErrorCode.OUT_OF_ORDER),
        ]
        for data, code in bad:
            await client.ws.send(data)
            error = await client.recv()
            assert (error.type, error.code, error.fatal) == ("error", code, False), error
        await client.ws.send('{"type": "ping"}')  # a text frame
        assert (await client.recv()).code == ErrorCode.BAD_MESSAGE

        await client.send(type="step", seq=5)
        assert (await client.frames(1))[0].seq == 5
        await client.send(type="step", seq=5)  # seq must increase
        assert (await client.recv()).code == ErrorCode.OUT_OF_ORDER
        await client.send(type="step", seq=6)
        assert (await client.frames(1))[0].index == server.state.settings.game_start_frames + 1
        metrics = (await server.get("/metrics")).text
        assert 'worldserve_protocol_errors_total{code="bad_message"} 4.0' in metrics


@pytest.mark.parametrize(
    ("hello", "code", "close"),
    [
        ({"type": "step", "seq": 0}, ErrorCode.BAD_HELLO, CloseCode.BAD_HELLO),
        ({"type": "hello"}, ErrorCode.BAD_HELLO, CloseCode.BAD_HELLO),
        ({"type": "hello", "protocol": 2}, ErrorCode.UNSUPPORTED_PROTOCOL, CloseCode.UNSUPPORTED_PROTOCOL),
        ({"type": "hello", "protocol": 1, "token": "guess"}, ErrorCode.BAD_TOKEN, CloseCode.BAD_TOKEN),
        ({"type": "hello", "protocol": 1}, ErrorCode.BAD_TOKEN, CloseCode.BAD_TOKEN),
        (
            {"type": "hello", "protocol": 1, "token": "s3cret", "attention": "magic"},
            ErrorCode.UNKNOWN_ATTENTION,
            CloseCode.BAD_HELLO,
        ),
        (
            {"type": "hello", "protocol": 1, "token": "s3cret", "init_frame": b"png?"},
            ErrorCode.BAD_INIT_FRAME,
            CloseCode.BAD_HELLO,
        ),
        (
            {"type": "hello", "protocol": 1, "token": "s3cret", "resume_token": "forged"},
            ErrorCode.RESUME_FAILED,
            CloseCode.RESUME_FAILED,
        ),
    ],
)
async def test_bad_hello_is_refused_with_its_close_code(
    tiny_engine, tiny_config_file: Path, hello: dict, code: ErrorCode, close: CloseCode
) -> None:
    async with run_server(tiny_engine, tiny_config_file, token="s3cret") as server, server.connect() as client:
        await client.send(**hello)
        error = await client.recv()
        assert (error.type, error.code, error.fatal) == ("error", code, True)
        assert await client.closed() == close
        assert not server.state.manager.sessions


async def test_right_token_is_admitted(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, token="s3cret") as server, server.connect() as client:
        assert (await client.hello(token="s3cret")).type == "welcome"
        info = (await server.get("/api/info")).json()
        assert info["token_required"] is True and "s3cret" not in str(info)


async def test_foreign_origin_is_refused_at_the_handshake(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, allowed_origins=["https://play.example"]) as server:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with server.connect(origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        for origin in ("https://play.example", f"http://127.0.0.1:{server.server.port}", None):
            async with server.connect(origin=origin) as client:
                assert (await client.hello()).type == "welcome"
        assert 'worldserve_sessions_refused_total{reason="origin"} 1.0' in (await server.get("/metrics")).text


async def test_oversized_message_closes_with_1009_and_the_world_can_resume(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, max_message_bytes=2048) as server:
        async with server.connect() as client:
            welcome = await client.hello(mode="lockstep")
            await client.send(type="set_prompt", prompt="x" * 10, junk=b"\x00" * 4096)
            assert await client.closed() == 1009
        async with server.connect() as client:
            resumed = await client.hello(resume_token=welcome.resume_token)
            assert resumed.type == "welcome" and resumed.resumed and resumed.session_id == welcome.session_id


async def test_flood_is_cut_off_and_other_sessions_keep_their_rate(tiny_engine, tiny_config_file: Path) -> None:
    settings = {"rate_limit_per_s": 50.0, "rate_burst": 20}
    async with run_server(tiny_engine, tiny_config_file, **settings) as server, server.connect() as calm:
        await calm.hello(mode="realtime", fps=20)
        await calm.frames(3)
        async with server.connect() as flooder:
            await flooder.hello(mode="realtime", fps=20)
            ping = msgpack.packb({"type": "ping", "t": 0.0})
            for _ in range(30):  # over the burst: some are refused, with one rate_limited error
                await flooder.ws.send(ping)
            error = await flooder.recv_until("error")
            assert error.code == ErrorCode.RATE_LIMITED and not error.fatal

            async def flood() -> None:
                try:
                    while True:
                        await flooder.ws.send(ping)
                        await asyncio.sleep(0)
                except websockets.ConnectionClosed:
                    pass

            flooding = asyncio.create_task(flood())
            frames = await _count_frames(calm, 2.0)
            fatal = await flooder.recv_until("error")
            assert fatal.code == ErrorCode.FLOOD and fatal.fatal
            assert await flooder.closed() == CloseCode.FLOOD
            await flooding
        assert frames >= 0.7 * 20 * 2.0, frames
