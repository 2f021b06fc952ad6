"""HumanPolicy: deterministic, sticky and varied, and it does not spend its frames pressed against walls."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from engine.game import Game, HumanPolicy, play


def test_the_policy_is_deterministic_given_its_seed() -> None:
    runs = [play(Game(3, height=16, width=16), HumanPolicy(5).act, 400).actions for _ in range(2)]
    assert runs[0] == runs[1]
    other = play(Game(3, height=16, width=16), HumanPolicy(6).act, 400).actions
    assert other != runs[0]


def test_act_only_reads_the_game() -> None:
    game, policy = Game(1), HumanPolicy(1)
    for _ in range(30):
        pose, frame = (game.x, game.y, game.heading, game.frame_index), game.render()
        action = policy.act(game)
        assert (game.x, game.y, game.heading, game.frame_index) == pose and np.array_equal(game.render(), frame)
        game.step(action)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rarely_blocked_and_it_explores(seed: int) -> None:
    episode = play(Game(seed, height=16, width=16), HumanPolicy(seed).act, 1500)
    moving = int((episode.intended > 0).sum())
    assert moving > 0.5 * 1500, "mostly on the move"
    assert episode.blocked_frames < 0.1 * moving, f"{episode.blocked_frames} of {moving} moving frames blocked"
    visited = {(int(x), int(y)) for x, y in episode.poses[:, :2]}
    assert len(visited) > 40, f"explored only {len(visited)} tiles"


def test_sticky_bursts_with_every_kind_of_move() -> None:
    episode = play(Game(4, height=16, width=16), HumanPolicy(4).act, 3000)
    actions = episode.actions
    changes = sum(a.keys != b.keys for a, b in zip(actions, actions[1:]))
    assert changes < len(actions) / 5, "intents are held for several frames"
    held = collections.Counter(key for action in actions for key in action.keys)
    for key in ("KeyW", "KeyA", "KeyS", "KeyD", "ArrowLeft", "ArrowRight", "Space", "ShiftLeft"):
        assert held[key] > 0, f"{key} never pressed"
    idle = sum(not a.keys and a.mouse_dx == 0 for a in actions)
    mouse = sum(a.mouse_dx != 0 for a in actions)
    assert 0.02 * len(actions) < idle < 0.25 * len(actions), "stands still now and then"
    assert mouse > 0.05 * len(actions), "turns with the mouse too"
    assert all(a.mouse_dy == 0 for a in actions)
