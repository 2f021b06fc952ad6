"""End to end on a real uvicorn: HTTP routes, realtime and lockstep play with the default engine."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np

from engine import Action, WorldEngine, load_config
from engine.game import START_FRAMES, start_view
from engine.kv_cache import CachePool
from engine.rollout import random_actions
from server.encoder import decode_jpeg, encode_jpeg
from server.protocol import ErrorCode
from tests.server.conftest import DEFAULT_CONFIG, run_server


async def test_default_engine_realtime_and_http_routes() -> None:
    # engine None: the lifespan loads and warms the shipped default model, as `worldserve serve` does
    async with run_server(None, DEFAULT_CONFIG) as server, httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["capacity_left"] == 8
        info = (await http.get("/api/info")).json()
        assert info["protocol"] == 1 and info["frame"] == {"height": 64, "width": 64, "channels": 3, "encoding": "jpeg"}
        assert info["attention"] == {"default": "tempcache", "choices": ["tempcache", "dense", "window"]}
        assert info["actions"]["keys"][0] == "KeyW" and info["close_codes"]["server_full"] == 4009
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]

        async with server.connect() as client:
            welcome = await client.hello(mode="realtime", fps=20, seed=1)
            assert welcome.type == "welcome" and welcome.frame.height == 64 and welcome.fps == 20
            assert welcome.actions["keys"] == info["actions"]["keys"] and welcome.limits.max_fps == 60
            await client.send(type="action", seq=1, t=123.0, keys=["KeyW"], dx=3.0)
            frames = await client.frames(6)
            for frame in frames:
                assert decode_jpeg(frame.jpeg).shape == (64, 64, 3)
                assert frame.cache.slots > 0 and frame.cache.bytes > 0 and frame.attention == "tempcache"
                assert frame.timings.step_ms > 0
            assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + 6))
            applied = [f for f in frames if f.seq == 1]
            assert applied and applied[0].t == 123.0  # the client timestamp comes back for latency

            metrics = (await http.get("/metrics")).text
            assert "worldserve_sessions_active 1.0" in metrics
            assert "worldserve_frames_sent_total" in metrics and "worldserve_step_seconds_bucket" in metrics
            assert "worldserve_input_to_frame_seconds_count 1.0" in metrics
            # the pool's first segment, where the warm-up world's row was and this session's world is
            held = re.search(r'^worldserve_kv_cache_bytes\{attention="tempcache"\} (\S+)$', metrics, re.MULTILINE)
            assert held and float(held.group(1)) == CachePool.FIRST_ROWS * frames[-1].cache.bytes
            assert "session" not in metrics.replace("sessions", "")  # no per-session labels


async def test_lockstep_frames_equal_an_offline_rollout() -> None:
    config = load_config(DEFAULT_CONFIG)
    engine = WorldEngine.from_config(config)
    actions = random_actions(6, seed=3)
    # a model session begins in the maze of its seed: the game's start view, standing still (game_start_frames)
    begin = start_view(11, "red brick dungeon", START_FRAMES, 64, 64)
    offline_world = engine.new_world(prompt="red brick dungeon", seed=11, init_frames=begin)
    offline = [engine.step([offline_world], [a])[0][0] for a in actions]

    async with run_server(engine, DEFAULT_CONFIG) as server, server.connect() as client:
        welcome = await client.hello(mode="lockstep", seed=11, prompt="red brick dungeon")
        assert welcome.mode == "lockstep" and welcome.chunk_frames == 1 and welcome.frame_index == START_FRAMES
        for seq, action in enumerate(actions):
            await client.send(
                type="step", seq=seq, t=float(seq), action={"keys": sorted(action.keys), "dx": action.mouse_dx}
            )
            [frame] = await client.frames(1)
            assert frame.seq == seq and frame.index == START_FRAMES + seq
            # byte-identical JPEG: the server generated exactly the offline frame
            assert frame.jpeg == encode_jpeg(offline[seq], server.state.encoder.quality)
        await client.send(type="ping", t=5.0)
        assert (await client.recv()).type == "pong"  # and no extra frame was sent


async def test_lockstep_steps_queue_and_each_gets_exactly_one_frame(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, max_pending_steps=3) as server, server.connect() as client:
        await client.hello(mode="lockstep", seed=0)
        for seq in range(5):  # sent at once: 3 may wait (one may already run), the rest are refused
            await client.send(type="step", seq=seq, action={"keys": ["KeyW"]})
        received, refused = [], []
        while len(received) + len(refused) < 5:
            message = await client.recv()
            (received if message.type == "frame" else refused).append(message)
        assert all(r.type == "error" and r.code == ErrorCode.TOO_MANY_STEPS and not r.fatal for r in refused)
        assert [f.seq for f in received] == sorted(f.seq for f in received) and len(received) >= 3
        start = server.state.settings.game_start_frames
        assert [f.index for f in received] == list(range(start, start + len(received)))
        await client.send(type="ping", t=1.0)
        assert (await client.recv()).type == "pong"


async def test_session_controls(tiny_engine, tiny_config_file: Path) -> None:
    # worlds from the prompt alone, so that a new world's frames (from 0) tell themselves from the old one's
    async with run_server(tiny_engine, tiny_config_file, game_start_frames=0) as server, server.connect() as client:
        welcome = await client.hello(mode="realtime", fps=50, seed=2, attention="window")
        assert welcome.attention == "window" and welcome.attention_choices == ["dense", "window"]
        await client.frames(12)

        await client.send(type="set_attention", attention="dense")
        frame = await client.recv_until("frame")
        while frame.attention != "dense":
            frame = await client.recv_until("frame")
        assert frame.index == server.state.settings.switch_prime_frames  # primed with the frames shown last

        await client.send(type="reset", seed=5, prompt="icy cave")
        frame = await client.recv_until("frame")
        while frame.index > 2:  # frames of the old world already on their way
            frame = await client.recv_until("frame")
        assert frame.attention == "dense"
        [session] = server.state.manager.sessions.values()
        assert (session.seed, session.prompt) == (5, "icy cave")

        await client.send(type="set_prompt", prompt="neon grid")
        await client.send(type="ping", t=1.0)
        await client.recv_until("pong")
        assert session.prompt == "neon grid" and session.world.prompt == "neon grid"

        await client.send(type="pause")
        await client.send(type="ping", t=2.0)
        await client.recv_until("pong")
        paused_at = session.world.frame_index
        await client.send(type="ping", t=3.0)
        await client.recv_until("pong")
        assert session.world.frame_index <= paused_at + 1  # at most the step that was already running
        await client.send(type="resume")
        await client.frames(3)

        await client.send(type="set_attention", attention="tempcache+annsa")
        error = await client.recv_until("error")
        assert error.code == ErrorCode.UNKNOWN_ATTENTION and not error.fatal
        await client.frames(2)


async def test_init_frame_starts_the_world_from_a_picture(tiny_engine, tiny_config_file: Path) -> None:
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[:, :8] = 255
    async with run_server(tiny_engine, tiny_config_file) as server, server.connect() as client:
        welcome = await client.hello(mode="lockstep", init_frame=encode_jpeg(picture, 95), seed=0)
        assert welcome.frame_index == 1  # the picture is frame 0 of this world
        await client.send(type="step", seq=0)
        [frame] = await client.frames(1)
        assert frame.index == 1
        [session] = server.state.manager.sessions.values()
        plain = tiny_engine.new_world("", seed=0)
        assert not np.array_equal(
            decode_jpeg(frame.jpeg), decode_jpeg(encode_jpeg(tiny_engine.step([plain], [Action()])[0][0], 85))
        )

        await client.send(type="reset", init_frame=b"not a jpeg")
        error = await client.recv_until("error")
        assert error.code == ErrorCode.BAD_INIT_FRAME and not error.fatal
        await client.send(type="reset", init_frame=encode_jpeg(np.zeros((8, 8, 3), np.uint8), 90))
        error = await client.recv_until("error")
        assert "16x16" in error.message
        await client.send(type="step", seq=1)
        assert (await client.frames(1))[0].index == 2  # the session went on


async def test_frames_report_the_input_they_applied(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with server.connect() as client:  # lockstep: the step's input, buttons as bits
            await client.hello(mode="lockstep", seed=0)
            await client.send(type="step", seq=0, action={"keys": ["KeyW", "KeyA"], "dx": 3.0, "buttons": 1})
            [frame] = await client.frames(1)
            assert frame.input.model_dump() == {"keys": ["KeyA", "KeyW"], "dx": 3.0, "dy": 0.0, "buttons": 1}
        async with server.connect() as client:  # realtime: what one frame took of the input since the last
            await client.hello(mode="realtime", fps=50, seed=0)
            await client.frames(1)
            await client.send(type="pause")
            await client.send(type="ping", t=0.0)
            await client.recv_until("pong")
            await client.send(type="action", seq=1, t=0.0, keys=["KeyW"], dx=2.0)
            await client.send(type="action", seq=2, t=0.0, keys=[], dx=3.0, dy=-1.0)  # W tapped, motion adds up
            await client.send(type="resume")
            frame = await client.recv_until("frame")
            while frame.seq != 2:  # a frame made before the pause took effect
                frame = await client.recv_until("frame")
            assert frame.input.model_dump() == {"keys": ["KeyW"], "dx": 5.0, "dy": -1.0, "buttons": 0}
            [after] = await client.frames(1)
            assert after.input.model_dump() == {"keys": [], "dx": 0.0, "dy": 0.0, "buttons": 0}
