"""The reference game: a procedural first-person maze (a Wolfenstein 3D-style raycaster) in pure numpy.

It plays under the world model's own action space (engine/actions.py), renders at the model's resolution, and is
a pure function of (seed, prompt, actions), so it can record training data, serve as ground truth for evaluating a
world model, and be played next to one. docs/game.md describes the rules, themes and numbers.

    game = Game(seed=3, prompt="icy cave", height=64, width=64)
    policy = HumanPolicy(seed=0)
    frame = game.step(policy.act(game))   # uint8 (64, 64, 3)
"""

from engine.game.game import START_FRAMES, Episode, Game, benchmark, play, start_view
from engine.game.maze import Maze, generate_maze
from engine.game.policy import HumanPolicy
from engine.game.themes import DEFAULT_THEME, THEMES, Theme, theme_for_prompt

__all__ = [
    "DEFAULT_THEME",
    "START_FRAMES",
    "THEMES",
    "Episode",
    "Game",
    "HumanPolicy",
    "Maze",
    "Theme",
    "benchmark",
    "generate_maze",
    "play",
    "start_view",
    "theme_for_prompt",
]
