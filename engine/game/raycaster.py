"""First-person rendering of a maze: vectorised DDA raycasting of walls, floor and ceiling casting, fog (numpy).

Camera (world units are tiles; x = column, y = row, see engine/game/maze.py): at (x, y), looking along
d = (cos heading, sin heading), with the camera plane p = (-sin heading, cos heading) * tan(fov / 2) pointing to
the right of the screen. Screen column c (of W, centre at camera_x = 2 (c + 0.5) / W - 1) casts the ray
r = d + camera_x p. Walls are 1 tile high, the eye is `eye` tiles above the floor (0.5 standing), the horizon is
the middle row, and the focal length is f = (W / 2) / tan(fov / 2) pixels, so a wall at perpendicular distance z
spans rows [H/2 - (1 - eye) f / z, H/2 + eye f / z).

Every ray is cast at once, with no loop over columns or pixels: for each ray, all crossings of vertical grid
lines (x = integer) and of horizontal ones (y = integer) are computed as a (rays, K) array, the first crossing
that enters a wall tile is found with argmax, and the nearer of the two families wins (an x-side hit is an
east/west face, a y-side hit a north/south face, drawn darker). Because r has unit component along d, the ray
parameter t at a hit is already the perpendicular distance, so there is no fisheye correction.

Frames are rendered at `supersample` times the output size and box-filtered down: at 64 x 64, texels of distant
walls and floor would otherwise alias into shimmering noise that moves with the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.game.maze import Maze
from engine.game.themes import CEILING_OFFSET, FLOOR_OFFSET, SKY_COLS, SKY_ROWS, TEXTURE, Theme

FOV_DEGREES = 66.0  # horizontal field of view, as in Wolfenstein 3D-era raycasters
SIDE_SHADE = 0.72  # brightness of north/south faces relative to east/west ones


@dataclass(frozen=True)
class Hits:
    """Where rays hit walls, per ray (R,): `dist` (perpendicular distance in tiles, the ray parameter t),
    `y_side` (True for a north/south face), `u` (position along the face in [0, 1), left to right on screen),
    `row`, `col` (the wall tile hit)."""

    dist: np.ndarray
    y_side: np.ndarray
    u: np.ndarray
    row: np.ndarray
    col: np.ndarray


def _crossings(
    tiles: np.ndarray, p: float, q: float, dp: np.ndarray, dq: np.ndarray, transpose: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First wall entered at a crossing of the lines p = integer, for rays (dp, dq) from (p, q) (R,).

    Returns t (R,) (inf where a ray is parallel to the lines), the along-face coordinate q at the hit, and the hit
    tile's (p, q) indices. `transpose` says p is the row axis (horizontal lines) rather than the column axis."""
    size_p, size_q = (tiles.shape[0], tiles.shape[1]) if transpose else (tiles.shape[1], tiles.shape[0])
    k = np.arange(size_p + 1, dtype=np.float64)  # (K,)
    forward = dp > 0
    lines = np.where(forward[:, None], math.floor(p) + 1 + k, math.floor(p) - k)  # (R, K) line coordinates
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (lines - p) / dp[:, None]  # (R, K)
        t = np.where(np.isfinite(t) & (t > 0), t, np.inf)
        q_hit = q + t * dq[:, None]  # (R, K); nan where t = inf and dq = 0
    cell_p = np.where(forward[:, None], lines, lines - 1).astype(np.int64)
    cell_q = np.floor(np.where(np.isfinite(q_hit), q_hit, -1)).astype(np.int64)
    inside = (cell_p >= 0) & (cell_p < size_p) & (cell_q >= 0) & (cell_q < size_q)
    cp, cq = np.clip(cell_p, 0, size_p - 1), np.clip(cell_q, 0, size_q - 1)
    wall = (tiles[cq, cp] if not transpose else tiles[cp, cq]) > 0
    hit = (wall | ~inside) & np.isfinite(t)  # (R, K); leaving the grid counts as a wall
    first = np.argmax(hit, axis=1)  # (R,)
    rows = np.arange(len(dp))
    found = hit[rows, first]
    return (
        np.where(found, t[rows, first], np.inf),
        q_hit[rows, first],
        cp[rows, first],
        cq[rows, first],
    )


def cast(maze: Maze, x: float, y: float, rdx: np.ndarray, rdy: np.ndarray) -> Hits:
    """Cast rays (rdx, rdy) (R,) from (x, y); see the module docstring. Rays need not be unit vectors: t is in
    units of the ray vector, so for unit rays `dist` is the Euclidean distance."""
    tx, hit_y, col_x, row_x = _crossings(maze.tiles, x, y, rdx, rdy, transpose=False)  # vertical lines
    ty, hit_x, row_y, col_y = _crossings(maze.tiles, y, x, rdy, rdx, transpose=True)  # horizontal lines
    y_side = ty < tx
    dist = np.where(y_side, ty, tx)
    along = np.where(y_side, hit_x, hit_y)
    u = along - np.floor(along)
    flip = np.where(y_side, rdy > 0, rdx < 0)  # so that u grows from left to right on screen
    u = np.where(flip, 1.0 - u, u)
    return Hits(
        dist=dist,
        y_side=y_side,
        u=u,
        row=np.where(y_side, row_y, row_x),
        col=np.where(y_side, col_y, col_x),
    )


class Raycaster:
    """Renders (height, width, 3) uint8 frames of a maze; holds per-size constants and scratch buffers, no game
    state. Not thread-safe: one raycaster per game."""

    def __init__(self, height: int, width: int, fov_degrees: float = FOV_DEGREES, supersample: int = 2) -> None:
        if height < 8 or width < 8 or supersample < 1:
            raise ValueError(f"need height, width >= 8 and supersample >= 1, got {height}x{width} x{supersample}")
        self.height, self.width, self.supersample = height, width, supersample
        hs, ws = height * supersample, width * supersample
        self.tan_half = math.tan(math.radians(fov_degrees) / 2)
        self.focal = (ws / 2) / self.tan_half  # pixels (of the supersampled frame)
        self.horizon = hs / 2
        self.split = hs // 2  # rows [0, split) show ceiling, [split, hs) floor, where no wall covers them
        self.camera_x = 2 * (np.arange(ws) + 0.5) / ws - 1  # (ws,) float64
        self.column_angle = np.arctan(self.camera_x * self.tan_half)  # (ws,) radians right of the heading
        self.row_centre = np.arange(hs) + 0.5  # (hs,) float64: float32 texel coordinates flip at texel edges
        dy = self.row_centre - self.horizon
        self.row_offset = np.where(np.abs(dy) < 0.5, np.copysign(0.5, dy), dy)  # (hs,) px below the horizon
        self.sky_rows = (np.arange(self.split) * SKY_ROWS // max(self.split, 1)) * SKY_COLS + CEILING_OFFSET  # (hc,)
        # Scratch: the hot loop reuses these instead of allocating frame-sized temporaries (glibc returns large
        # freed blocks to the OS, and re-faulting them in cost more than the arithmetic).
        self._index = np.empty((hs, ws), dtype=np.intp)  # atlas texel per pixel
        self._gain = np.empty((hs, ws), dtype=np.float32)  # texel weight: face shade x tile tint x light
        self._fog = np.empty((hs, ws), dtype=np.float32)  # fog weight: 1 - light
        self._rgb = np.empty((3, hs, ws), dtype=np.float32)  # planar colour

    def directions(self, heading: float) -> tuple[np.ndarray, np.ndarray]:
        """Ray vectors (rdx, rdy), each (ws,) float64, of the supersampled columns."""
        c, s = math.cos(heading), math.sin(heading)
        return c - s * self.tan_half * self.camera_x, s + c * self.tan_half * self.camera_x

    def render(self, maze: Maze, theme: Theme, x: float, y: float, heading: float, eye: float = 0.5) -> np.ndarray:
        """The view from (x, y) along `heading` (radians) with the eye `eye` tiles above the floor:
        uint8 (height, width, 3). Every pixel is one texel of `theme.atlas` times a gain, plus fog."""
        index, gain, fog = self._index, self._gain, self._fog
        split = self.split
        rdx, rdy = self.directions(heading)

        # 1. Floor and ceiling: each row sees the floor (ceiling) at one distance; the world point gives the texel.
        self._flat(index[split:], gain[split:], theme, FLOOR_OFFSET, x, y, rdx, rdy, eye / self.row_offset[split:])
        if theme.sky:  # infinitely far: it turns with the heading, never moves, no fog
            angle = (heading + self.column_angle) / (2 * math.pi)  # (ws,) turns
            cols = ((angle - np.floor(angle)) * SKY_COLS).astype(np.intp) % SKY_COLS
            np.add(self.sky_rows[:, None], cols[None, :], out=index[:split])
            gain[:split] = 1.0
        else:
            depth = (1 - eye) / -self.row_offset[:split]
            self._flat(index[:split], gain[:split], theme, CEILING_OFFSET, x, y, rdx, rdy, depth)
        np.subtract(1.0, gain, out=fog)
        if theme.sky:
            fog[:split] = 0.0

        # 2. Walls, over the flats: texture row per pixel, texture column per ray; face shade, tile tint, fog.
        hits = cast(maze, x, y, rdx, rdy)
        dist = np.maximum(hits.dist, 1e-3)  # (ws,)
        span = self.focal / dist  # (ws,) wall height in px
        top = self.horizon - (1 - eye) * span
        v = (self.row_centre[:, None] - top[None, :]) / span[None, :]  # (hs, ws) position down the wall, [0, 1)
        is_wall = (v >= 0) & (v < 1)
        material = maze.tiles[hits.row, hits.col].astype(np.intp) - 1  # (ws,) 0 plain, 1 accent
        ui = np.minimum((hits.u * TEXTURE).astype(np.intp), TEXTURE - 1)  # (ws,)
        vi = np.minimum((v * TEXTURE).astype(np.intp), TEXTURE - 1)  # (hs, ws)
        texel = vi * TEXTURE + (material * TEXTURE * TEXTURE + ui)[None, :]  # (hs, ws)
        light = np.exp(-dist / theme.fog_distance).astype(np.float32)  # (ws,)
        shade = np.where(hits.y_side, SIDE_SHADE, 1.0).astype(np.float32) * maze.tint[hits.row, hits.col]
        np.copyto(index, texel, where=is_wall)
        np.copyto(gain, np.broadcast_to(shade * light, gain.shape), where=is_wall)
        np.copyto(fog, np.broadcast_to(1 - light, fog.shape), where=is_wall)

        # 3. Colour = texel x gain + fog colour x (1 - light), per channel, then box-filter and quantise.
        rgb = self._rgb
        for c in range(3):
            np.take(theme.atlas[c], index, out=rgb[c])
            rgb[c] *= gain
            rgb[c] += theme.fog[c] * fog
        k = self.supersample
        image = rgb.reshape(3, self.height, k, self.width, k).sum(axis=(2, 4)) if k > 1 else rgb  # (3, H, W)
        image *= 255 / (k * k)
        np.clip(image, 0, 255, out=image)
        image += 0.5
        return image.astype(np.uint8).transpose(1, 2, 0).copy()  # (H, W, 3)

    def _flat(
        self,
        index: np.ndarray,
        gain: np.ndarray,
        theme: Theme,
        offset: int,
        x: float,
        y: float,
        rdx: np.ndarray,
        rdy: np.ndarray,
        height_per_px: np.ndarray,
    ) -> None:
        """Fill a floor or ceiling band of `index`/`gain` (n, ws); row r sees the plane at perpendicular distance
        focal x height_per_px[r] (the eye's height over the plane / the row's px from the horizon)."""
        depth = self.focal * height_per_px  # (n,) tiles
        wx = x + depth[:, None] * rdx[None, :]  # (n, ws) world x of each pixel
        wy = y + depth[:, None] * rdy[None, :]
        tu = np.minimum(((wx - np.floor(wx)) * TEXTURE).astype(np.intp), TEXTURE - 1)
        tv = np.minimum(((wy - np.floor(wy)) * TEXTURE).astype(np.intp), TEXTURE - 1)
        np.add(tv * TEXTURE + tu, offset, out=index)
        gain[:] = np.exp(-depth / theme.fog_distance).astype(np.float32)[:, None]
