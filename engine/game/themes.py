"""Themes: the look of the maze (wall, floor and ceiling textures, fog), chosen by a short text prompt.

Every texture is drawn procedurally from simple numpy patterns (bricks, logs, blocks, leaves, ice, grid lines) with
a fixed generator per theme, so a theme looks the same in every process. Textures are float32 RGB in [0, 1]:

    walls    (2, T, T, 3)   [plain wall, accent wall]; index [v, u]: v down the wall, u along it
    floor    (T, T, 3)      one texture per floor tile, index [y, x] within the tile
    ceiling  (T, T, 3)      cast like the floor, or, for `sky` themes, a panorama (S, P, 3): S rows from the top of
                            the screen to the horizon, P columns over 360 degrees of heading

`theme_for_prompt` picks the theme whose name and keywords best match the prompt's words. A prompt that matches
nothing (including the empty prompt) gets DEFAULT_THEME, the classic red brick dungeon: a fixed default is
predictable for people, and learnable for a world model (a hash of the prompt would assign unrelated themes to
unknown prompts in a way no text encoder could learn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

TEXTURE = 32  # texels per tile side (T)
SKY_ROWS, SKY_COLS = 32, 256  # panorama size (S, P) of sky themes
FLOOR_OFFSET = 2 * TEXTURE * TEXTURE  # where the floor starts in `Theme.atlas`
CEILING_OFFSET = 3 * TEXTURE * TEXTURE  # where the ceiling (or sky) starts


@dataclass(frozen=True, eq=False)
class Theme:
    """How the maze looks: textures (shapes in the module docstring) and fog. `fog` is an RGB colour in [0, 1];
    light falls off as exp(-distance / fog_distance), distance in tiles. Treat the arrays as read-only."""

    name: str
    keywords: tuple[str, ...]
    walls: np.ndarray
    floor: np.ndarray
    ceiling: np.ndarray
    sky: bool
    fog: tuple[float, float, float]
    fog_distance: float

    def __repr__(self) -> str:
        return f"Theme({self.name!r})"

    @cached_property
    def atlas(self) -> np.ndarray:
        """Every texel of the theme, planar: (3, N) float32; walls from 0 (plain, then accent), the floor from
        FLOOR_OFFSET, the ceiling or sky from CEILING_OFFSET, each flattened row-major."""
        parts = [self.walls.reshape(-1, 3), self.floor.reshape(-1, 3), self.ceiling.reshape(-1, 3)]
        return np.ascontiguousarray(np.concatenate(parts).T, dtype=np.float32)


# ---- pattern helpers: (T, T) or (T, T, 3) float32 arrays ----------------------------------------------------


def _noise(rng: np.random.Generator, cells: int, size: int = TEXTURE) -> np.ndarray:
    """Tileable smooth value noise in [0, 1], (size, size): random values on a cells x cells lattice, smoothstep."""
    lattice = rng.random((cells, cells))
    t = np.arange(size) * cells / size
    i0 = np.floor(t).astype(int)
    f = t - i0
    f = f * f * (3 - 2 * f)
    i1 = (i0 + 1) % cells
    rows = lattice[i0] * (1 - f)[:, None] + lattice[i1] * f[:, None]  # (size, cells)
    return (rows[:, i0] * (1 - f) + rows[:, i1] * f).astype(np.float32)


def _fbm(rng: np.random.Generator, octaves: tuple[int, ...] = (4, 8, 16), size: int = TEXTURE) -> np.ndarray:
    """Sum of noise octaves (lattice sizes), rescaled to [0, 1]."""
    total = sum(_noise(rng, cells, size) / (k + 1) for k, cells in enumerate(octaves))
    return ((total - total.min()) / (total.max() - total.min())).astype(np.float32)


def _mix(a: tuple[float, ...], b: tuple[float, ...], t: np.ndarray) -> np.ndarray:
    """Per-texel blend of two colours: (..., 3)."""
    t = np.clip(t, 0, 1)[..., None]
    return (np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t).astype(np.float32)


def _grain(rng: np.random.Generator, image: np.ndarray, amount: float) -> np.ndarray:
    """Multiply by fine per-texel noise: texture detail that makes motion visible at 64 x 64."""
    return np.clip(image * (1 + amount * (rng.random(image.shape[:2]) - 0.5))[..., None], 0, 1).astype(np.float32)


def _bricks(rng: np.random.Generator, brick: tuple, mortar: tuple, courses: int, per_course: int) -> np.ndarray:
    """Running-bond bricks: `courses` rows of `per_course` bricks, alternate rows offset by half a brick."""
    t = TEXTURE
    v, u = np.mgrid[0:t, 0:t]
    h, w = t // courses, t // per_course
    course = v // h
    shifted = (u + (course % 2) * (w // 2)) % t
    index = course * per_course + shifted // w
    shade = 0.8 + 0.4 * rng.random(courses * per_course)[index]
    image = np.asarray(brick, np.float32) * shade[..., None]
    joint = (v % h == h - 1) | (shifted % w == w - 1)
    image[joint] = mortar
    return _grain(rng, image.astype(np.float32), 0.25)


def _torch(wall: np.ndarray) -> np.ndarray:
    """A wall with a burning torch in a bracket, and its warm glow."""
    t = TEXTURE
    v, u = np.mgrid[0:t, 0:t].astype(np.float32)
    glow = np.exp(-((u - 15.5) ** 2 + (v - 10) ** 2) / 60.0)
    image = np.clip(wall * (1 + 1.2 * glow[..., None]) + np.array([0.25, 0.1, 0.0]) * glow[..., None], 0, 1)
    image[14:24, 14:18] = (0.12, 0.1, 0.1)  # bracket
    flame = ((u - 15.5) / 3.2) ** 2 + ((v - 10) / 5.0) ** 2 < 1
    image[flame] = _mix((1.0, 0.95, 0.4), (1.0, 0.45, 0.05), (v[flame] - 5) / 9)
    return image.astype(np.float32)


def _ice(rng: np.random.Generator) -> np.ndarray:
    noise = _fbm(rng, (3, 6, 12))
    image = _mix((0.45, 0.65, 0.85), (0.8, 0.92, 1.0), noise)
    cracks = np.abs(_fbm(rng, (4, 8)) - 0.5) < 0.015
    image[cracks] = (0.97, 0.99, 1.0)
    return _grain(rng, image, 0.12)


def _crystals(rng: np.random.Generator) -> np.ndarray:
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE].astype(np.float32)
    image = _mix((0.12, 0.2, 0.45), (0.25, 0.4, 0.7), _fbm(rng, (4, 8)))
    for cu, cv, w, h in ((8, 20, 4, 10), (16, 16, 5, 14), (24, 21, 4, 9), (12, 26, 3, 5), (21, 27, 3, 4)):
        d = np.abs(u - cu) / w + np.abs(v - cv) / h
        image[d < 1] = _mix((0.55, 0.95, 1.0), (0.9, 1.0, 1.0), 1 - d[d < 1])
    return _grain(rng, image, 0.1)


def _leaves(rng: np.random.Generator) -> np.ndarray:
    image = _mix((0.06, 0.24, 0.06), (0.3, 0.6, 0.18), _fbm(rng, (4, 8, 16)) * 0.6 + 0.4 * rng.random((32, 32)))
    return _grain(rng, image, 0.3)


def _flowers(rng: np.random.Generator, hedge: np.ndarray) -> np.ndarray:
    image = hedge.copy()
    for _ in range(14):
        r, c = rng.integers(1, TEXTURE - 2, size=2)
        image[r : r + 2, c : c + 2] = (0.95, 0.25, 0.45) if rng.random() < 0.6 else (1.0, 0.9, 0.3)
    return image


def _blocks(rng: np.random.Generator) -> np.ndarray:
    """Large sandstone blocks with horizontal strata."""
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE]
    strata = 0.5 + 0.5 * np.sin(v * 1.3 + 3 * _noise(rng, 4))
    image = _mix((0.72, 0.56, 0.33), (0.9, 0.75, 0.5), 0.6 * strata + 0.4 * _fbm(rng))
    course = v // 16
    joint = (v % 16 >= 15) | ((u + course * 16) % 32 >= 31)
    image[joint] = (0.48, 0.36, 0.2)
    return _grain(rng, image, 0.15)


def _glyphs(rng: np.random.Generator, block: np.ndarray) -> np.ndarray:
    """A carved and painted hieroglyph panel."""
    image = block.copy()
    image[3:29, 3:29] *= 0.85
    image[3:29, [3, 28]] = image[[3, 28], 3:29] = (0.4, 0.28, 0.14)
    paints = ((0.15, 0.3, 0.65), (0.65, 0.18, 0.1), (0.1, 0.1, 0.1))
    for row in (6, 13, 20):
        for col in (6, 13, 20):
            kind = int(rng.integers(3))
            colour = paints[int(rng.integers(3))]
            if kind == 0:  # a standing figure
                image[row : row + 6, col + 2 : col + 4] = colour
                image[row : row + 2, col + 1 : col + 5] = colour
            elif kind == 1:  # an eye
                image[row + 2 : row + 4, col : col + 6] = colour
                image[row + 1 : row + 5, col + 2 : col + 4] = colour
            else:  # a bird
                image[row + 1 : row + 3, col : col + 6] = colour
                image[row + 3 : row + 6, col + 3] = colour
    return image


def _neon(line: tuple, base: tuple, spacing: int, edge: tuple | None = None) -> np.ndarray:
    """Glowing lines every `spacing` texels on a dark base; `edge` draws a brighter frame at the tile border."""
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE]
    dist = np.minimum(np.minimum(u % spacing, spacing - u % spacing), np.minimum(v % spacing, spacing - v % spacing))
    glow = np.exp(-(dist.astype(np.float32) ** 2) / 1.5)
    image = _mix(base, line, glow)
    if edge is not None:
        border = np.minimum(np.minimum(u, TEXTURE - 1 - u), np.minimum(v, TEXTURE - 1 - v))
        image = np.maximum(image, _mix(base, edge, np.exp(-(border.astype(np.float32) ** 2) / 2.0)))
    return image


def _panel(base: np.ndarray) -> np.ndarray:
    """A magenta neon panel with chevrons."""
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE]
    image = base.copy()
    image[4:28, 4:28] = (0.45, 0.02, 0.35)
    chevron = (np.abs((v - 4) % 8 - np.abs(u - 15.5) / 3) < 1.2) & (u >= 6) & (u < 26) & (v >= 4) & (v < 28)
    image[chevron] = (1.0, 0.5, 0.95)
    return image


def _logs(rng: np.random.Generator, colour: tuple, logs: int) -> np.ndarray:
    """Horizontal logs, shaded as cylinders, with grain."""
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE].astype(np.float32)
    h = TEXTURE / logs
    across = (v % h) / h  # 0..1 across one log
    shade = 0.45 + 0.75 * np.sin(np.pi * across) ** 0.7
    grain = 0.85 + 0.15 * np.sin(u * 0.9 + 6 * _noise(rng, 8))
    tone = 0.85 + 0.3 * rng.random(logs)[(v // h).astype(int)]
    image = np.asarray(colour, np.float32) * (shade * grain * tone)[..., None]
    return _grain(rng, np.clip(image, 0, 1), 0.15)


def _planks(rng: np.random.Generator, colour: tuple, boards: int) -> np.ndarray:
    """Floor boards along x: `boards` per tile, with grain and dark gaps."""
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE].astype(np.float32)
    h = TEXTURE // boards
    board = (v // h).astype(int)
    grain = 0.85 + 0.15 * np.sin(u * 0.5 + 4 * _noise(rng, 8) + board * 2.0)
    tone = 0.8 + 0.4 * rng.random(boards)[board]
    image = np.asarray(colour, np.float32) * (grain * tone)[..., None]
    image[(v % h) == h - 1] *= 0.35
    return _grain(rng, np.clip(image, 0, 1), 0.12)


def _window(wall: np.ndarray) -> np.ndarray:
    """A four-pane window in a wooden frame, daylight outside."""
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE]
    image = wall.copy()
    image[6:26, 7:25] = (0.28, 0.16, 0.07)
    pane = (v >= 8) & (v < 24) & (u >= 9) & (u < 23) & (np.abs(u - 15.5) > 1) & (np.abs(v - 15.5) > 1)
    image[pane] = _mix((0.95, 0.97, 1.0), (0.55, 0.75, 0.95), (v[pane] - 8) / 16.0)
    return image


def _sky(rng: np.random.Generator, top: tuple, horizon: tuple, clouds: tuple | None, stars: bool) -> np.ndarray:
    """A (SKY_ROWS, SKY_COLS, 3) panorama: a vertical gradient with clouds or stars."""
    rows = np.linspace(0, 1, SKY_ROWS, dtype=np.float32)[:, None].repeat(SKY_COLS, 1)
    image = _mix(top, horizon, rows**1.5)
    if clouds is not None:
        cover = _noise(rng, 8, SKY_COLS)[:SKY_ROWS] * 0.6 + _noise(rng, 32, SKY_COLS)[:SKY_ROWS] * 0.4
        amount = np.clip((cover - 0.5) * 4, 0, 1) * (1 - rows)
        image = image * (1 - amount[..., None]) + np.asarray(clouds, np.float32) * amount[..., None]
    if stars:
        lit = (rng.random((SKY_ROWS, SKY_COLS)) < 0.03) & (rows < 0.7)
        image[lit] = (1.0, 0.9, 1.0)
    return image.astype(np.float32)


def _flagstones(rng: np.random.Generator, stone: tuple, gap: tuple) -> np.ndarray:
    v, u = np.mgrid[0:TEXTURE, 0:TEXTURE]
    index = (v // 16) * 2 + (u // 16)
    image = np.asarray(stone, np.float32) * (0.75 + 0.5 * rng.random(4)[index])[..., None]
    image = image * (0.8 + 0.4 * _fbm(rng))[..., None]
    image[(v % 16 == 15) | (u % 16 == 15)] = gap
    return _grain(rng, np.clip(image, 0, 1).astype(np.float32), 0.2)


def _speckle(rng: np.random.Generator, dark: tuple, light: tuple, amount: float = 0.5) -> np.ndarray:
    return _grain(rng, _mix(dark, light, (1 - amount) * _fbm(rng) + amount * rng.random((32, 32))), 0.1)


# ---- the themes -----------------------------------------------------------------------------------------------


def _build_themes() -> dict[str, Theme]:
    rng = np.random.default_rng(6)  # fixed: textures are part of the game, identical in every process
    themes: list[Theme] = []

    bricks = _bricks(rng, (0.6, 0.17, 0.12), (0.34, 0.32, 0.3), courses=4, per_course=2)
    themes.append(
        Theme(
            name="red brick dungeon",
            keywords=("brick", "bricks", "dungeon", "castle", "prison", "cell", "torch", "wolfenstein", "crypt"),
            walls=np.stack([bricks, _torch(bricks)]),
            floor=_flagstones(rng, (0.36, 0.34, 0.32), (0.12, 0.11, 0.1)),
            ceiling=_speckle(rng, (0.08, 0.07, 0.07), (0.22, 0.19, 0.18)),
            sky=False,
            fog=(0.02, 0.01, 0.01),
            fog_distance=5.0,
        )
    )
    themes.append(
        Theme(
            name="icy cave",
            keywords=("ice", "icy", "snow", "snowy", "frozen", "glacier", "winter", "cold", "crystal", "frost"),
            walls=np.stack([_ice(rng), _crystals(rng)]),
            floor=_speckle(rng, (0.78, 0.84, 0.92), (0.97, 0.98, 1.0), 0.3),
            ceiling=_speckle(rng, (0.22, 0.3, 0.42), (0.42, 0.52, 0.65)),
            sky=False,
            fog=(0.78, 0.88, 0.97),
            fog_distance=4.0,
        )
    )
    hedge = _leaves(rng)
    themes.append(
        Theme(
            name="green hedge maze",
            keywords=("green", "hedge", "garden", "grass", "bush", "bushes", "park", "labyrinth", "leaves", "topiary"),
            walls=np.stack([hedge, _flowers(rng, hedge)]),
            floor=_speckle(rng, (0.55, 0.47, 0.35), (0.8, 0.74, 0.6), 0.7),
            ceiling=_sky(rng, (0.2, 0.4, 0.85), (0.7, 0.82, 0.95), clouds=(1.0, 1.0, 1.0), stars=False),
            sky=True,
            fog=(0.72, 0.83, 0.95),
            fog_distance=9.0,
        )
    )
    block = _blocks(rng)
    themes.append(
        Theme(
            name="sandstone temple",
            keywords=("sand", "sandstone", "temple", "desert", "egypt", "egyptian", "pyramid", "tomb", "ancient"),
            walls=np.stack([block, _glyphs(rng, block)]),
            floor=_flagstones(rng, (0.78, 0.64, 0.42), (0.5, 0.38, 0.22)),
            ceiling=_speckle(rng, (0.3, 0.22, 0.13), (0.45, 0.35, 0.22)),
            sky=False,
            fog=(0.6, 0.45, 0.28),
            fog_distance=6.0,
        )
    )
    grid = _neon((0.1, 0.95, 1.0), (0.02, 0.01, 0.06), spacing=8, edge=(1.0, 0.2, 0.85))
    themes.append(
        Theme(
            name="neon grid",
            keywords=("neon", "grid", "cyber", "cyberpunk", "synthwave", "tron", "retro", "digital", "virtual"),
            walls=np.stack([grid, _panel(grid)]),
            floor=_neon((1.0, 0.15, 0.8), (0.02, 0.0, 0.05), spacing=32),
            ceiling=_sky(rng, (0.02, 0.0, 0.08), (0.4, 0.05, 0.4), clouds=None, stars=True),
            sky=True,
            fog=(0.12, 0.02, 0.18),
            fog_distance=10.0,
        )
    )
    logs = _logs(rng, (0.85, 0.58, 0.32), logs=4)
    themes.append(
        Theme(
            name="wooden cabin",
            keywords=("wood", "wooden", "cabin", "log", "logs", "timber", "lodge", "plank", "cottage", "hut"),
            walls=np.stack([logs, _window(logs)]),
            floor=_planks(rng, (0.6, 0.36, 0.18), boards=4),
            ceiling=_planks(rng, (0.42, 0.28, 0.15), boards=2),
            sky=False,
            fog=(0.45, 0.3, 0.15),
            fog_distance=6.0,
        )
    )
    return {theme.name: theme for theme in themes}


THEMES: dict[str, Theme] = _build_themes()
DEFAULT_THEME = "red brick dungeon"


def theme_for_prompt(prompt: str) -> Theme:
    """The theme that best matches `prompt`: each prompt word (lower case, letters only) scores 2 when it is a
    word of a theme's name and 1 when it is one of its keywords; the highest total wins, ties go to the theme listed
    first in THEMES, and a prompt that scores nothing gets THEMES[DEFAULT_THEME]. Deterministic, case-insensitive."""
    words = re.findall(r"[a-z]+", prompt.lower())
    best, best_score = THEMES[DEFAULT_THEME], 0
    for theme in THEMES.values():
        name_words = set(theme.name.split())
        score = sum(2 if word in name_words else 1 if word in theme.keywords else 0 for word in words)
        if score > best_score:
            best, best_score = theme, score
    return best
