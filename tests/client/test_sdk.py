"""The Python SDK against a real server on loopback: realtime and lockstep play, frames equal to offline rollouts,
gymnasium's check_env, typed errors, automatic resume, and recorded episodes that `worldserve rollout` replays.

WorldEnv blocks its caller while its own thread talks to the server, and the server runs on the test's event loop,
so every blocking env call goes through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from gymnasium.utils.env_checker import check_env
from PIL import Image

from client import (
    AuthenticationFailed,
    BadInitFrame,
    ConnectionLost,
    EngineError,
    ErrorCode,
    ResumeFailed,
    ServerFull,
    SessionClosed,
    UnknownAttention,
    WorldClient,
    WorldEnv,
)
from engine import Action, WorldEngine
from engine.game import START_FRAMES, start_view
from server import cli
from server.encoder import encode_jpeg
from tests.conftest import write_config
from tests.server.conftest import DEFAULT_CONFIG, run_server

ROOT = Path(__file__).resolve().parents[2]
IDLE = Action()


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


def offline_frames(engine: WorldEngine, prompt: str, seed: int, actions: Sequence[Action]) -> list[np.ndarray]:
    """What the engine makes for one world under `actions` (one per chunk), uint8 (H, W, 3) each, begun as the
    server begins a model session: with the game's start view of its seed (`game_start_frames`, the default)."""
    m = engine.config.model
    world = engine.new_world(prompt, seed, start_view(seed, prompt, START_FRAMES, m.frame_height, m.frame_width))
    return [frame for action in actions for frame in engine.step([world], [action])[0]]


def jpeg(frame: np.ndarray, server) -> bytes:
    """The frame as the server sends it: its encoder at its quality."""
    return encode_jpeg(frame, server.state.settings.jpeg_quality)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- realtime


async def test_realtime_frames_decode_and_follow_actions(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with WorldClient.connect(server.url, fps=20, seed=9, prompt="icy cave") as world:
            assert (world.mode, world.seed, world.prompt, world.frame_shape) == ("realtime", 9, "icy cave", (16, 16, 3))
            first = await world.next_frame()
            assert first.image.shape == (16, 16, 3) and first.image.dtype == np.uint8 and first.seq is None
            # paused, no frame is made; the action sent meanwhile is exactly what the next frame applies
            await world.pause()
            seq = await world.send_action(keys=["KeyW"], dx=15.0)
            await world.resume()
            async with asyncio.timeout(10):
                frame = await world.next_frame()
                while frame.seq != seq:
                    frame = await world.next_frame()
            assert frame.latency_ms is not None and frame.latency_ms >= 0
            assert await world.ping() > 0
        await asyncio.sleep(0.1)
        assert not server.state.manager.sessions  # closing with 1000 ended the session at once
    i = frame.index - START_FRAMES  # the world's frames begin after its start view
    played = offline_frames(tiny_engine, "icy cave", 9, [IDLE] * i + [Action(frozenset({"KeyW"}), 15.0, 0.0)])
    assert frame.jpeg == jpeg(played[i], server)  # the action was applied, to that very frame
    assert frame.jpeg != jpeg(offline_frames(tiny_engine, "icy cave", 9, [IDLE] * (i + 1))[i], server)


async def test_a_slow_reader_keeps_only_the_newest_frames(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with WorldClient.connect(server.url, fps=60, frame_buffer=3) as world:
            async with asyncio.timeout(10):  # frames arrive while nobody reads
                while world.frames_dropped < 10:
                    await asyncio.sleep(0.05)
            frames = [await world.next_frame() for _ in range(3)]  # the newest three, in order
            assert [f.index for f in frames] == sorted(f.index for f in frames) and frames[0].index >= 10


# ---- lockstep


async def test_lockstep_frames_equal_an_offline_rollout(tiny_engine, tiny_config_file: Path) -> None:
    moves = [(["KeyW"], 0.0), (["KeyW", "ArrowLeft"], 5.0), ([], -12.0), (["KeyD"], 0.0), ([], 0.0), (["KeyS"], 3.0)]
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with WorldClient.connect(server.url, mode="lockstep", seed=11, prompt="neon grid") as world:
            chunks = [await world.step(keys=k, dx=dx) for k, dx in moves[:3]]
            chunks += await asyncio.gather(*(world.step(keys=k, dx=dx) for k, dx in moves[3:]))  # pipelined
            await world.reset(seed=12)
            after_reset = await world.step(keys=["KeyA"])
    assert all(len(chunk) == world.chunk_frames == 1 for chunk in chunks)
    frames = [chunk[0] for chunk in chunks]
    assert [f.index for f in frames] == list(range(START_FRAMES, START_FRAMES + 6))
    assert [f.seq for f in frames] == sorted({f.seq for f in frames}) and after_reset[0].seq > frames[-1].seq
    reference = offline_frames(tiny_engine, "neon grid", 11, [Action(frozenset(k), dx) for k, dx in moves])
    assert [f.jpeg for f in frames] == [jpeg(r, server) for r in reference]
    assert np.array_equal(frames[2].image, simplejpeg.decode_jpeg(jpeg(reference[2], server), colorspace="RGB"))
    [reset_frame] = after_reset
    [expected] = offline_frames(tiny_engine, "neon grid", 12, [Action(frozenset({"KeyA"}))])
    assert reset_frame.index == START_FRAMES and reset_frame.jpeg == jpeg(expected, server)


async def test_heartbeats_keep_a_quiet_session_open(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, idle_timeout_s=0.6, heartbeat_s=0.2) as server:
        async with WorldClient.connect(server.url, mode="lockstep") as world:
            await asyncio.sleep(1.5)  # the agent thinks; the client pings
            assert len(await world.step()) == 1


# ---- gymnasium


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space:UserWarning")
@pytest.mark.filterwarnings("ignore:.*not having a spec:UserWarning")
async def test_world_env_passes_check_env_and_replays_the_engine(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        env = await asyncio.to_thread(
            WorldEnv, server.url, prompt="icy cave", render_mode="rgb_array", max_episode_steps=3
        )
        try:
            assert env.observation_space.shape == (16, 16, 3) and env.action_space["keys"].n == len(env.keys)
            await asyncio.to_thread(check_env, env)
            obs, info = await asyncio.to_thread(env.reset, seed=5)
            action = {"keys": np.eye(len(env.keys), dtype=np.int8)[0], "mouse": np.array([4.5, -2.0], np.float32)}
            results = [await asyncio.to_thread(env.step, action) for _ in range(3)]
            rendered = env.render()
        finally:
            await asyncio.to_thread(env.close)
        await asyncio.to_thread(env.close)  # idempotent
    assert info == {"frame_index": START_FRAMES}
    assert [r[4]["frame_index"] for r in results] == [START_FRAMES + 1, START_FRAMES + 2, START_FRAMES + 3]
    assert [r[3] for r in results] == [False, False, True] and np.array_equal(rendered, results[-1][0])
    keys, dx, dy = env.to_input(action)
    reference = offline_frames(tiny_engine, "icy cave", 5, [IDLE] + [Action(frozenset(keys), dx, dy)] * 3)
    decoded = [simplejpeg.decode_jpeg(jpeg(r, server), colorspace="RGB") for r in reference]
    assert all(np.array_equal(o, d) for o, d in zip([obs] + [r[0] for r in results], decoded))


async def test_a_forgotten_env_ends_its_session(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        env = await asyncio.to_thread(WorldEnv, server.url)
        await asyncio.to_thread(env.reset, seed=1)
        assert len(server.state.manager.sessions) == 1
        del env
        gc.collect()
        async with asyncio.timeout(5):
            while server.state.manager.sessions:
                await asyncio.sleep(0.02)


# ---- errors


async def test_server_errors_raise_typed_exceptions(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file, token="s3cret", max_sessions=1) as server:
        with pytest.raises(AuthenticationFailed) as refused:
            await WorldClient.connect(server.url, token="wrong")
        error = refused.value
        assert (error.code, error.fatal, error.close_code, error.reconnect) == (ErrorCode.BAD_TOKEN, True, 4001, "no")
        with pytest.raises(UnknownAttention) as refused:
            await WorldClient.connect(server.url, token="s3cret", attention="nope")
        assert refused.value.fatal and refused.value.close_code == 4000
        async with WorldClient.connect(server.url, mode="lockstep", token="s3cret", seed=1) as world:
            with pytest.raises(ServerFull) as refused:
                await WorldClient.connect(server.url, token="s3cret")
            assert refused.value.reconnect == "later"
            # non-fatal errors are raised from the call that caused them, and the session goes on
            with pytest.raises(UnknownAttention) as wrong:
                await world.set_attention("nope")
            assert not wrong.value.fatal and "dense" in wrong.value.message
            with pytest.raises(BadInitFrame):
                await world.reset(init_frame=b"not a jpeg")
            await world.reset(init_frame=np.full((16, 16, 3), 128, np.uint8))
            assert (await world.step())[0].index == 1  # after the picture, which is frame 0
            await world.set_attention("window")
            assert world.attention == "window" and (await world.step())[0].attention == "window"
            assert not world.errors

            def broken_step(worlds, actions):
                raise RuntimeError("CUDA out of memory (simulated)")

            server.state.engines["window"].step = broken_step
            with pytest.raises(EngineError, match="out of memory") as failed:
                await world.step()
            assert failed.value.reconnect == "new"
            with pytest.raises(EngineError):  # the session is over: every later call says why
                await world.ping()
            assert world.closed


# ---- dropped connections


async def test_lockstep_step_in_flight_survives_a_dropped_connection(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with WorldClient.connect(server.url, mode="lockstep", seed=5, resume=True) as world:
            frames = await world.step(keys=["KeyW"])
            generating = threading.Event()
            served = server.state.engines["dense"]  # the tiny config's own: a sibling of tiny_engine, its cache bounded
            step = served.step

            def slow_step(worlds, actions):  # on the engine thread: the drop happens while this step runs
                generating.set()
                time.sleep(0.3)
                return step(worlds, actions)

            served.step = slow_step
            try:
                in_flight = asyncio.create_task(world.step(dx=8.0))
                assert await asyncio.to_thread(generating.wait, 10)
                world.ws.transport.abort()  # a drop, not a goodbye
                frames += await asyncio.wait_for(in_flight, 10)
            finally:
                del served.step
            frames += await world.step(keys=["KeyS"])
            assert world.resumes == 1 and [f.index for f in frames] == [START_FRAMES + i for i in range(3)]
            assert len(server.state.manager.sessions) == 1
    moves = [Action(frozenset({"KeyW"})), Action(frozenset(), 8.0), Action(frozenset({"KeyS"}))]
    assert [f.jpeg for f in frames] == [jpeg(r, server) for r in offline_frames(tiny_engine, "", 5, moves)]


async def test_realtime_resumes_and_keeps_streaming(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with WorldClient.connect(server.url, fps=30, resume=True) as world:
            before = await world.next_frame()
            world.ws.transport.abort()
            async with asyncio.timeout(10):
                while world.resumes == 0:
                    await world.next_frame()
                after = await world.next_frame()
            assert after.index > before.index and world.welcome.resumed


async def test_a_drop_without_resume_raises_connection_lost(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        world = await WorldClient.connect(server.url, mode="lockstep")
        await world.step()
        world.ws.transport.abort()
        with pytest.raises(ConnectionLost) as lost:
            await asyncio.wait_for(world.step(), 10)
        assert lost.value.close_code == 1006 and lost.value.code is None
        await world.close()
        with pytest.raises(ConnectionLost):  # close() keeps the first reason
            await world.ping()


async def test_resume_after_the_world_is_gone_raises_resume_failed(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        world = await WorldClient.connect(server.url, mode="lockstep", resume=True)
        world.ws.transport.abort()
        [session] = server.state.manager.sessions.values()
        server.state.manager.end(session, None, "gone before the client came back")
        with pytest.raises(ResumeFailed) as failed:
            await asyncio.wait_for(world.step(), 10)
        assert failed.value.reconnect == "new" and world.closed
        await world.close()


async def test_closed_client_refuses_calls(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        world = await WorldClient.connect(server.url)
        await world.close()
        await world.close()
        with pytest.raises(SessionClosed):
            await world.send_action(keys=["KeyW"])
        # frames() first yields the frames that arrived before close() (none or a few, by timing), then ends
        async with asyncio.timeout(5.0):
            [frame async for frame in world.frames()]
        assert [frame async for frame in world.frames()] == []
        with pytest.raises(RuntimeError, match="lockstep"):
            await world.step()


# ---- examples: record an episode, replay it offline


async def test_recorded_episode_replays_with_worldserve_rollout(tmp_path: Path) -> None:
    """Against the default model. The server sends JPEGs and `rollout` writes lossless PNGs, so each replayed frame
    is JPEG-encoded at the server's quality and decoded before comparing: JPEG coding is deterministic, so the
    pixels must be equal exactly. A tolerance would hide an action applied one frame late on a model whose frames
    change little."""
    record, agent = load_example("record_episode"), load_example("random_agent")
    episode, replay = tmp_path / "episode", tmp_path / "replay"
    async with run_server(None, DEFAULT_CONFIG) as server:
        argv = ["--url", server.url, "--steps", "6", "--seed", "3", "--prompt", "red brick dungeon"]
        assert await asyncio.to_thread(record.main, [*argv, "--out", str(episode)]) == 0
        assert await asyncio.to_thread(agent.main, ["--url", server.url, "--steps", "5"]) == 0
        quality = server.state.settings.jpeg_quality
    saved = json.loads((episode / "episode.json").read_text())
    assert saved["frames"] == 7 and len(json.loads((episode / "actions.json").read_text())["actions"]) == 7
    argv = ["rollout", "--config", str(DEFAULT_CONFIG), "--seed", "3", "--prompt", "red brick dungeon"]
    argv += ["--frames", "7", "--actions", str(episode / "actions.json"), "--out", str(replay)]
    assert await asyncio.to_thread(cli.main, argv) == 0
    for i in range(7):
        recorded = np.asarray(Image.open(episode / "frames" / f"{i:06d}.png"))
        replayed = np.asarray(Image.open(replay / "frames" / f"{i:06d}.png"))
        assert np.array_equal(recorded, simplejpeg.decode_jpeg(encode_jpeg(replayed, quality), colorspace="RGB")), i
    assert recorded.shape == replayed.shape == (64, 64, 3)
