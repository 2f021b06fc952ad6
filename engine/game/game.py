"""The reference game: a player in a seeded maze, moved by the world model's actions, seen through the raycaster.

A `Game` is a pure function of (seed, prompt, actions): the maze and start come from the seed, the look from the
prompt (`theme_for_prompt`), and every step applies one frame of one `Action`. The rules (docs/game.md):

    KeyW / ArrowUp      walk forward       WALK_SPEED tiles per frame
    KeyS / ArrowDown    walk backward      WALK_SPEED
    KeyA / KeyD         strafe left/right  WALK_SPEED (forward and strafe together are normalised: no faster diagonal)
    ShiftLeft           run                RUN_FACTOR x the speeds above
    ArrowLeft/Right     turn               TURN_DEGREES per frame
    mouse_dx            turn               MOUSE_DEGREES_PER_PX per px (positive = right), clamped to +-MOUSE_CLAMP_PX
    Space               jump               a JUMP_FRAMES-frame hop of the eye, JUMP_HEIGHT tiles at the top
    mouse_dy, others    nothing

Each step turns first, then moves (along the new heading), then advances the jump. The player is a square of
half-side PLAYER_RADIUS that never overlaps a wall tile; a move is resolved one axis at a time and stops at the
wall, so walking into a wall at an angle slides along it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.actions import IDLE, Action
from engine.game.maze import Maze, generate_maze
from engine.game.raycaster import Raycaster, cast
from engine.game.themes import Theme, theme_for_prompt

WALK_SPEED = 0.1  # tiles per frame: a 64 x 64 view changes by a few pixels, a corridor tile takes 10 frames
RUN_FACTOR = 1.8
TURN_DEGREES = 5.0  # per frame: about 5 px of horizontal shift at 64 px wide (66 degree field of view)
MOUSE_DEGREES_PER_PX = 0.25  # so mouse_scale (20 px) turns as much as an arrow key in one frame
MOUSE_CLAMP_PX = 20.0  # the model clamps mouse_dx / mouse_scale to [-1, 1]; the game turns no further than that
JUMP_FRAMES = 10
JUMP_HEIGHT = 0.2  # tiles above the standing eye height (walls are 1 tile high)
EYE_HEIGHT = 0.5
PLAYER_RADIUS = 0.2  # tiles: half the side of the player's collision square
_EPS = 1e-6
START_FRAMES = 8  # frames of standing still a world begins with (`start_view`; docs/game.md, "Where a world begins"):
# as many as the server primes a new cache with on an attention switch (WORLDSERVE_SWITCH_PRIME_FRAMES)

_FORWARD = frozenset({"KeyW", "ArrowUp"})
_BACKWARD = frozenset({"KeyS", "ArrowDown"})


class Game:
    """One episode of the maze game. Mutable: `step` advances it; everything else only reads.

    State: `x`, `y` (tiles, x = column, y = row), `heading` (radians; 0 looks east along +x, pi/2 south along +y;
    turning right increases it), `frame_index` (steps so far), and after each step `intended_distance` (tiles the
    keys asked to move) and `moved_distance` (tiles actually moved: less when a wall was in the way).
    """

    def __init__(
        self,
        seed: int = 0,
        prompt: str = "",
        height: int = 64,
        width: int = 64,
        *,
        cells: int = 6,
        supersample: int = 2,
    ) -> None:
        self.seed = seed
        self.height, self.width = height, width
        self.maze: Maze = generate_maze(seed, cells=cells)
        self._raycaster = Raycaster(height, width, supersample=supersample)
        self.set_prompt(prompt)
        self.x, self.y, self.heading = self._start()
        self.frame_index = 0
        self.intended_distance = 0.0
        self.moved_distance = 0.0
        self._air = 0  # frames into the current jump; 0 on the ground

    def _start(self) -> tuple[float, float, float]:
        """A random cell centre, facing a random open way out (own generator, so the maze does not depend on it)."""
        rng = np.random.default_rng((seed_entropy(self.seed), 1))
        maze = self.maze
        i, j = (int(v) for v in rng.integers(maze.cells, size=2))
        x, y = maze.cell_centre(i, j)
        reach = maze.pitch / 2  # from the centre to the wall tiles around the cell
        ways = [
            (dx, dy) for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1)) if maze.is_open(x + dx * reach, y + dy * reach)
        ]
        dx, dy = ways[int(rng.integers(len(ways)))]
        return x, y, math.atan2(dy, dx)

    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def theme(self) -> Theme:
        return self._theme

    @property
    def position(self) -> tuple[float, float]:
        """(x, y) in tiles."""
        return self.x, self.y

    @property
    def eye(self) -> float:
        """Eye height above the floor in tiles: EYE_HEIGHT standing, higher during a jump."""
        p = self._air / JUMP_FRAMES
        return EYE_HEIGHT + JUMP_HEIGHT * 4 * p * (1 - p)

    @property
    def airborne(self) -> bool:
        return self._air > 0

    def set_prompt(self, prompt: str) -> None:
        """Re-theme the same maze; position, heading and frame index stay."""
        self._prompt = prompt
        self._theme = theme_for_prompt(prompt)

    def render(self) -> np.ndarray:
        """The current view, uint8 (height, width, 3); changes no state."""
        return self._raycaster.render(self.maze, self._theme, self.x, self.y, self.heading, self.eye)

    def step(self, action: Action) -> np.ndarray:
        """Apply one frame of `action` (rules in the module docstring) and return the new view (uint8 (H, W, 3))."""
        keys = action.keys
        # 1. Turn.
        turn = TURN_DEGREES * (("ArrowRight" in keys) - ("ArrowLeft" in keys))
        turn += MOUSE_DEGREES_PER_PX * max(-MOUSE_CLAMP_PX, min(MOUSE_CLAMP_PX, action.mouse_dx))
        self.heading = math.remainder(self.heading + math.radians(turn), 2 * math.pi)
        # 2. Move along the new heading, one axis at a time.
        forward = bool(keys & _FORWARD) - bool(keys & _BACKWARD)
        strafe = ("KeyD" in keys) - ("KeyA" in keys)
        norm = math.hypot(forward, strafe)
        self.intended_distance = self.moved_distance = 0.0
        if norm:
            speed = WALK_SPEED * (RUN_FACTOR if "ShiftLeft" in keys else 1.0) / norm
            c, s = math.cos(self.heading), math.sin(self.heading)
            dx = speed * (forward * c - strafe * s)  # the right of (c, s) is (-s, c)
            dy = speed * (forward * s + strafe * c)
            x0, y0 = self.x, self.y
            self.x = self._slide(self.x, self.y, dx, axis=0)
            self.y = self._slide(self.y, self.x, dy, axis=1)
            self.intended_distance = speed * norm
            self.moved_distance = math.hypot(self.x - x0, self.y - y0)
        # 3. Jump: Space starts one from the ground; the hop then runs its course.
        if self._air:
            self._air = (self._air + 1) % JUMP_FRAMES
        elif "Space" in keys:
            self._air = 1
        self.frame_index += 1
        return self.render()

    def _slide(self, p: float, q: float, d: float, axis: int) -> float:
        """Move coordinate p (x for axis 0, y for axis 1) by d with the other coordinate at q; stop at a wall."""
        if d == 0:
            return p
        target = p + d
        lead = math.floor(target + math.copysign(PLAYER_RADIUS, d))  # the tile line the leading edge reaches
        if lead == math.floor(p + math.copysign(PLAYER_RADIUS, d)):
            return target  # still within the tiles the square already covers (which are open)
        tiles = self.maze.tiles
        for other in range(math.floor(q - PLAYER_RADIUS), math.floor(q + PLAYER_RADIUS - _EPS) + 1):
            row, col = (other, lead) if axis == 0 else (lead, other)
            if tiles[row, col]:
                return (lead - PLAYER_RADIUS - _EPS) if d > 0 else (lead + 1 + PLAYER_RADIUS + _EPS)
        return target

    def distance_ahead(self, offset_degrees: float = 0.0) -> float:
        """Euclidean distance in tiles from the player's centre to the wall along heading + offset (right is +)."""
        angle = self.heading + math.radians(offset_degrees)
        hits = cast(self.maze, self.x, self.y, np.array([math.cos(angle)]), np.array([math.sin(angle)]))
        return float(hits.dist[0])


def seed_entropy(seed: int) -> int:
    """Any Python int as a non-negative seed for numpy (negative seeds wrap around 2**64)."""
    return seed % 2**64


@dataclass
class Episode:
    """What `play` recorded: `frames` uint8 (T, H, W, 3), the T actions that produced them, `poses` float64 (T, 4)
    (x, y, heading, eye after each step: the ground truth behind each frame), `moved` float64 (T,) (tiles moved
    per step), `intended` float64 (T,) (tiles the keys asked for), and wall-clock seconds spent in `Game.step`
    (update + render) and in the policy."""

    frames: np.ndarray
    actions: list[Action]
    poses: np.ndarray
    moved: np.ndarray
    intended: np.ndarray
    step_seconds: float
    policy_seconds: float

    @property
    def fps(self) -> float:
        """Frames per second of the game alone (update + render)."""
        return len(self.actions) / self.step_seconds if self.step_seconds else float("inf")

    @property
    def blocked_frames(self) -> int:
        """Steps that asked to move but moved less than a quarter of that (pressed against a wall)."""
        return int(((self.intended > 0) & (self.moved < 0.25 * self.intended)).sum())


def play(game: Game, act: Callable[[Game], Action], frames: int) -> Episode:
    """Step `game` `frames` times with the action `act(game)` chooses before each step (e.g. `HumanPolicy.act`)."""
    out = np.empty((frames, game.height, game.width, 3), dtype=np.uint8)  # (T, H, W, 3)
    poses = np.empty((frames, 4))  # (T, 4): x, y, heading, eye
    moved, intended = np.empty(frames), np.empty(frames)  # (T,)
    actions: list[Action] = []
    step_seconds = policy_seconds = 0.0
    for t in range(frames):
        began = time.perf_counter()
        action = act(game)
        chosen = time.perf_counter()
        out[t] = game.step(action)
        step_seconds += time.perf_counter() - chosen
        policy_seconds += chosen - began
        actions.append(action)
        poses[t] = game.x, game.y, game.heading, game.eye
        moved[t], intended[t] = game.moved_distance, game.intended_distance
    return Episode(out, actions, poses, moved, intended, step_seconds, policy_seconds)


def start_view(seed: int, prompt: str, frames: int, height: int = 64, width: int = 64) -> np.ndarray:
    """The first `frames` frames of `Game(seed, prompt)` with the player standing still, uint8 (frames, H, W, 3):
    what a world of the game shows before its player moves, and what a world model is given to begin in the same
    place (`WorldEngine.new_world`'s init_frames)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    game = Game(seed, prompt, height, width)
    return np.stack([game.step(IDLE) for _ in range(frames)])


def benchmark(frames: int = 2000, height: int = 64, width: int = 64, seed: int = 0, prompt: str = "") -> dict[str, Any]:
    """Frames per second of `Game.step` on this machine: a HumanPolicy episode, then a pure replay of its actions
    timed frame by frame. Returns fps and ms per frame (mean, median, p99), for the step alone and with the policy."""
    from engine.game.policy import HumanPolicy

    episode = play(Game(seed, prompt, height, width), HumanPolicy(seed).act, frames)
    game = Game(seed, prompt, height, width)
    times = np.empty(frames)
    for t, action in enumerate(episode.actions):
        began = time.perf_counter()
        game.step(action)
        times[t] = time.perf_counter() - began
    return {
        "frames": frames,
        "size": [height, width],
        "theme": game.theme.name,
        "fps": round(frames / float(times.sum()), 1),
        "ms_mean": round(1e3 * float(times.mean()), 4),
        "ms_median": round(1e3 * float(np.median(times)), 4),
        "ms_p99": round(1e3 * float(np.percentile(times, 99)), 4),
        "fps_with_policy": round(frames / (episode.step_seconds + episode.policy_seconds), 1),
    }
