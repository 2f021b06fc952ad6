"""`worldserve game`: writes an episode in the rollout layout whose actions replay to the same frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.game import Game
from engine.rollout import load_actions
from server.cli import main


def test_game_command_writes_an_episode_that_replays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "episode"
    args = ["game", "--prompt", "neon grid", "--seed", "2", "--frames", "24", "--out", str(out)]
    assert main(args) == 0
    assert "wrote 24 frames" in capsys.readouterr().out
    frames = [np.asarray(Image.open(p)) for p in sorted((out / "frames").glob("*.png"))]
    assert len(frames) == 24 and frames[0].shape == (64, 64, 3)
    assert Image.open(out / "rollout.gif").n_frames == 24
    assert Image.open(out / "contact_sheet.png").size == (8 * 64 * 2, 3 * 64 * 2)
    stats = json.loads((out / "stats.json").read_text())
    summary = stats["summary"]
    assert (summary["theme"], summary["policy"], summary["frames"]) == ("neon grid", "human", 24)
    assert summary["fps"] > 0 and len(stats["frames"]) == 24

    actions = load_actions(out / "actions.json")  # "worldserve-actions/1": `worldserve rollout --actions` reads it
    game = Game(seed=2, prompt="neon grid")
    for action, frame, pose in zip(actions, frames, stats["frames"]):
        assert np.array_equal(game.step(action), frame)
        assert (pose["x"], pose["y"]) == pytest.approx((game.x, game.y), abs=1e-4)


def test_random_policy_size_and_no_png(tmp_path: Path) -> None:
    out = tmp_path / "random"
    args = ["game", "--policy", "random", "--size", "32", "--frames", "10", "--no-png", "--out", str(out)]
    assert main(args) == 0
    assert not (out / "frames").exists()
    assert Image.open(out / "rollout.gif").size == (128, 128)
    assert len(load_actions(out / "actions.json")) == 10


def test_bench_and_errors(capsys: pytest.CaptureFixture) -> None:
    assert main(["game", "--bench", "--frames", "20", "--size", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" fps |") == 6 and "icy cave" in printed
    assert main(["game", "--frames", "4"]) == 2
    assert "--out is required" in capsys.readouterr().err
