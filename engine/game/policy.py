"""A human-like player for recording data: sticky intents in bursts, and it turns away from walls.

A person at the keyboard does not press a new key every frame: they walk for a while, turn in a burst, glance
around with the mouse, back up, strafe, stop. `HumanPolicy` holds an *intent* (held keys, a mouse speed and a
duration drawn from INTENTS) for several frames, with a little per-frame mouse jitter, then draws the next one.

It looks at the game only to avoid walls, as a player would: when an intent walks forward and the wall ahead is
closer than AVOID_DISTANCE tiles, or the last step was mostly blocked, it turns in place towards the more open
side (probing the distances at +-70 degrees) until the way ahead is clear for CLEAR_DISTANCE tiles, then walks on.
Sideways and backward intents that hit a wall are dropped. Deterministic: a pure function of its seed and of the
states it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.actions import Action

if TYPE_CHECKING:
    from engine.game.game import Game

AVOID_DISTANCE = 1.05  # tiles from the player's centre to the wall ahead
CLEAR_DISTANCE = 2.0
BLOCKED_FRACTION = 0.3  # a step that moved less than this fraction of what it intended counts as blocked
MAX_AVOID_FRAMES = 40  # 200 degrees at 5 degrees per frame


@dataclass(frozen=True)
class IntentKind:
    """A kind of intent: `keys` to hold (one of `variants` is added at random, e.g. a turn direction), `mouse`
    (px per frame, sign drawn at random, 0 for none), duration in frames drawn uniformly from `frames`, and a
    relative probability `weight`."""

    name: str
    weight: float
    keys: tuple[str, ...]
    variants: tuple[tuple[str, ...], ...]
    mouse: tuple[float, float]
    frames: tuple[int, int]


INTENTS: tuple[IntentKind, ...] = (
    IntentKind("walk", 0.30, ("KeyW",), ((),), (0, 0), (10, 40)),
    IntentKind("run", 0.08, ("KeyW", "ShiftLeft"), ((),), (0, 0), (8, 25)),
    IntentKind("walk_turn", 0.12, ("KeyW",), (("ArrowLeft",), ("ArrowRight",)), (0, 0), (3, 12)),
    IntentKind("walk_mouse", 0.10, ("KeyW",), ((),), (3, 14), (4, 16)),
    IntentKind("turn", 0.12, (), (("ArrowLeft",), ("ArrowRight",)), (0, 0), (4, 18)),
    IntentKind("look", 0.07, (), ((),), (6, 20), (3, 12)),
    IntentKind("strafe", 0.06, (), (("KeyA",), ("KeyD",), ("KeyW", "KeyA"), ("KeyW", "KeyD")), (0, 0), (4, 12)),
    IntentKind("back", 0.04, ("KeyS",), ((),), (0, 0), (3, 10)),
    IntentKind("jump", 0.04, ("KeyW", "Space"), ((),), (0, 0), (4, 12)),
    IntentKind("stand", 0.07, (), ((),), (0, 0), (5, 25)),
)


@dataclass
class _Intent:
    kind: str
    keys: frozenset[str]
    mouse_dx: float  # px per frame
    frames_left: int


class HumanPolicy:
    """Sticky, bursty actions that steer clear of walls; `act(game)` gives the action for the next frame."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = np.random.default_rng((seed % 2**64, 2))
        self._weights = np.array([kind.weight for kind in INTENTS]) / sum(kind.weight for kind in INTENTS)
        self._intent: _Intent | None = None

    @property
    def intent(self) -> str:
        """The name of the current intent ('avoid' while turning away from a wall); '' before the first act."""
        return self._intent.kind if self._intent else ""

    def act(self, game: Game) -> Action:
        """The action for `game`'s next frame. Reads the game (distances to walls, the last step), never changes it."""
        intent = self._intent
        blocked = game.intended_distance > 0 and game.moved_distance < BLOCKED_FRACTION * game.intended_distance
        if intent is not None and intent.kind == "avoid":
            if intent.frames_left <= 0 or game.distance_ahead() >= CLEAR_DISTANCE:
                intent = self._walk()
        elif intent is None or intent.frames_left <= 0:
            intent = self._draw()
        moves_forward = "KeyW" in intent.keys
        moves_other = bool(intent.keys & {"KeyA", "KeyD", "KeyS"})
        if moves_forward and (blocked or game.distance_ahead() < AVOID_DISTANCE):
            intent = self._avoid(game)
        elif moves_other and blocked:
            intent = self._draw()
            if "KeyW" in intent.keys and game.distance_ahead() < AVOID_DISTANCE:
                intent = self._avoid(game)
        self._intent = intent
        intent.frames_left -= 1
        mouse = intent.mouse_dx
        if mouse:
            mouse = round(mouse + float(self._rng.normal(0, 1.5)), 1)
        return Action(intent.keys, mouse, 0.0)

    def _draw(self) -> _Intent:
        kind = INTENTS[int(self._rng.choice(len(INTENTS), p=self._weights))]
        variant = kind.variants[int(self._rng.integers(len(kind.variants)))]
        mouse = 0.0
        if kind.mouse[1] > 0:
            mouse = float(self._rng.uniform(*kind.mouse)) * (1 if self._rng.random() < 0.5 else -1)
        frames = int(self._rng.integers(kind.frames[0], kind.frames[1] + 1))
        return _Intent(kind.name, frozenset(kind.keys + variant), mouse, frames)

    def _walk(self) -> _Intent:
        return _Intent("walk", frozenset({"KeyW"}), 0.0, int(self._rng.integers(8, 30)))

    def _avoid(self, game: Game) -> _Intent:
        """Turn in place towards the more open side (a coin flip when both are alike); keyboard or mouse."""
        left, right = game.distance_ahead(-70.0), game.distance_ahead(70.0)
        if abs(left - right) < 0.25:
            go_right = self._rng.random() < 0.5
        else:
            go_right = right > left
        if self._rng.random() < 0.7:
            return _Intent("avoid", frozenset({"ArrowRight" if go_right else "ArrowLeft"}), 0.0, MAX_AVOID_FRAMES)
        mouse = float(self._rng.uniform(12, 20)) * (1 if go_right else -1)
        return _Intent("avoid", frozenset(), mouse, MAX_AVOID_FRAMES)
