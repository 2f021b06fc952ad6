"""The reference game: determinism, collisions, what each key does, frames, and a speed report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.actions import Action
from engine.game import Episode, Game, HumanPolicy, benchmark, generate_maze, play
from engine.game.game import (
    EYE_HEIGHT,
    JUMP_FRAMES,
    PLAYER_RADIUS,
    RUN_FACTOR,
    TURN_DEGREES,
    WALK_SPEED,
)
from engine.rollout import random_actions

IDLE = Action()


def act(*keys: str, dx: float = 0.0, dy: float = 0.0) -> Action:
    return Action(frozenset(keys), dx, dy)


def same_angle(a: float, b: float) -> bool:
    return abs(math.remainder(a - b, 2 * math.pi)) < 1e-9


def replay(game: Game, actions: list[Action]) -> Episode:
    """Play `actions` in order (an `act` for `play`)."""
    scripted = iter(actions)
    return play(game, lambda _game: next(scripted), len(actions))


def open_game(seed: int = 0, prompt: str = "red brick dungeon", **kwargs) -> Game:
    """A game whose player has at least 2 tiles of open floor straight ahead."""
    for s in range(seed, seed + 100):
        game = Game(s, prompt, **kwargs)
        if game.distance_ahead() > 2.0:
            return game
    raise AssertionError("no seed with an open start")


def test_frames_are_uint8_at_the_requested_size() -> None:
    game = Game(seed=3, prompt="icy cave", height=64, width=64)
    frame = game.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert game.step(act("KeyW")).shape == (64, 64, 3)
    wide = Game(seed=3, height=48, width=80)
    assert wide.render().shape == (48, 80, 3) and wide.step(IDLE).shape == (48, 80, 3)
    assert Game(seed=3, height=16, width=16).render().shape == (16, 16, 3)  # the server's tiny test config


def test_render_changes_nothing_and_steps_are_counted() -> None:
    game = Game(seed=1)
    assert game.frame_index == 0
    pose = (game.x, game.y, game.heading, game.eye)
    first = game.render()
    assert np.array_equal(first, game.render()) and (game.x, game.y, game.heading, game.eye) == pose
    assert np.array_equal(game.step(IDLE), first), "an idle frame shows the same view"
    game.step(act("KeyW"))
    assert game.frame_index == 2


def test_same_seed_prompt_and_actions_give_the_same_frames() -> None:
    actions = random_actions(120, seed=4)
    runs = [replay(Game(7, "sandstone temple"), actions) for _ in range(2)]
    assert np.array_equal(runs[0].frames, runs[1].frames)
    assert np.array_equal(runs[0].poses, runs[1].poses)
    other = replay(Game(8, "sandstone temple"), actions)
    assert not np.array_equal(runs[0].frames, other.frames)


def test_seeds_choose_the_maze() -> None:
    assert np.array_equal(generate_maze(5).tiles, generate_maze(5).tiles)
    mazes = [generate_maze(seed).tiles for seed in range(6)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(mazes) for b in mazes[i + 1 :])
    for tiles in mazes:
        assert tiles.shape == (19, 19)  # 6 x 6 cells, 2-tile corridors
        border = np.concatenate([tiles[0], tiles[-1], tiles[:, 0], tiles[:, -1]])
        assert (border > 0).all(), "the maze is closed"
        assert 0.45 < (tiles == 0).mean() < 0.8
    assert Game(seed=-3).maze.tiles.shape == (19, 19), "negative seeds work (the server passes any int)"


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_every_open_tile_is_reachable(seed: int) -> None:
    tiles = generate_maze(seed).tiles
    start = tuple(np.argwhere(tiles == 0)[0])
    seen, todo = {start}, [start]
    while todo:
        r, c = todo.pop()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if tiles[nr, nc] == 0 and (nr, nc) not in seen:
                seen.add((nr, nc))
                todo.append((nr, nc))
    assert len(seen) == (tiles == 0).sum()


def test_the_start_faces_an_open_way() -> None:
    for seed in range(30):
        game = Game(seed)
        assert game.maze.is_open(game.x, game.y)
        assert game.distance_ahead() > 1.0, f"seed {seed} starts facing a wall"
        assert math.remainder(game.heading, math.pi / 2) == pytest.approx(0.0, abs=1e-9), "a grid direction"


def _square_is_clear(game: Game) -> bool:
    r = PLAYER_RADIUS
    return all(game.maze.is_open(game.x + sx * r, game.y + sy * r) for sx in (-1, 1) for sy in (-1, 1))


def test_walls_stop_the_player_and_it_slides_along_them() -> None:
    game = open_game()
    ahead = game.distance_ahead()
    x0, y0, heading = game.x, game.y, game.heading
    for _ in range(int(ahead / WALK_SPEED) + 30):  # walk into the wall and keep pushing
        game.step(act("KeyW"))
        assert _square_is_clear(game)
    travelled = math.hypot(game.x - x0, game.y - y0)
    assert travelled == pytest.approx(ahead - PLAYER_RADIUS, abs=1e-3), "stops flush against the wall"
    assert game.moved_distance == 0.0 < game.intended_distance
    # Turned 45 degrees off the wall's normal, forward slides along the wall instead of stopping.
    for _ in range(9):
        game.step(act("ArrowLeft"))
    game.step(act("KeyW"))
    assert 0.5 * WALK_SPEED < game.moved_distance < WALK_SPEED
    assert same_angle(game.heading, heading - math.radians(45))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_action_sequence_gets_into_a_wall(seed: int) -> None:
    game = Game(seed, height=16, width=16)
    for action in random_actions(1500, seed):
        game.step(action)
        assert _square_is_clear(game)


def test_forward_back_and_the_arrow_aliases() -> None:
    game = open_game()
    c, s = math.cos(game.heading), math.sin(game.heading)
    start = game.render()
    x0, y0 = game.position
    after_w = game.step(act("KeyW"))
    assert not np.array_equal(after_w, start), "walking changes the view"
    assert (game.x - x0, game.y - y0) == pytest.approx((WALK_SPEED * c, WALK_SPEED * s))
    game.step(act("KeyS"))
    assert game.position == pytest.approx((x0, y0))
    twin = open_game()
    assert np.array_equal(twin.step(act("ArrowUp")), after_w)
    assert np.array_equal(twin.step(act("ArrowDown")), game.render())
    running = open_game()
    running.step(act("KeyW", "ShiftLeft"))
    assert running.moved_distance == pytest.approx(RUN_FACTOR * WALK_SPEED)
    assert np.array_equal(open_game().step(act("KeyW", "KeyS")), start), "opposite keys cancel"


def test_strafe_moves_sideways_at_walking_speed() -> None:
    for key, side in (("KeyD", 1), ("KeyA", -1)):
        game = open_game()
        right = (-math.sin(game.heading), math.cos(game.heading))
        x0, y0, heading = game.x, game.y, game.heading
        frame = game.render()
        game.step(act(key))
        assert game.moved_distance > 0, "the start cell is 2 tiles wide: there is room on both sides"
        dx, dy = game.x - x0, game.y - y0
        assert dx * right[0] + dy * right[1] == pytest.approx(side * game.moved_distance)
        assert game.heading == heading and not np.array_equal(game.render(), frame)
    diagonal = open_game()
    diagonal.step(act("KeyW", "KeyD"))
    assert diagonal.intended_distance == pytest.approx(WALK_SPEED), "no faster diagonal"


def test_turning_left_then_right_returns_to_the_same_view() -> None:
    game = Game(seed=2, prompt="neon grid")
    start, heading = game.render(), game.heading
    for _ in range(7):
        game.step(act("ArrowLeft"))
    assert same_angle(game.heading, heading - math.radians(7 * TURN_DEGREES))
    turned = game.render()
    assert np.abs(turned.astype(int) - start).mean() > 5, "turning changes the view"
    for _ in range(7):
        game.step(act("ArrowRight"))
    back = game.render()
    assert same_angle(game.heading, heading)
    assert (back != start).any(axis=-1).mean() < 0.01  # a last-bit heading difference may flip a texel or two
    assert game.position == pytest.approx(Game(seed=2).position)


def test_mouse_turns_with_a_clamp_and_mouse_dy_does_nothing() -> None:
    game = Game(seed=5)
    h0 = game.heading
    game.step(act(dx=20.0))
    assert same_angle(game.heading, h0 + math.radians(TURN_DEGREES))
    game.step(act(dx=-200.0))  # clamped to -20 px, like the model's action encoding
    assert same_angle(game.heading, h0)
    frame = game.render()
    assert np.array_equal(game.step(act(dy=15.0)), frame)
    assert np.array_equal(game.step(act("KeyQ", "Escape")), frame), "unknown keys are ignored"


def test_space_jumps_and_lands() -> None:
    game = Game(seed=3, prompt="green hedge maze")
    ground = game.render()
    frames = [game.step(act("Space"))] + [game.step(IDLE) for _ in range(JUMP_FRAMES - 1)]
    eyes = []
    probe = Game(seed=3)
    probe.step(act("Space"))
    for _ in range(JUMP_FRAMES - 1):
        eyes.append(probe.eye)
        probe.step(IDLE)
    assert max(eyes) > EYE_HEIGHT + 0.1 and probe.eye == EYE_HEIGHT and not probe.airborne
    assert np.abs(frames[JUMP_FRAMES // 2].astype(int) - ground).mean() > 3, "the view rises"
    assert np.array_equal(frames[-1], ground), "and comes back down"


def test_set_prompt_rethemes_in_place() -> None:
    game = Game(seed=4, prompt="icy cave")
    game.step(act("KeyW"))
    pose, frame = (game.x, game.y, game.heading), game.render()
    game.set_prompt("neon grid")
    assert (game.prompt, game.theme.name, game.frame_index) == ("neon grid", "neon grid", 1)
    assert (game.x, game.y, game.heading) == pose
    assert np.abs(game.render().astype(int) - frame).mean() > 30


def test_speed_report(capsys: pytest.CaptureFixture) -> None:
    """Not a timed assertion: prints the numbers (the docs' figure comes from `worldserve game --bench`)."""
    result = benchmark(frames=200)
    assert result["frames"] == 200 and result["fps"] > 0 and result["ms_median"] > 0
    with capsys.disabled():
        print(f"\ngame speed at 64x64: {result}")


def test_play_records_actions_poses_and_timing() -> None:
    episode = play(Game(seed=9), HumanPolicy(seed=9).act, 50)
    assert episode.frames.shape == (50, 64, 64, 3) and len(episode.actions) == 50
    assert episode.poses.shape == (50, 4) and episode.step_seconds > 0 and episode.fps > 0
    replay = Game(seed=9)
    for t, action in enumerate(episode.actions):
        assert np.array_equal(replay.step(action), episode.frames[t])
    assert tuple(episode.poses[-1]) == (replay.x, replay.y, replay.heading, replay.eye)
