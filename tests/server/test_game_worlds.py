"""Game sessions: the reference game played through protocol v1, frame for frame the game itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import Action
from engine.game import Game
from server.encoder import decode_jpeg, encode_jpeg
from server.protocol import CloseCode, ErrorCode
from tests.server.conftest import run_server

KEYS = [["KeyW"], ["KeyW"], ["ArrowLeft"], ["KeyD"], [], ["KeyS"]]


async def test_a_game_session_streams_the_game_itself(tiny_engine, tiny_config_file: Path) -> None:
    async with run_server(tiny_engine, tiny_config_file) as server, server.connect() as client:
        welcome = await client.hello(mode="lockstep", world="game", seed=3, prompt="icy cave")
        assert (welcome.world, welcome.attention, welcome.attention_choices) == ("game", "game", [])
        assert (welcome.frame.height, welcome.frame.width) == (16, 16) and welcome.frame_index == 0
        game = Game(seed=3, prompt="icy cave", height=16, width=16)
        for seq, keys in enumerate(KEYS):
            await client.send(type="step", seq=seq, action={"keys": keys, "dx": 2.0})
            [frame] = await client.frames(1)
            expected = game.step(Action(frozenset(keys), 2.0, 0.0))
            assert frame.index == seq and frame.attention == "game"
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
        replay = Game(seed=3, prompt="icy cave", height=16, width=16)
        assert first.index == 0
        assert first.jpeg == encode_jpeg(replay.step(Action(frozenset(KEYS[0]), 2.0, 0.0)), 85)
        info = (await server.get("/api/info")).json()
        assert info["worlds"] == ["model", "game"] and "game" not in info["attention"]["choices"]


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
