"""The game's level: a braided grid maze with a few rooms, generated from a seed (pure numpy).

Coordinates: a maze is a grid of unit tiles, `tiles[row, col]`. World positions are floats in tile units with
x = column and y = row (y grows "south", down the map); the tile under (x, y) is `tiles[floor(y), floor(x)]`.

Tile values: 0 open floor, 1 plain wall, 2 accent wall (a landmark texture: a torch, a window, ...). The border is
all walls, so every ray hits a wall and the player can never leave the grid.

Generation (all draws from `np.random.default_rng(seed)`, so the maze is a pure function of its arguments):
1. a perfect maze over `cells x cells` cells by the recursive backtracker. A cell is `corridor x corridor` open tiles
   and cells are `pitch = corridor + 1` tiles apart, with one wall tile between neighbours, so the grid is
   (cells pitch + 1) tiles square. Corridors are 2 tiles wide by default: in one-tile corridors the player is
   never more than half a tile from a wall and a 64 x 64 view is mostly a wall close up;
2. braiding: each dead end is opened into a neighbouring cell with probability `braid`, which adds loops, as in a
   level built for play rather than for getting lost;
3. `rooms` rooms of 2 x 2 cells with the walls between them removed;
4. wall tiles that face open floor become accent walls with probability `accent`, and every tile gets a small
   brightness `tint`, so places look different from each other (landmarks a world model can remember).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPEN, WALL, ACCENT = 0, 1, 2
_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (d_row, d_col) to the four neighbouring cells


@dataclass(frozen=True, eq=False)
class Maze:
    """A generated level: `tiles` (rows, cols) uint8 of OPEN/WALL/ACCENT and `tint` (rows, cols) float32 in
    [0.85, 1.0], a per-tile brightness factor for walls. Treat both arrays as read-only."""

    tiles: np.ndarray
    tint: np.ndarray
    pitch: int  # tiles from one cell to the next: corridor width + 1 wall tile

    @property
    def cells(self) -> int:
        return (self.rows - 1) // self.pitch

    def cell_centre(self, i: int, j: int) -> tuple[float, float]:
        """World (x, y) of the centre of cell (i, j) (row i, column j of the cell grid)."""
        half = self.pitch / 2
        return j * self.pitch + half + 0.5, i * self.pitch + half + 0.5

    @property
    def rows(self) -> int:
        return self.tiles.shape[0]

    @property
    def cols(self) -> int:
        return self.tiles.shape[1]

    def is_open(self, x: float, y: float) -> bool:
        """Whether the tile under world position (x, y) is open floor (outside the grid counts as wall)."""
        col, row = int(np.floor(x)), int(np.floor(y))
        return 0 <= row < self.rows and 0 <= col < self.cols and self.tiles[row, col] == OPEN

    def open_tiles(self) -> np.ndarray:
        """All open tiles as an (n, 2) int array of (row, col), in row-major order."""
        return np.argwhere(self.tiles == OPEN)


def generate_maze(
    seed: int, cells: int = 6, corridor: int = 2, braid: float = 0.5, rooms: int = 2, accent: float = 0.08
) -> Maze:
    """Generate the maze for `seed`: (cells (corridor + 1) + 1) tiles square; steps in the module docstring."""
    if cells < 2 or corridor < 1:
        raise ValueError(f"a maze needs cells >= 2 and corridor >= 1, got cells={cells}, corridor={corridor}")
    rng = np.random.default_rng(seed % 2**64)
    pitch = corridor + 1
    size = cells * pitch + 1
    tiles = np.full((size, size), WALL, dtype=np.uint8)

    def cell(i: int, j: int) -> tuple[slice, slice]:
        return slice(i * pitch + 1, i * pitch + pitch), slice(j * pitch + 1, j * pitch + pitch)

    def between(i: int, j: int, di: int, dj: int) -> tuple[slice, slice]:
        """The wall tiles between cell (i, j) and its neighbour (i + di, j + dj)."""
        rows, cols = cell(i, j)
        if di:
            row = (i + (di > 0)) * pitch
            return slice(row, row + 1), cols
        col = (j + (dj > 0)) * pitch
        return rows, slice(col, col + 1)

    # 1. Recursive backtracker, iterative: carve from a random cell, always to a random unvisited neighbour.
    visited = np.zeros((cells, cells), dtype=bool)
    start = (int(rng.integers(cells)), int(rng.integers(cells)))
    stack = [start]
    visited[start] = True
    tiles[cell(*start)] = OPEN
    while stack:
        i, j = stack[-1]
        options = [
            (di, dj) for di, dj in _STEPS if 0 <= i + di < cells and 0 <= j + dj < cells and not visited[i + di, j + dj]
        ]
        if not options:
            stack.pop()
            continue
        di, dj = options[int(rng.integers(len(options)))]
        visited[i + di, j + dj] = True
        tiles[between(i, j, di, dj)] = OPEN
        tiles[cell(i + di, j + dj)] = OPEN
        stack.append((i + di, j + dj))

    # 2. Braid: open dead ends (a cell with a single exit) into a walled neighbour cell.
    for i in range(cells):
        for j in range(cells):
            walled = [(di, dj) for di, dj in _STEPS if (tiles[between(i, j, di, dj)] != OPEN).all()]
            if len(walled) == 3 and rng.random() < braid:
                inner = [(di, dj) for di, dj in walled if 0 <= i + di < cells and 0 <= j + dj < cells]
                tiles[between(i, j, *inner[int(rng.integers(len(inner)))])] = OPEN

    # 3. Rooms: clear the tiles spanning 2 x 2 cells, walls between them included.
    for _ in range(rooms):
        i, j = int(rng.integers(cells - 1)), int(rng.integers(cells - 1))
        tiles[i * pitch + 1 : (i + 2) * pitch, j * pitch + 1 : (j + 2) * pitch] = OPEN

    # 4. Accent walls on faces that can be seen, and a per-tile tint.
    padded = np.pad(tiles == OPEN, 1)
    faces_open = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]  # (size, size)
    accents = (tiles == WALL) & faces_open & (rng.random((size, size)) < accent)
    tiles[accents] = ACCENT
    tint = (0.85 + 0.15 * rng.random((size, size))).astype(np.float32)
    return Maze(tiles=tiles, tint=tint, pitch=pitch)
