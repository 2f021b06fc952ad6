"""Session life cycle on a real server: admission, idle timeout, resume, slow readers, engine failures, shutdown."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import websockets

from server.protocol import CloseCode, ErrorCode
from tests.server.conftest import Client, run_server


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_admission_past_the_cap_is_refused(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, max_sessions=2) as server:
        async with server.connect() as a, server.connect() as b, server.connect() as c:
            assert (await a.hello()).type == (await b.hello()).type == "welcome"
            assert (await server.get("/readyz")).status_code == 503
            refusal = await c.hello()
            assert (refusal.code, refusal.fatal) == (ErrorCode.SERVER_FULL, True) and "full" in refusal.message
            assert await c.closed() == CloseCode.SERVER_FULL
            await a.frames(2)  # admitted sessions are unaffected
        metrics = (await server.get("/metrics")).text
        assert 'worldserve_sessions_refused_total{reason="server_full"} 1.0' in metrics
        assert "worldserve_sessions_admitted_total 2.0" in metrics


async def test_client_closing_normally_frees_its_world_at_once(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, max_sessions=1) as server:
        async with server.connect() as client:
            await client.hello()
        await asyncio.sleep(0.2)
        assert not server.state.manager.sessions
        async with server.connect() as client:
            assert (await client.hello()).type == "welcome"


async def test_idle_session_is_closed(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, idle_timeout_s=0.6) as server, server.connect() as client:
        await client.hello(mode="lockstep")
        started = time.monotonic()
        error = await client.recv_until("error")
        assert (error.code, error.fatal) == (ErrorCode.IDLE_TIMEOUT, True)
        assert await client.closed() == CloseCode.IDLE_TIMEOUT
        assert 0.5 < time.monotonic() - started < 3.0
        assert not server.state.manager.sessions


async def test_pings_keep_a_session_alive(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, idle_timeout_s=0.6) as server, server.connect() as client:
        await client.hello(mode="lockstep")
        for i in range(6):
            await asyncio.sleep(0.25)
            await client.send(type="ping", t=float(i))
            assert (await client.recv()).t == float(i)
        assert len(server.state.manager.sessions) == 1


async def test_session_length_limit(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, max_session_s=0.5) as server, server.connect() as client:
        await client.hello(mode="realtime", fps=20)
        error = await client.recv_until("error")
        assert error.code == ErrorCode.SESSION_EXPIRED and await client.closed() == CloseCode.SESSION_EXPIRED


async def test_resume_continues_the_same_world(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with server.connect() as client:
            welcome = await client.hello(mode="lockstep", seed=4, prompt="icy cave", attention="window")
            for seq in range(3):
                await client.send(type="step", seq=seq)
            await client.frames(3)
            client.ws.transport.abort()  # a dropped connection, not a goodbye (that would be close 1000)
        await asyncio.sleep(0.2)
        [session] = server.state.manager.sessions.values()
        assert session.detached_at is not None
        async with server.connect() as client:
            resumed = await client.hello(resume_token=welcome.resume_token, mode="realtime", seed=99)
            assert resumed.resumed and resumed.session_id == welcome.session_id
            kept = (resumed.mode, resumed.seed, resumed.prompt, resumed.attention)
            assert kept == ("lockstep", 4, "icy cave", "window")  # the world's settings, not the new hello's
            assert resumed.frame_index == welcome.frame_index + 3
            await client.send(type="step", seq=0)
            assert (await client.frames(1))[0].index == welcome.frame_index + 3
        assert "worldserve_sessions_resumed_total 1.0" in (await server.get("/metrics")).text


async def test_resume_replaces_a_live_connection(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with server.connect() as first, server.connect() as second:
            welcome = await first.hello(mode="realtime", fps=20)
            assert (await second.hello(resume_token=welcome.resume_token)).resumed
            error = await first.recv_until("error")
            assert error.code == ErrorCode.REPLACED and await first.closed() == CloseCode.REPLACED
            frames = await second.frames(3)
            assert frames[-1].index > frames[0].index
            assert len(server.state.manager.sessions) == 1


async def test_resume_after_the_grace_period_fails(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, resume_grace_s=0.3) as server:
        async with server.connect() as client:
            welcome = await client.hello()
            client.ws.transport.abort()
        await asyncio.sleep(1.0)
        assert not server.state.manager.sessions
        async with server.connect() as client:
            refusal = await client.hello(resume_token=welcome.resume_token)
            assert refusal.code == ErrorCode.RESUME_FAILED and await client.closed() == CloseCode.RESUME_FAILED


async def test_a_client_that_stops_reading_harms_no_one(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, max_fps=200) as server, server.connect() as reader:
        await reader.hello(mode="realtime", fps=20)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connecting, so the window stays small
        raw.connect(("127.0.0.1", server.server.port))
        async with websockets.connect(server.url, sock=raw, max_queue=1) as ws:  # reads one message, then stops
            stalled = Client(ws)
            welcome = await stalled.hello(mode="realtime", fps=200)
            # Linux lets a socket buffer up to 4 MB unsent; shrink the server's end of this one connection so the
            # test need not wait minutes for tiny frames to fill it
            [server_end] = [
                c.transport.get_extra_info("socket")
                for c in server.server.server_state.connections
                if c.transport.get_extra_info("peername")[1] == raw.getsockname()[1]
            ]
            server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await reader.frames(5)
            session = server.state.manager.sessions[welcome.session_id]
            rss_before = _rss_bytes()
            started = time.monotonic()
            received = 0
            # read the other client's frames until the stalled world has made 300 frames: a stalled socket that held
            # its world back would stop it after a few, and the deadline would fail the test. Waiting on frames made,
            # not on a fixed time, keeps the engine's speed on a busy machine out of what this test asserts.
            async with asyncio.timeout(30.0):
                while session.world.frame_index < 300:
                    received += len(await reader.frames(1))
            elapsed = time.monotonic() - started
            made, sent, dropped = session.world.frame_index, session.stats.frames_sent, session.outbox.dropped
            assert dropped > 100 and sent < made - 100, (made, sent, dropped)  # its frames replaced, not queued
            assert _rss_bytes() - rss_before < 32 * 2**20
            ws.transport.abort()
        assert received >= 0.75 * 20 * elapsed, (received, elapsed)  # the reader kept its 20 fps all along


async def test_engine_failure_ends_only_the_sessions_it_hit(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with server.connect() as healthy, server.connect() as doomed:
            await healthy.hello(mode="realtime", fps=20, attention="dense")
            await doomed.hello(mode="realtime", fps=20, attention="window")
            window = server.state.engines["window"]

            def broken_step(worlds, actions):
                raise RuntimeError("CUDA out of memory (simulated)")

            window.step = broken_step  # only worlds under "window" fail
            error = await doomed.recv_until("error")
            assert error.code == ErrorCode.ENGINE_ERROR and "out of memory" in error.message
            assert await doomed.closed() == CloseCode.ENGINE_ERROR
            await healthy.frames(5)
            assert (await server.get("/healthz")).status_code == 200


async def test_shutdown_drains_sessions_with_the_documented_code(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server, server.connect() as a, server.connect() as b:
        await a.hello(mode="realtime", fps=20)
        await b.hello(mode="lockstep")
        server.server.should_exit = True  # what SIGTERM does
        for client in (a, b):
            error = await client.recv_until("error")
            assert (error.code, error.fatal) == (ErrorCode.SHUTTING_DOWN, True)
            assert await client.closed() == CloseCode.SHUTTING_DOWN


async def test_a_dense_world_whose_cache_reaches_the_servers_bound_ends_its_own_session(
    tiny_engine, tiny_config_file: Path
) -> None:
    """Dense attention's cache grows with every frame: the server bounds it per world (max_dense_cache_mib), and the
    world that reaches it ends its session with engine_error while a dense session beside it plays on."""
    sizes = tiny_engine.sizes
    frame_bytes = sizes.slot_bytes * tiny_engine.config.model.depth * sizes.tokens_per_frame
    bound_mib = 12 * frame_bytes / 2**20  # 12 frames: the 8 start frames every world begins with, then 4 steps
    async with run_server(tiny_engine, tiny_config_file, max_dense_cache_mib=bound_mib) as server:
        dense = server.state.engines["dense"]
        assert dense.policy.name == "dense" and dense.sizes.capacity_slots == 12 * sizes.tokens_per_frame
        async with server.connect() as full, server.connect() as other:
            await full.hello(mode="lockstep", attention="dense")
            await other.hello(mode="lockstep", attention="dense")
            for seq in range(1, 5):  # each step's frame is written by the next step: 4 steps fill the 12 frames
                await full.send(type="step", seq=seq)
                await full.frames(1)
            await other.send(type="step", seq=1)
            await other.frames(1)
            await full.send(type="step", seq=5)  # its fourth frame is written, then there is no room for the fifth
            await full.send(type="step", seq=6)
            error = await full.recv_until("error")
            assert error.code == ErrorCode.ENGINE_ERROR and "is full" in error.message
            assert await full.closed() == CloseCode.ENGINE_ERROR
            for seq in range(2, 4):
                await other.send(type="step", seq=seq)
                assert len(await other.frames(1)) == 1
