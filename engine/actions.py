"""The action space: held keys and mouse motion, mapped to the fixed tensor the model is conditioned on.

Layout of the action tensor (length `len(keys) + 2`), documented in docs/actions.md:

    [0, K)   multi-hot held keys, in the order of `ActionConfig.keys` (1.0 = held during the frame)
    K        mouse dx / mouse_scale, clamped to [-1, 1] (positive = right)
    K + 1    mouse dy / mouse_scale, clamped to [-1, 1] (positive = down)

Keys are W3C `KeyboardEvent.code` names ("KeyW", "ArrowLeft", ...), so a browser can send what it reads off the
event. A name the model does not know is ignored and counted, never an error: clients and models evolve apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import ActionConfig


@dataclass(frozen=True)
class Action:
    """What the player does during one frame: the keys held and the mouse motion since the last frame (CSS px)."""

    keys: frozenset[str] = field(default_factory=frozenset)
    mouse_dx: float = 0.0
    mouse_dy: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", frozenset(self.keys))
        for name in ("mouse_dx", "mouse_dy"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not all(isinstance(key, str) for key in self.keys):
            raise ValueError("keys must be strings (KeyboardEvent.code names)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Action:
        """Parse ``{"keys": [...], "mouse_dx": float, "mouse_dy": float}``; missing fields default to idle."""
        unknown = set(data) - {"keys", "mouse_dx", "mouse_dy"}
        if unknown:
            raise ValueError(f"unknown action fields: {sorted(unknown)}")
        keys = data.get("keys", [])
        if isinstance(keys, str) or not isinstance(keys, Iterable):
            raise ValueError(f"keys must be a list of key names, got {keys!r}")
        return cls(frozenset(keys), data.get("mouse_dx", 0.0), data.get("mouse_dy", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"keys": sorted(self.keys), "mouse_dx": self.mouse_dx, "mouse_dy": self.mouse_dy}


IDLE = Action()


class ActionSpace:
    """Maps `Action`s to the model's action tensor; see the module docstring for the layout."""

    def __init__(self, config: ActionConfig) -> None:
        self.keys = tuple(config.keys)
        self.mouse_scale = config.mouse_scale
        self._index = {key: i for i, key in enumerate(self.keys)}

    @property
    def dim(self) -> int:
        return len(self.keys) + 2

    def encode(self, actions: Iterable[Action]) -> tuple[torch.Tensor, int]:
        """Encode actions to a float32 tensor (n, dim); also returns how many unknown key names were ignored."""
        rows = []
        unknown = 0
        for action in actions:
            row = [0.0] * self.dim
            for key in action.keys:
                index = self._index.get(key)
                if index is None:
                    unknown += 1
                else:
                    row[index] = 1.0
            row[-2] = max(-1.0, min(1.0, action.mouse_dx / self.mouse_scale))
            row[-1] = max(-1.0, min(1.0, action.mouse_dy / self.mouse_scale))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), self.dim), unknown

    def spec(self) -> dict[str, Any]:
        """The action spec as announced to clients."""
        return {
            "keys": list(self.keys),
            "mouse": {"scale_px": self.mouse_scale, "range": [-1.0, 1.0]},
            "tensor_layout": [*(f"key:{key}" for key in self.keys), "mouse_dx", "mouse_dy"],
        }
