"""The reference game (engine/game) as a world a session can play: `world: "game"` in hello.

`GameWorlds` has the part of `WorldEngine`'s interface that the engine worker and the session manager use
(`new_world`, `set_prompt`, `step`, `chunk_frames`), so a game session is scheduled, streamed and controlled exactly
like a model session, through the same protocol: agents can train on the real game, and people can compare it with
the model under the same actions. The game has no KV cache and no attention configuration.

Both kinds of world can begin the same way: the player standing still for `start_frames` frames at the start of the
maze its seed makes (`start_view`). A game world plays those frames itself; a model world given no picture of its
own has them written into its cache (the session manager does this), so the model begins in the maze a game
session of the same seed and prompt shows, and the two go on from the same frame index under the same actions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import IDLE, Action
from engine.game import Game, start_view

GAME = "game"  # the name game sessions carry where model sessions name their attention configuration


class GameWorld:
    """One session's game: the maze, the player and the frame count. Mutated only on the engine thread."""

    cache = None  # no KV cache: the game keeps its whole state exactly

    def __init__(self, game: Game, seed: int) -> None:
        self.game = game
        self.seed = seed

    @property
    def prompt(self) -> str:
        return self.game.prompt

    @property
    def frame_index(self) -> int:
        return self.game.frame_index


class GameWorlds:
    def __init__(self, height: int, width: int, chunk_frames: int, start_frames: int = 0) -> None:
        if start_frames < 0 or start_frames % chunk_frames:
            raise ValueError(f"start_frames must be a multiple of chunk_frames ({chunk_frames}), got {start_frames}")
        self.height, self.width = height, width
        self.chunk_frames = chunk_frames
        self.start_frames = start_frames

    def new_world(self, prompt: str = "", seed: int = 0, init_frames: np.ndarray | None = None) -> GameWorld:
        """A game at the start of maze `seed`, after its `start_frames` frames of standing still."""
        if init_frames is not None:
            raise ValueError("the game starts in its own maze; it takes no init frame")
        game = Game(seed=seed, prompt=prompt, height=self.height, width=self.width)
        for _ in range(self.start_frames):
            game.step(IDLE)
        return GameWorld(game, seed)

    def start_view(self, prompt: str, seed: int) -> np.ndarray:
        """The frames a game world of this seed and prompt begins with, uint8 (start_frames, H, W, 3)."""
        return start_view(seed, prompt, self.start_frames, self.height, self.width)

    def set_prompt(self, world: GameWorld, prompt: str) -> None:
        """Re-theme the same maze; the player stays where it is."""
        world.game.set_prompt(prompt)

    def step(self, worlds: Sequence[GameWorld], actions: Sequence[Action]) -> list[list[np.ndarray]]:
        """Advance each game by one chunk under its action; per world, the chunk's uint8 (H, W, 3) frames."""
        return [[world.game.step(action) for _ in range(self.chunk_frames)] for world, action in zip(worlds, actions)]
