"""World API: determinism, batching equals single steps, init frames, bad calls."""

from __future__ import annotations

import numpy as np
import pytest

from engine import IDLE, Action, WorldEngine
from tests.conftest import tiny_config

FORWARD = Action(frozenset({"KeyW"}))
TURN = Action(frozenset({"ArrowLeft"}), 15.0, 0.0)


def _rollout(engine: WorldEngine, seed: int, actions: list[Action], prompt: str = "") -> list[np.ndarray]:
    world = engine.new_world(prompt=prompt, seed=seed)
    return [engine.step([world], [a])[0][0] for a in actions]


def test_frames_are_uint8_of_the_configured_size(tiny_engine: WorldEngine) -> None:
    world = tiny_engine.new_world(seed=0)
    [[frame]] = tiny_engine.step([world], [FORWARD])
    assert frame.dtype == np.uint8 and frame.shape == (16, 16, 3)
    assert world.frame_index == 1 and world.stats.frames == 1 and world.stats.last_step_ms > 0


def test_same_seed_and_actions_give_identical_frames() -> None:
    actions = [FORWARD, TURN, IDLE, FORWARD, TURN, TURN]
    first = _rollout(WorldEngine.from_config(tiny_config()), 7, actions, "icy cave")
    second = _rollout(WorldEngine.from_config(tiny_config()), 7, actions, "icy cave")
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other_seed = _rollout(WorldEngine.from_config(tiny_config()), 8, actions, "icy cave")
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))


def test_actions_and_prompts_change_the_frames(tiny_engine: WorldEngine) -> None:
    base = _rollout(tiny_engine, 1, [FORWARD] * 3, "neon grid")
    assert not np.array_equal(_rollout(tiny_engine, 1, [TURN] * 3, "neon grid")[-1], base[-1])
    assert not np.array_equal(_rollout(tiny_engine, 1, [FORWARD] * 3, "wooden cabin")[-1], base[-1])


@pytest.mark.parametrize("policy", ["dense", "window"])
def test_batched_step_of_three_worlds_equals_three_single_steps(policy: str) -> None:
    engine = WorldEngine.from_config(tiny_config(cache={"policy": policy}))
    prompts = ["red brick dungeon", "", "sandstone temple"]
    histories = [0, 2, 5]  # the worlds hold different cache lengths when they are batched
    plans = [[FORWARD, TURN, IDLE], [TURN, TURN, FORWARD], [IDLE, FORWARD, TURN]]

    def prepared():
        worlds = [engine.new_world(prompt=p, seed=10 + i) for i, p in enumerate(prompts)]
        for world, frames in zip(worlds, histories):
            for _ in range(frames):
                engine.step([world], [TURN])
        return worlds

    batched_worlds, single_worlds = prepared(), prepared()
    for step in range(3):
        batched = engine.step(batched_worlds, [plan[step] for plan in plans])
        singles = [engine.step([w], [plan[step]])[0] for w, plan in zip(single_worlds, plans)]
        for b, s in zip(batched, singles):
            # uint8 frames; batched matmuls may round differently in the last float bit
            assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1
    assert [w.cache.tokens_per_layer() for w in batched_worlds] == [w.cache.tokens_per_layer() for w in single_worlds]


def test_unknown_keys_are_counted_per_world(tiny_engine: WorldEngine) -> None:
    a, b = tiny_engine.new_world(), tiny_engine.new_world()
    tiny_engine.step([a, b], [Action(frozenset({"KeyW", "KeyZ", "Numpad7"})), FORWARD])
    assert (a.stats.unknown_keys, b.stats.unknown_keys) == (2, 0)


def test_init_frames_continue_the_world(tiny_engine: WorldEngine) -> None:
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    world = tiny_engine.new_world(seed=2, init_frames=init)
    assert world.frame_index == 3 and world.stats.frames == 0
    assert world.cache.tokens_per_layer() == [3 * 16] * 2
    [[frame]] = tiny_engine.step([world], [FORWARD])
    assert world.frame_index == 4
    fresh = tiny_engine.new_world(seed=2)
    assert not np.array_equal(tiny_engine.step([fresh], [FORWARD])[0][0], frame)


def test_chunks_of_several_frames() -> None:
    engine = WorldEngine.from_config(tiny_config(model={"chunk_frames": 2}))
    world = engine.new_world(seed=0)
    [frames] = engine.step([world], [[FORWARD, TURN]])
    assert len(frames) == 2 and world.frame_index == 2
    [frames] = engine.step([world], [IDLE])  # one action for the whole chunk
    assert len(frames) == 2 and world.cache.tokens_per_layer() == [4 * 16] * 2
    with pytest.raises(ValueError, match="expected 1 or 2 actions"):
        engine.step([world], [[FORWARD, TURN, IDLE]])
    with pytest.raises(ValueError, match="multiple of chunk_frames=2"):
        engine.new_world(init_frames=np.zeros((3, 16, 16, 3), np.uint8))


def test_bad_calls_are_rejected(tiny_engine: WorldEngine) -> None:
    world = tiny_engine.new_world()
    with pytest.raises(ValueError, match="one action entry per world"):
        tiny_engine.step([world], [])
    with pytest.raises(ValueError, match="only once per step"):
        tiny_engine.step([world, world], [IDLE, IDLE])
    with pytest.raises(ValueError, match="init_frames must be uint8"):
        tiny_engine.new_world(init_frames=np.zeros((1, 8, 8, 3), np.uint8))
    assert world.frame_index == 0, "a rejected call must not advance the world"


def test_set_prompt_keeps_history(tiny_engine: WorldEngine) -> None:
    world = tiny_engine.new_world(prompt="icy cave", seed=4)
    tiny_engine.step([world], [FORWARD])
    tiny_engine.set_prompt(world, "green hedge maze")
    assert world.prompt == "green hedge maze" and world.frame_index == 1
    tiny_engine.step([world], [FORWARD])
    assert world.cache.tokens_per_layer() == [2 * 16] * 2
