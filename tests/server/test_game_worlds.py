"""Game sessions: the reference game played through protocol v1, frame for frame the game itself."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from engine import Action, WorldEngine
from engine.game import START_FRAMES, Game, start_view
from server.encoder import decode_jpeg, encode_jpeg
from server.game_worlds import GameWorlds
from server.protocol import CloseCode, ErrorCode
from server.settings import ServerSettings
from tests.server.conftest import run_server

KEYS = [["KeyW"], ["KeyW"], ["ArrowLeft"], ["KeyD"], [], ["KeyS"]]


def started_game(seed: int, prompt: str) -> Game:
    """The game as a game session has it at its first frame: after START_FRAMES frames of standing still."""
    game = Game(seed=seed, prompt=prompt, height=16, width=16)
    for _ in range(START_FRAMES):
        game.step(Action())
    return game


async def test_a_game_session_streams_the_game_itself(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server, server.connect() as client:
        welcome = await client.hello(mode="lockstep", world="game", seed=3, prompt="icy cave")
        assert (welcome.world, welcome.attention, welcome.attention_choices) == ("game", "game", [])
        assert (welcome.frame.height, welcome.frame.width) == (16, 16) and welcome.frame_index == START_FRAMES
        game = started_game(3, "icy cave")
        for seq, keys in enumerate(KEYS):
            await client.send(type="step", seq=seq, action={"keys": keys, "dx": 2.0})
            [frame] = await client.frames(1)
            expected = game.step(Action(frozenset(keys), 2.0, 0.0))
            assert frame.index == START_FRAMES + seq and frame.attention == "game"
            assert frame.jpeg == encode_jpeg(expected, server.state.encoder.quality)
            assert (frame.cache.slots, frame.cache.bytes) == (0, 0)

        await client.send(type="set_attention", attention="dense")
        error = await client.recv()
        assert (error.code, error.fatal) == (ErrorCode.OUT_OF_ORDER, False)

        before = decode_jpeg(frame.jpeg).astype(int)
        await client.send(type="set_prompt", prompt="neon grid")
        await client.send(type="step", seq=len(KEYS))
        [after] = await client.frames(1)
        assert np.abs(decode_jpeg(after.jpeg).astype(int) - before).mean() > 10  # same spot, another theme

        await client.send(type="reset", seed=3, prompt="icy cave")
        await client.send(type="step", seq=len(KEYS) + 1, action={"keys": KEYS[0], "dx": 2.0})
        [first] = await client.frames(1)
        replay = started_game(3, "icy cave")
        assert first.index == START_FRAMES
        assert first.jpeg == encode_jpeg(replay.step(Action(frozenset(KEYS[0]), 2.0, 0.0)), 85)
        info = (await server.get("/api/info")).json()
        assert info["worlds"] == ["model", "game"] and "game" not in info["attention"]["choices"]
        assert info["game_start_frames"] == START_FRAMES


async def test_game_and_model_sessions_run_side_by_side(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with server.connect() as game, server.connect() as model:
            assert (await game.hello(mode="realtime", world="game", fps=20)).world == "game"
            assert (await model.hello(mode="realtime", fps=20)).world == "model"
            for client in (game, model):
                await client.send(type="action", seq=1, t=0.0, keys=["KeyW"])
            assert {f.attention for f in await game.frames(4)} == {"game"}
            assert {f.attention for f in await model.frames(4)} == {"dense"}


async def test_game_hello_refuses_model_only_options(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server:
        for extra, code, close in [
            ({"attention": "dense"}, ErrorCode.BAD_HELLO, CloseCode.BAD_HELLO),
            ({"init_frame": encode_jpeg(np.zeros((16, 16, 3), np.uint8), 90)}, ErrorCode.BAD_INIT_FRAME, 4000),
            ({"world": "dream"}, ErrorCode.BAD_HELLO, CloseCode.BAD_HELLO),
        ]:
            async with server.connect() as client:
                error = await client.hello(**{"world": "game", **extra})
                assert (error.type, error.code) == ("error", code)
                assert await client.closed() == close


def offline_frames(engine: WorldEngine, seed: int, prompt: str, begin: np.ndarray | None) -> list[bytes]:
    """The JPEGs a lockstep model session of this seed and prompt must send under KEYS, begun with `begin`."""
    world = engine.new_world(prompt, seed, begin)
    return [encode_jpeg(engine.step([world], [Action(frozenset(k), 2.0, 0.0)])[0][0], 85) for k in KEYS]


async def test_a_model_session_begins_where_the_game_session_of_its_seed_begins(
    tiny_engine, tiny_config_file: Path
) -> None:
    primed = {
        s: offline_frames(tiny_engine, s, "icy cave", start_view(s, "icy cave", START_FRAMES, 16, 16)) for s in (3, 5)
    }
    assert primed[3] != offline_frames(tiny_engine, 3, "icy cave", None), "the start view must change the frames"
    async with run_server(tiny_engine, tiny_config_file) as server:
        async with server.connect() as game, server.connect() as model:
            game_welcome = await game.hello(mode="lockstep", world="game", seed=3, prompt="icy cave")
            model_welcome = await model.hello(mode="lockstep", seed=3, prompt="icy cave")
            assert model_welcome.frame_index == game_welcome.frame_index == START_FRAMES
            for seed in (3, 5):
                if seed != 3:  # a reset to another seed begins in that seed's maze
                    await model.send(type="reset", seed=seed)
                for seq, keys in enumerate(KEYS):
                    await model.send(type="step", seq=seq, action={"keys": keys, "dx": 2.0})
                    await game.send(type="step", seq=seq, action={"keys": keys, "dx": 2.0})
                    [made], [true] = await model.frames(1), await game.frames(1)
                    assert made.index == true.index == START_FRAMES + seq
                    assert made.jpeg == primed[seed][seq], (seed, seq)
                if seed == 3:
                    await game.send(type="reset", seed=5)


async def test_game_start_frames_zero_begins_from_the_prompt(tiny_engine, tiny_config_file: Path) -> None:
    plain = offline_frames(tiny_engine, 3, "icy cave", None)
    async with run_server(tiny_engine, tiny_config_file, game_start_frames=0) as server:
        async with server.connect() as game, server.connect() as model:
            assert (await game.hello(mode="lockstep", world="game", seed=3, prompt="icy cave")).frame_index == 0
            assert (await model.hello(mode="lockstep", seed=3, prompt="icy cave")).frame_index == 0
            for seq, keys in enumerate(KEYS):
                await model.send(type="step", seq=seq, action={"keys": keys, "dx": 2.0})
                [made] = await model.frames(1)
                assert (made.index, made.jpeg) == (seq, plain[seq])


def test_game_start_frames_must_fit_the_chunks() -> None:
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        GameWorlds(16, 16, chunk_frames=2, start_frames=3)
    with pytest.raises(ValueError, match="game_start_frames"):
        ServerSettings(game_start_frames=-1)
    assert GameWorlds(16, 16, chunk_frames=2, start_frames=4).start_view("icy cave", 3).shape == (4, 16, 16, 3)


async def test_game_sessions_do_not_wait_for_the_model(
    tiny_engine, tiny_config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The game's sessions have a worker of their own: with the model's worker held inside a step, a lockstep game
    session still gets every frame."""
    entered, release = threading.Event(), threading.Event()
    step = WorldEngine.step

    def held_step(self: WorldEngine, worlds, actions):
        entered.set()
        release.wait(30)
        return step(self, worlds, actions)

    async with run_server(tiny_engine, tiny_config_file) as server:
        monkeypatch.setattr(WorldEngine, "step", held_step)  # after the warm-up
        try:
            async with server.connect() as model, server.connect() as game:
                await model.hello(mode="realtime", fps=20)
                assert await asyncio.to_thread(entered.wait, 10), "the model's worker never stepped"
                await game.hello(mode="lockstep", world="game", seed=3, prompt="icy cave")
                for seq, keys in enumerate(KEYS):
                    await game.send(type="step", seq=seq, action={"keys": keys})
                    [frame] = await game.frames(1, timeout=5)
                    assert frame.index == START_FRAMES + seq
        finally:
            release.set()
