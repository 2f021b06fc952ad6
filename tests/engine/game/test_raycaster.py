"""The vectorised raycaster against slow twins: a scalar DDA per ray, and a per-pixel renderer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.game import THEMES, Game, generate_maze
from engine.game.maze import Maze
from engine.game.raycaster import SIDE_SHADE, Raycaster, cast
from engine.game.themes import SKY_COLS, SKY_ROWS, TEXTURE, Theme


def dda(tiles: np.ndarray, x: float, y: float, rdx: float, rdy: float) -> tuple[float, bool, float, int, int]:
    """Lodev's textbook DDA, one ray: (perpendicular distance, y_side, u, row, col)."""
    col, row = math.floor(x), math.floor(y)
    delta_x = abs(1 / rdx) if rdx else math.inf
    delta_y = abs(1 / rdy) if rdy else math.inf
    step_x, side_x = (1, (col + 1 - x) * delta_x) if rdx > 0 else (-1, (x - col) * delta_x)
    step_y, side_y = (1, (row + 1 - y) * delta_y) if rdy > 0 else (-1, (y - row) * delta_y)
    while True:
        if side_x < side_y:
            dist, side_x, col, y_side = side_x, side_x + delta_x, col + step_x, False
        else:
            dist, side_y, row, y_side = side_y, side_y + delta_y, row + step_y, True
        if tiles[row, col]:
            break
    if y_side:
        u = (x + dist * rdx) % 1.0
        u = 1 - u if rdy > 0 else u
    else:
        u = (y + dist * rdy) % 1.0
        u = 1 - u if rdx < 0 else u
    return dist, y_side, u, row, col


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cast_matches_the_scalar_dda(seed: int) -> None:
    rng = np.random.default_rng(seed)
    maze = generate_maze(seed)
    open_tiles = maze.open_tiles()
    for _ in range(20):
        row, col = open_tiles[rng.integers(len(open_tiles))]
        x, y = col + rng.random(), row + rng.random()
        angles = rng.uniform(-math.pi, math.pi, 64)
        scale = rng.uniform(0.5, 2.0, 64)  # rays need not be unit vectors
        rdx, rdy = np.cos(angles) * scale, np.sin(angles) * scale
        hits = cast(maze, x, y, rdx, rdy)
        for i in range(64):
            dist, y_side, u, hit_row, hit_col = dda(maze.tiles, x, y, rdx[i], rdy[i])
            assert hits.dist[i] == pytest.approx(dist, rel=1e-9, abs=1e-9)
            assert (bool(hits.y_side[i]), int(hits.row[i]), int(hits.col[i])) == (y_side, hit_row, hit_col)
            assert hits.u[i] == pytest.approx(u, abs=1e-9)


def test_axis_aligned_rays() -> None:
    maze = generate_maze(0)
    x, y = maze.cell_centre(0, 0)
    hits = cast(maze, x, y, np.array([1.0, -1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, -1.0]))
    assert np.isfinite(hits.dist).all() and (hits.dist > 0).all()
    assert hits.dist[1] == pytest.approx(1.0) and hits.dist[3] == pytest.approx(1.0)  # the border, half a cell away


def reference_render(raycaster: Raycaster, maze: Maze, theme: Theme, x: float, y: float, heading: float) -> np.ndarray:
    """Per pixel, in float64 Python, with no supersampling and the eye at standing height."""
    h, w, eye = raycaster.height, raycaster.width, 0.5
    rdx, rdy = raycaster.directions(heading)
    fog = np.asarray(theme.fog, np.float64)
    image = np.zeros((h, w, 3))
    for c in range(w):
        dist, y_side, u, row, col = dda(maze.tiles, x, y, rdx[c], rdy[c])
        span = raycaster.focal / dist
        top = h / 2 - (1 - eye) * span
        for r in range(h):
            v = (r + 0.5 - top) / span
            if 0 <= v < 1:
                texel = theme.walls[maze.tiles[row, col] - 1, int(v * TEXTURE), int(u * TEXTURE)]
                light = math.exp(-dist / theme.fog_distance)
                gain = (SIDE_SHADE if y_side else 1.0) * maze.tint[row, col] * light
            else:
                below = r + 0.5 - h / 2
                depth = raycaster.focal * (eye / below if below > 0 else (1 - eye) / -below)
                wx, wy = x + depth * rdx[c], y + depth * rdy[c]
                tu, tv = int((wx % 1) * TEXTURE), int((wy % 1) * TEXTURE)
                if below < 0 and theme.sky:  # the panorama, by the column's absolute angle
                    turns = (heading + math.atan(raycaster.camera_x[c] * raycaster.tan_half)) / (2 * math.pi)
                    image[r, c] = theme.ceiling[r * SKY_ROWS // (h // 2), int((turns % 1.0) * SKY_COLS)]
                    continue
                texel = (theme.floor if below > 0 else theme.ceiling)[tv, tu]
                light = math.exp(-depth / theme.fog_distance)
                gain = light
            image[r, c] = texel * gain + fog * (1 - light)
    return np.floor(np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)  # (h, w, 3)


@pytest.mark.parametrize("name", ["red brick dungeon", "wooden cabin", "green hedge maze"])
def test_render_matches_the_per_pixel_reference(name: str) -> None:
    game = Game(seed=6, prompt=name, height=32, width=32, supersample=1)
    for _ in range(3):
        fast = game.render()
        slow = reference_render(game._raycaster, game.maze, game.theme, game.x, game.y, game.heading)
        differ = np.abs(fast.astype(int) - slow).max(axis=-1) > 1  # float32 colour arithmetic: +-1
        assert differ.mean() < 0.005, f"{differ.sum()} of {differ.size} pixels differ"
        game.x += 0.3 * math.cos(game.heading)
        game.y += 0.3 * math.sin(game.heading)
        game.heading += 0.4


def test_supersampling_is_a_box_filter_of_the_big_render() -> None:
    big = Game(seed=2, prompt="neon grid", height=64, width=64, supersample=1)
    small = Game(seed=2, prompt="neon grid", height=32, width=32, supersample=2)
    expected = big.render().astype(float).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(small.render() - expected).max() <= 1.0  # quantised once instead of twice


def test_every_theme_renders() -> None:
    for name in THEMES:
        frame = Game(seed=1, prompt=name).render()
        assert frame.std() > 10, f"{name} renders a flat image"
