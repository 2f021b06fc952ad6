"""Themes: at least six, clearly different from each other, and picked by the words of a prompt."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.game import DEFAULT_THEME, THEMES, Game, HumanPolicy, play, theme_for_prompt
from engine.game.themes import TEXTURE

EXAMPLES = ["red brick dungeon", "icy cave", "green hedge maze", "sandstone temple", "neon grid", "wooden cabin"]


def test_six_themes_with_well_formed_textures() -> None:
    assert set(EXAMPLES) <= set(THEMES)
    for name, theme in THEMES.items():
        assert theme.name == name and theme.keywords
        assert theme.walls.shape == (2, TEXTURE, TEXTURE, 3) and theme.floor.shape == (TEXTURE, TEXTURE, 3)
        for texture in (theme.walls, theme.floor, theme.ceiling):
            assert texture.dtype == np.float32 and 0 <= texture.min() and texture.max() <= 1
        assert theme.walls[0].std() > 0.02, f"{name}: plain walls need texture detail to show motion"
        assert not np.allclose(theme.walls[0], theme.walls[1]), f"{name}: accent walls look different"
        assert theme.fog_distance > 0


@pytest.mark.parametrize("prompt", EXAMPLES)
def test_the_example_prompts_pick_their_themes(prompt: str) -> None:
    assert theme_for_prompt(prompt).name == prompt


@pytest.mark.parametrize(
    "prompt, name",
    [
        ("a red brick dungeon with torches", "red brick dungeon"),
        ("Castle PRISON", "red brick dungeon"),
        ("a frozen glacier", "icy cave"),
        ("snowy ice cave, crystals", "icy cave"),
        ("a garden labyrinth", "green hedge maze"),
        ("ancient egyptian tomb", "sandstone temple"),
        ("synthwave cyberpunk", "neon grid"),
        ("a cozy log cabin in the woods", "wooden cabin"),
        ("", DEFAULT_THEME),
        ("a spaceship corridor", DEFAULT_THEME),
        ("1234 !!", DEFAULT_THEME),
    ],
)
def test_prompts_match_by_words_with_a_fixed_fallback(prompt: str, name: str) -> None:
    assert theme_for_prompt(prompt).name == name
    assert theme_for_prompt(prompt) is theme_for_prompt(prompt)


def test_themes_are_clearly_distinguishable_in_play() -> None:
    """Mean colour of the same 64 frames (same maze, same actions) under each theme, compared pairwise."""
    means = {}
    for name in THEMES:
        episode = play(Game(2, name), HumanPolicy(2).act, 64)
        means[name] = episode.frames.reshape(-1, 3).mean(axis=0)
    for a, b in itertools.combinations(THEMES, 2):
        distance = float(np.linalg.norm(means[a] - means[b]))
        assert distance > 30, f"{a} and {b} look alike: mean colours {means[a]} vs {means[b]}"
