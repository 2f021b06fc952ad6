"""The shipped default model: configs/default.yaml loads models/default.safetensors, and the weights are trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import WorldEngine, load_config
from engine.actions import IDLE
from engine.checkpoint import read_model_config
from engine.dataset import episode_actions, heldout_spec, record
from engine.evaluate import psnr

ROOT = Path(__file__).resolve().parents[2]
MAX_BYTES = 30 * 10**6  # the budget for the shipped weights


@pytest.fixture(scope="module")
def engine() -> WorldEngine:
    return WorldEngine.from_config(load_config(ROOT / "configs" / "default.yaml", {"runtime.device": "cpu"}))


def test_default_config_names_the_shipped_weights_and_they_fit_the_budget():
    config = load_config(ROOT / "configs" / "default.yaml")
    path = config.runtime.checkpoint
    assert path is not None and path.is_file(), "configs/default.yaml must point at the shipped weights"
    assert path.stat().st_size <= MAX_BYTES
    assert read_model_config(path) == config.model


def test_trained_model_predicts_held_out_frames_from_their_history(engine: WorldEngine):
    """Teacher forcing on a held-out maze the model never saw. Measured for the shipped weights: 16 frames of
    held-out episodes 0-3 at 26.5 dB (copying the last frame: 25.7); random weights give noise, far below 20 dB."""
    keys = engine.config.model.actions.keys
    episode = record(heldout_spec(1), 17, (64, 64), keys)
    actions = episode_actions(episode)
    world = engine.new_world(episode.prompt, seed=0)
    engine.observe(world, episode.frames[:1], [IDLE])
    model, baseline = [], []
    for t in range(1, len(episode)):
        [[predicted]] = engine.predict([world], [actions[t]])
        model.append(psnr(predicted, episode.frames[t]))
        baseline.append(psnr(episode.frames[t - 1], episode.frames[t]))
        engine.observe(world, episode.frames[t : t + 1], [actions[t]])
    assert np.mean(model) >= 24.0 and np.mean(model) > np.mean(baseline) - 3.0, (np.mean(model), np.mean(baseline))


def test_prompt_steers_a_new_world(engine: WorldEngine):
    """The first frame of a new world under two themes' names differs in colour the way the game's do."""
    frames = {}
    for prompt in ("icy cave", "red brick dungeon"):
        [[frame]] = engine.step([engine.new_world(prompt, seed=0)], [IDLE])
        frames[prompt] = frame.astype(np.float64).reshape(-1, 3).mean(axis=0)  # mean RGB
    icy, brick = frames["icy cave"], frames["red brick dungeon"]
    assert icy[2] - icy[0] > brick[2] - brick[0] + 10  # bluer than the brick dungeon
