"""Action mapping: key names and mouse deltas -> the documented tensor; unknown keys are ignored and counted."""

from __future__ import annotations

import math

import pytest
import torch

from engine import IDLE, Action, ActionSpace
from engine.config import ActionConfig


def test_keys_and_mouse_map_to_the_documented_layout() -> None:
    space = ActionSpace(ActionConfig())
    assert space.dim == 12
    encoded, unknown = space.encode([Action(frozenset({"KeyW", "ArrowLeft", "ShiftLeft"}), 10.0, -40.0)])
    expected = torch.zeros(1, 12)
    expected[0, [0, 4, 9]] = 1.0  # KeyW, ArrowLeft, ShiftLeft in ActionConfig.keys order
    expected[0, 10] = 0.5  # 10 px / 20 px
    expected[0, 11] = -1.0  # -40 px / 20 px, clamped
    assert unknown == 0
    assert torch.equal(encoded, expected)


def test_unknown_keys_are_ignored_and_counted() -> None:
    space = ActionSpace(ActionConfig())
    encoded, unknown = space.encode([Action(frozenset({"KeyW", "KeyQ", "F13"})), IDLE])
    assert unknown == 2
    assert encoded[0, 0] == 1.0 and encoded[0].sum() == 1.0
    assert encoded[1].abs().sum() == 0.0


def test_custom_key_order_is_respected() -> None:
    space = ActionSpace(ActionConfig(keys=("Space", "KeyW")))
    encoded, _ = space.encode([Action(frozenset({"KeyW"}))])
    assert encoded.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert space.spec()["tensor_layout"] == ["key:Space", "key:KeyW", "mouse_dx", "mouse_dy"]


def test_action_dict_round_trip_and_validation() -> None:
    action = Action(frozenset({"KeyD", "Space"}), 3.5, -1.0)
    assert Action.from_dict(action.to_dict()) == action
    assert Action.from_dict({}) == IDLE
    with pytest.raises(ValueError, match="unknown action fields"):
        Action.from_dict({"keys": [], "jump": True})
    with pytest.raises(ValueError, match="keys must be a list"):
        Action.from_dict({"keys": "KeyW"})
    with pytest.raises(ValueError, match="finite"):
        Action(mouse_dx=math.nan)
    with pytest.raises(ValueError, match="finite"):
        Action.from_dict({"mouse_dy": "up"})
