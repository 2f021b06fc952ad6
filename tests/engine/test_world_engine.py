"""World API: determinism, batching equals single steps, init frames, bad calls."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import IDLE, Action, WorldEngine, attention, world_engine
from engine.attention import attend as _attend
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


def _twin_batches(engine: WorldEngine, histories: tuple[int, ...]) -> tuple[list, list]:
    """Two identical batches of worlds (prompts and seeds of their own), world i stepped histories[i] frames."""
    prompts = ["red brick dungeon", "", "sandstone temple"]

    def prepared():
        worlds = [engine.new_world(prompt=p, seed=10 + i) for i, p in enumerate(prompts)]
        for world, frames in zip(worlds, histories):
            for _ in range(frames):
                engine.step([world], [TURN])
        return worlds

    return prepared(), prepared()


@pytest.mark.parametrize("policy", ["dense", "window"])
def test_batched_step_of_three_worlds_equals_three_single_steps(policy: str) -> None:
    engine = WorldEngine.from_config(tiny_config(cache={"policy": policy}))
    plans = [[FORWARD, TURN, IDLE], [TURN, TURN, FORWARD], [IDLE, FORWARD, TURN]]
    # different cache lengths: padded together in some steps, alone in others (MAX_PADDING)
    batched_worlds, single_worlds = _twin_batches(engine, (0, 2, 5))
    for step in range(3):
        batched = engine.step(batched_worlds, [plan[step] for plan in plans])
        singles = [engine.step([w], [plan[step]])[0] for w, plan in zip(single_worlds, plans)]
        for b, s in zip(batched, singles):
            # uint8 frames; batched matmuls may round differently in the last float bit
            assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1
    assert [w.cache.tokens_per_layer() for w in batched_worlds] == [w.cache.tokens_per_layer() for w in single_worlds]


@pytest.mark.parametrize("policy", ["dense", "window", "tempcache"])
@pytest.mark.parametrize("histories", [(4, 4, 4), (3, 4, 6)], ids=["one-length", "padded"])
def test_worlds_attend_together_as_each_would_alone(policy: str, histories: tuple[int, ...], monkeypatch) -> None:
    engine = WorldEngine.from_config(tiny_config(cache={"policy": policy}))
    plans = [[FORWARD, TURN, IDLE], [TURN, TURN, FORWARD], [IDLE, FORWARD, TURN]]
    batched_worlds, single_worlds = _twin_batches(engine, histories)
    alone = []  # calls of one world's attention
    monkeypatch.setattr(attention, "attend", lambda *args: alone.append(1) or _attend(*args))
    for step in range(3):
        alone.clear()
        batched = engine.step(batched_worlds, [plan[step] for plan in plans])
        # dense: 3 to 8 frames of 16 slots, padded to the longest within MAX_PADDING; window: at most 4 frames.
        # (TempCache's slots merge by content, so its worlds may lie further apart.)
        if policy != "tempcache":
            assert not alone
        singles = [engine.step([w], [plan[step]])[0] for w, plan in zip(single_worlds, plans)]
        for b, s in zip(batched, singles):
            assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1  # batched matmuls may round differently
    assert [w.cache.tokens_per_layer() for w in batched_worlds] == [w.cache.tokens_per_layer() for w in single_worlds]


@pytest.mark.parametrize("policy", ["window", "tempcache"])
@pytest.mark.parametrize("histories", [(4, 4, 4), (3, 4, 6)], ids=["one-length", "padded"])
def test_annsa_worlds_attend_in_one_layout_as_each_would_alone(
    policy: str, histories: tuple[int, ...], monkeypatch
) -> None:
    """AnnSA lays the batch's worlds side by side, shorter ones padded: one layout and one kernel call per layer
    and forward for the whole batch, and each world's frames as it makes them alone."""
    engine = WorldEngine.from_config(tiny_config(cache={"policy": policy}, attention={"annsa": True, "block_k": 8}))
    plans = [[FORWARD, TURN, IDLE], [TURN, TURN, FORWARD], [IDLE, FORWARD, TURN]]
    batched_worlds, single_worlds = _twin_batches(engine, histories)
    groups = []  # worlds per sparse call
    sparse_attention = type(engine.sparse).self_attention

    def counted(self, layer, q, k, v, slots):
        groups.append(q.shape[1])
        return sparse_attention(self, layer, q, k, v, slots)

    monkeypatch.setattr(type(engine.sparse), "self_attention", counted)
    for step in range(3):
        groups.clear()
        batched = engine.step(batched_worlds, [plan[step] for plan in plans])
        assert groups and set(groups) == {3}  # every world in every sparse call
        singles = [engine.step([w], [plan[step]])[0] for w, plan in zip(single_worlds, plans)]
        for b, s in zip(batched, singles):
            assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1  # batched matmuls may round differently
    assert [w.cache.tokens_per_layer() for w in batched_worlds] == [w.cache.tokens_per_layer() for w in single_worlds]


def test_worlds_far_apart_in_length_attend_one_by_one(monkeypatch) -> None:
    engine = WorldEngine.from_config(tiny_config())  # dense
    batched_worlds, single_worlds = _twin_batches(engine, (0, 0, 12))
    alone = []
    monkeypatch.setattr(attention, "attend", lambda *args: alone.append(1) or _attend(*args))
    # padded to the third world's 12 frames, the batch would attend 3 x 13 frames for its 15: beyond MAX_PADDING
    batched = engine.step(batched_worlds, [FORWARD] * 3)
    depth, forwards = engine.config.model.depth, engine.sampler.steps
    # every world, layer and forward on its own, and the commit pass of the third world's last frame (alone in it)
    assert len(alone) == 3 * depth * forwards + depth
    singles = [engine.step([w], [FORWARD])[0] for w in single_worlds]
    for b, s in zip(batched, singles):
        assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1


def test_a_batch_stacks_its_slots_once_a_step_and_its_commit_pass_reuses_them(monkeypatch) -> None:
    engine = WorldEngine.from_config(tiny_config())
    worlds, _ = _twin_batches(engine, (2, 3, 3))
    engine.step(worlds, [FORWARD] * 3)  # the batch's first step together: the next commits the chunks it made
    stacks = []

    class Counted(attention.StackedSlots):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stacks.append(1)

    monkeypatch.setattr(attention, "StackedSlots", Counted)
    engine.step(worlds, [TURN] * 3)
    # one stack per layer for the step's denoising forwards; the commit pass read its last step's as they were
    assert len(stacks) == engine.config.model.depth
    stacks.clear()
    engine.step(worlds[:2], [TURN] * 2)  # another batch: its commit pass stacks its slots anew
    assert len(stacks) == 2 * engine.config.model.depth


def test_guidance_strengthens_the_prompt_and_leaves_an_empty_prompt_alone(tiny_engine: WorldEngine) -> None:
    guided = tiny_engine.sibling(tiny_config(sampler={"guidance": 2.0}))
    plan = [FORWARD, TURN, IDLE]
    # without a prompt the prompted and the prompt-free velocities are the same: guidance changes nothing, exactly
    assert all(np.array_equal(a, b) for a, b in zip(_rollout(guided, 4, plan), _rollout(tiny_engine, 4, plan)))
    plain, strong = _rollout(tiny_engine, 4, plan, "icy cave"), _rollout(guided, 4, plan, "icy cave")
    assert not np.array_equal(plain[0], strong[0])
    # per world in a batch: a prompt-free world batched with a prompted one is still unchanged
    worlds = [guided.new_world("", seed=4), guided.new_world("icy cave", seed=4)]
    batched = [guided.step(worlds, [a, a]) for a in plan]
    free = _rollout(tiny_engine, 4, plan)
    for k in range(len(plan)):
        assert np.abs(batched[k][0][0].astype(int) - free[k].astype(int)).max() <= 1  # batched: last-bit rounding
        assert np.abs(batched[k][1][0].astype(int) - strong[k].astype(int)).max() <= 1


def test_guided_velocity_extrapolates_from_the_prompt_free_one_by_the_guidance_scale(tiny_engine: WorldEngine) -> None:
    # one Euler step from t = 1: latents = noise - v, and v = v_free + g (v_prompt - v_free) is linear in g
    def latents(guidance: float) -> torch.Tensor:
        engine = tiny_engine.sibling(tiny_config(sampler={"steps": 1, "guidance": guidance}))
        world = engine.new_world("green hedge maze", seed=2)
        return engine._denoise([world], engine._encode_actions([world], [FORWARD])).clean.double()

    one, two, three = latents(1.0), latents(2.0), latents(3.0)
    assert not torch.allclose(two, one)
    torch.testing.assert_close(three - two, two - one, rtol=0, atol=1e-4)


def test_action_guidance_strengthens_moving_and_leaves_standing_still_alone(tiny_engine: WorldEngine) -> None:
    guided = tiny_engine.sibling(tiny_config(sampler={"action_guidance": 1.0}))
    # standing still: the action and its null are the same, so the guided velocity is the plain one, exactly
    assert all(
        np.array_equal(a, b) for a, b in zip(_rollout(guided, 3, [IDLE] * 3), _rollout(tiny_engine, 3, [IDLE] * 3))
    )
    plan = [FORWARD, TURN, FORWARD]
    plain, strong = _rollout(tiny_engine, 3, plan, "icy cave"), _rollout(guided, 3, plan, "icy cave")
    assert not np.array_equal(plain[0], strong[0])
    # per world in a batch: a world standing still beside a moving one is still unchanged
    worlds = [guided.new_world("icy cave", seed=3), guided.new_world("icy cave", seed=3)]
    still = _rollout(tiny_engine, 3, [IDLE] * 3, "icy cave")
    for k, action in enumerate(plan):
        [[idle], [moving]] = guided.step(worlds, [IDLE, action])
        assert np.abs(idle.astype(int) - still[k].astype(int)).max() <= 1  # batched: last-bit rounding
        assert np.abs(moving.astype(int) - strong[k].astype(int)).max() <= 1


def test_action_guided_velocity_extrapolates_from_standing_still_by_its_scale(tiny_engine: WorldEngine) -> None:
    # one Euler step from t = 1 with prompt guidance on as well: v = v_cfg + w (v(action) - v(idle)), linear in w
    def latents(weight: float) -> torch.Tensor:
        sampler = {"steps": 1, "guidance": 2.0, "action_guidance": weight}
        engine = tiny_engine.sibling(tiny_config(sampler=sampler))
        world = engine.new_world("green hedge maze", seed=2)
        return engine._denoise([world], engine._encode_actions([world], [TURN])).clean.double()

    zero, one, two = latents(0.0), latents(1.0), latents(2.0)
    assert not torch.allclose(one, zero)
    torch.testing.assert_close(two - one, one - zero, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_engines_make_the_float32_frames(dtype: str) -> None:
    # bfloat16 is what a GPU runs by default (runtime.dtype auto); the CPU runs the same code paths
    plan = [FORWARD, TURN, IDLE, FORWARD]
    sections = {"cache": {"policy": "tempcache"}, "attention": {"annsa": True, "annca": True}}
    exact = _rollout(WorldEngine.from_config(tiny_config(**sections)), 5, plan, "icy cave")
    reduced_engine = WorldEngine.from_config(tiny_config(**sections, runtime={"dtype": dtype}))
    reduced = _rollout(reduced_engine, 5, plan, "icy cave")
    assert reduced_engine.model.dit.blocks[0].qkv.weight.dtype == getattr(torch, dtype)
    for a, b in zip(exact, reduced):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


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
    assert len(frames) == 2 and world.cache.tokens_per_layer() == [2 * 16] * 2  # the newest chunk is pending
    engine.flush([world])
    assert world.cache.tokens_per_layer() == [4 * 16] * 2
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
    tiny_engine.flush([world])
    assert world.cache.tokens_per_layer() == [2 * 16] * 2


def test_a_pending_chunk_is_written_under_the_prompt_it_was_generated_with(tiny_engine: WorldEngine) -> None:
    """A chunk waits for the world's next step to be written; a prompt set in between conditions only the chunks
    after it, exactly as when the chunk is written at once."""
    folded, flushed = (tiny_engine.new_world(prompt="icy cave", seed=4) for _ in range(2))
    for world in (folded, flushed):
        tiny_engine.step([world], [FORWARD])
        if world is flushed:
            tiny_engine.flush([world])
        tiny_engine.set_prompt(world, "neon grid")
        tiny_engine.step([world], [TURN])
        tiny_engine.flush([world])
    for a, b in zip(_cached(folded), _cached(flushed), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    fresh = tiny_engine.new_world(prompt="neon grid", seed=4)
    tiny_engine.step([fresh], [FORWARD])
    tiny_engine.flush([fresh])
    # block 1's keys come after block 0's cross-attention to the prompt
    assert not torch.allclose(_cached(fresh)[2], _cached(folded)[2][:16], atol=1e-3), "the prompt conditions the cache"


def test_a_step_writes_the_chunks_of_its_worlds_previous_steps_in_its_first_forward() -> None:
    """Batched worlds with and without a pending chunk; the caches and frames equal those of a separate commit
    pass (the engine before the fold), to float rounding."""
    engine = WorldEngine.from_config(tiny_config(cache={"policy": "tempcache"}, attention={"annsa": True}))
    folded = [engine.new_world("icy cave", seed=1), engine.new_world("neon grid", seed=2)]
    separate = [engine.new_world("icy cave", seed=1), engine.new_world("neon grid", seed=2)]
    forwards: list[int] = []
    engine.model.dit.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    for i, action in enumerate([FORWARD, TURN, IDLE, TURN, FORWARD, FORWARD, TURN, IDLE]):
        joined = slice(0, 2 if i >= 2 else 1)  # the second world joins at its own first step
        forwards.clear()
        got = engine.step(folded[joined], [action] * len(folded[joined]))
        rows = forwards[0] - forwards[-1]  # the first forward's extra rows: one commit row per pending chunk
        assert rows == (0 if i == 0 else 1 if i == 2 else len(folded[joined]))
        engine.flush(separate[joined])
        want = engine.step(separate[joined], [action] * len(separate[joined]))
        for g, w in zip(got, want):
            assert np.abs(g[0].astype(int) - w[0].astype(int)).max() <= 1
    engine.flush(folded + separate)
    for a, b in zip(folded, separate):
        assert a.pending is None and a.cache.tokens_per_layer() == b.cache.tokens_per_layer()
        for x, y in zip(_cached(a), _cached(b), strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


# ---- predict and observe: the two halves of step, for teacher forcing ---------------------------------------------


def _histories_equal(a, b) -> bool:
    return a.frame_index == b.frame_index and a.cache.tokens_per_layer() == b.cache.tokens_per_layer()


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"model": {"chunk_frames": 2}},
        {"cache": {"policy": "tempcache"}},
        {"cache": {"policy": "tempcache"}, "attention": {"annsa": True, "annca": True}},
    ],
    ids=["dense", "chunks-of-2", "tempcache", "tempcache+annsa+annca"],
)
def test_predict_generates_what_step_would_without_committing(sections: dict) -> None:
    engine = WorldEngine.from_config(tiny_config(**sections))
    chunk = [FORWARD, TURN][: engine.chunk_frames]
    predicting, stepping = engine.new_world("icy cave", seed=5), engine.new_world("icy cave", seed=5)
    for world in (predicting, stepping):
        for _ in range(6):  # past a bounded cache's capacity (4 frames), so that TempCache has merged
            engine.step([world], [TURN])
    engine.flush([predicting])  # predict writes the pending chunk first; nothing after it
    tokens, index = predicting.cache.tokens_per_layer(), predicting.frame_index
    [predicted] = engine.predict([predicting], [chunk])
    assert predicting.cache.tokens_per_layer() == tokens and predicting.frame_index == index
    assert predicting.stats.frames == 6 * engine.chunk_frames, "a prediction is not a generated frame of the world"
    [stepped] = engine.step([stepping], [chunk])
    assert len(predicted) == engine.chunk_frames
    assert all(p.dtype == np.uint8 and p.shape == (16, 16, 3) for p in predicted)
    assert all(np.array_equal(p, s) for p, s in zip(predicted, stepped))
    # the generator advanced: predicting the same chunk again draws other noise
    [again] = engine.predict([predicting], [chunk])
    assert not np.array_equal(again[0], predicted[0])


def test_latent_steps_and_observations_are_the_frame_ones_in_latents() -> None:
    """step_latents makes the latents whose frames step shows, and leaves the world as step does; observe_latents
    of a frame's encoding is observe of the frame; skipping frames ahead is for the dense policy only."""
    engine = WorldEngine.from_config(tiny_config(model={"previous_frame_input": True}))
    torch.nn.init.normal_(engine.model.dit.previous_embed.weight, std=0.02)
    latents, frames = engine.new_world("icy cave", seed=5), engine.new_world("icy cave", seed=5)
    true = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    engine.observe(frames, true, [IDLE, TURN])
    encoded = engine.model.autoencoder.encode(torch.from_numpy(true))[None]
    engine.observe_latents([latents], encoded, engine.action_space.encode([IDLE, TURN])[0][None])
    for action in [FORWARD, TURN, FORWARD]:
        own = engine.step_latents([latents], engine.action_space.encode([action])[0][None])
        [shown] = engine.step([frames], [action])
        decoded = engine.model.autoencoder.decode(own.flatten(0, 1).float()).numpy()
        assert np.array_equal(decoded[0], shown[0])
        assert latents.frame_index == frames.frame_index and latents.stats.frames == frames.stats.frames
    with pytest.raises(ValueError, match="encoded actions"):
        engine.step_latents([latents], torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="at least one world"):
        engine.step_latents([], torch.zeros(0, 1, engine.action_space.dim))
    # with `reencode` the caches receive the encoding of the decoded frames, whichever of the two made them
    reencoding = WorldEngine.from_config(tiny_config(sampler={"reencode": True}))
    latents, frames = reencoding.new_world("icy cave", seed=2), reencoding.new_world("icy cave", seed=2)
    own = reencoding.step_latents([latents], reencoding.action_space.encode([FORWARD])[0][None])
    [shown] = reencoding.step([frames], [FORWARD])
    assert torch.equal(own[0], reencoding.model.autoencoder.encode(torch.from_numpy(np.stack(shown))))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(reencoding.step([latents], [TURN])[0], reencoding.step([frames], [TURN])[0])
    )
    assert engine.policy.name == "dense"
    bounded = WorldEngine.from_config(tiny_config(cache={"policy": "tempcache"}))
    with pytest.raises(ValueError, match="only the dense policy may skip frames"):
        bounded.observe_latents([bounded.new_world()], encoded[:, :1], torch.zeros(1, 1, engine.action_space.dim), [9])
    with pytest.raises(ValueError, match="positive multiple"):
        engine.observe_latents([latents], encoded[:, :0], torch.zeros(1, 0, engine.action_space.dim))


@pytest.mark.parametrize(
    "sections", [{"cache": {"policy": "dense"}}, {"cache": {"policy": "tempcache"}, "attention": {"annsa": True}}]
)
def test_the_commit_pass_writes_what_a_whole_forward_would(sections: dict) -> None:
    """The commit pass skips the last block's work after its self-attention and the output layer; the caches
    it leaves are the ones a whole forward leaves."""
    engine = WorldEngine.from_config(tiny_config(model={"previous_frame_input": True}, **sections))
    short, whole = engine.new_world("icy cave", seed=0), engine.new_world("icy cave", seed=0)
    for action in [FORWARD, TURN, IDLE, TURN]:
        engine.step([short], [action])
        engine.flush([short])  # every chunk through the commit pass on its own, not folded into the next step
    engine.model.dit.write_keys = lambda *args: engine.model.dit(*args)
    for action in [FORWARD, TURN, IDLE, TURN]:
        engine.step([whole], [action])
        engine.flush([whole])
    for a, b in zip(short.cache.layers, whole.cache.layers):
        assert a.length == b.length > 0
        torch.testing.assert_close(a.key[: a.length], b.key[: b.length], rtol=0, atol=0)
        torch.testing.assert_close(a.value[: a.length], b.value[: b.length], rtol=0, atol=0)


def test_each_frame_is_given_the_latent_of_the_frame_before_it() -> None:
    engine = WorldEngine.from_config(tiny_config(model={"previous_frame_input": True}))
    given: list[torch.Tensor] = []
    engine.model.dit.register_forward_hook(lambda module, args, output: given.append(args[5]))
    world = engine.new_world("icy cave", seed=0)
    engine.step([world], [FORWARD])  # the denoising passes; the chunk waits for the next step to be written
    assert len(given) == engine.sampler.steps and not any(p.any() for p in given)
    first = world.last_latent.clone()
    given.clear()
    engine.step([world], [TURN])
    rows = given[-1].shape[0]  # a denoising forward's rows (its guidance passes)
    assert given[0].shape[0] == rows + 1, "the first forward also writes the pending chunk"
    assert not given[0][rows].any(), "the pending chunk is the first frame: nothing before it"
    assert all(torch.equal(p[r, 0], first) for p in given for r in range(rows))
    assert not torch.equal(world.last_latent, first)
    true = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    engine.observe(world, true, [IDLE, IDLE])
    torch.testing.assert_close(world.last_latent, engine.model.autoencoder.encode(torch.from_numpy(true[1:]))[0])


def test_batched_predict_matches_single_predictions(tiny_engine: WorldEngine) -> None:
    batched = [tiny_engine.new_world(prompt=p, seed=i) for i, p in enumerate(["", "neon grid"])]
    singles = [tiny_engine.new_world(prompt=p, seed=i) for i, p in enumerate(["", "neon grid"])]
    together = tiny_engine.predict(batched, [FORWARD, TURN])
    alone = [tiny_engine.predict([w], [a])[0] for w, a in zip(singles, [FORWARD, TURN])]
    for b, s in zip(together, alone):
        assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1


@pytest.mark.parametrize("context_noise", [0.0, 0.3])
def test_observe_under_idle_equals_init_frames(context_noise: float) -> None:
    engine = WorldEngine.from_config(tiny_config(sampler={"steps": 2, "context_noise": context_noise}))
    init = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    initialised = engine.new_world("sandstone temple", seed=3, init_frames=init)
    observed = engine.new_world("sandstone temple", seed=3)
    engine.observe(observed, init, [IDLE] * 3)
    assert _histories_equal(observed, initialised) and observed.stats.frames == 0
    for action in (FORWARD, TURN):
        [[a]], [[b]] = engine.step([observed], [action]), engine.step([initialised], [action])
        assert np.array_equal(a, b)


def test_teacher_forcing_writes_the_true_frame_under_its_action(tiny_engine: WorldEngine) -> None:
    true = np.random.default_rng(2).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    forced = tiny_engine.new_world(seed=0)
    tiny_engine.observe(forced, true[:1], [IDLE])
    for t in range(1, 4):
        tiny_engine.predict([forced], [FORWARD])
        tiny_engine.observe(forced, true[t : t + 1], [FORWARD])
    assert forced.frame_index == 4 and forced.cache.tokens_per_layer() == [4 * 16] * 2
    # the same frames observed at once give the same history; other actions give another one
    at_once, turned = tiny_engine.new_world(seed=9), tiny_engine.new_world(seed=9)
    tiny_engine.observe(at_once, true, [IDLE] + [FORWARD] * 3)
    tiny_engine.observe(turned, true, [IDLE] + [TURN] * 3)
    [[a]], [[b]] = tiny_engine.predict([at_once], [FORWARD]), tiny_engine.predict([turned], [FORWARD])
    assert not np.array_equal(a, b), "observed actions must condition the history"


def test_observe_rejects_bad_frames_and_actions(tiny_engine: WorldEngine) -> None:
    world = tiny_engine.new_world()
    frame = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"frames must be uint8 \(T, 16, 16, 3\)"):
        tiny_engine.observe(world, np.zeros((1, 8, 8, 3), np.uint8), [IDLE])
    with pytest.raises(ValueError, match="frames must be uint8"):
        tiny_engine.observe(world, frame.astype(np.float32), [IDLE])
    with pytest.raises(ValueError, match="frames must be uint8"):
        tiny_engine.observe(world, frame[0], [IDLE])
    with pytest.raises(ValueError, match="positive multiple of chunk_frames=1"):
        tiny_engine.observe(world, frame[:0], [])
    with pytest.raises(ValueError, match="one Action per frame: got 2 for 1 frames"):
        tiny_engine.observe(world, frame, [IDLE, IDLE])
    with pytest.raises(ValueError, match="one Action per frame"):
        tiny_engine.observe(world, frame, [{"keys": []}])
    with pytest.raises(ValueError, match="one action entry per world"):
        tiny_engine.predict([world], [])
    with pytest.raises(ValueError, match="only once per step"):
        tiny_engine.predict([world, world], [IDLE, IDLE])
    assert world.frame_index == 0 and world.cache.tokens_per_layer() == [0, 0]


def _cached(world) -> list[torch.Tensor]:
    """Every layer's keys and values in use."""
    return [t[: layer.length] for layer in world.cache.layers for t in (layer.key, layer.value)]


@pytest.mark.parametrize("chunk_frames", [1, 2])
def test_reencoding_writes_a_generated_chunk_as_observing_its_frames_would(chunk_frames: int) -> None:
    engine = WorldEngine.from_config(tiny_config(model={"chunk_frames": chunk_frames}, sampler={"reencode": True}))
    stepping, observing = engine.new_world("icy cave", seed=4), engine.new_world("icy cave", seed=4)
    for action in (FORWARD, TURN, FORWARD):
        stepped = engine.step([stepping], [action])[0]
        predicted = engine.predict([observing], [action])[0]  # the same noise: the worlds' histories are the same
        assert all(np.array_equal(s, p) for s, p in zip(stepped, predicted))
        engine.observe(observing, np.stack(stepped), [action] * chunk_frames)
    engine.flush([stepping])
    for a, b in zip(_cached(stepping), _cached(observing), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_without_reencoding_the_history_holds_the_denoised_latents() -> None:
    engine = WorldEngine.from_config(tiny_config(sampler={"reencode": False}))
    stepping, observing = engine.new_world("icy cave", seed=4), engine.new_world("icy cave", seed=4)
    [[frame]] = engine.step([stepping], [FORWARD])
    engine.predict([observing], [FORWARD])
    engine.observe(observing, frame[None], [FORWARD])
    engine.flush([stepping])
    # decoding to uint8 and encoding again is not the identity: the caches differ
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(_cached(stepping), _cached(observing), strict=True))


def test_the_engine_steps_without_cudnn_attention_and_restores_it(tiny_engine: WorldEngine, monkeypatch) -> None:
    backends = torch.backends.cuda
    seen = []  # whether cuDNN attention was enabled at each of the step's attention calls
    monkeypatch.setattr(attention, "attend", lambda *args: seen.append(backends.cudnn_sdp_enabled()) or _attend(*args))
    world = tiny_engine.new_world(seed=0)
    for _ in range(2):  # the second step's first forward also commits the first step's frame
        tiny_engine.step([world], [FORWARD])
    tiny_engine.flush([world])
    assert seen and not any(seen) and backends.cudnn_sdp_enabled()


def test_a_caller_that_chose_cudnn_attention_alone_keeps_it() -> None:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), attention.without_cudnn_attention():
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]), attention.without_cudnn_attention():
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["dense", "tempcache", "tempcache+annsa"])
def test_on_a_gpu_worlds_far_apart_attend_padded_as_each_would_alone(policy: str, monkeypatch) -> None:
    cache, annsa = policy.split("+")[0], policy.endswith("+annsa")  # AnnSA: the Triton kernel, worlds side by side
    sections = {"cache": {"policy": cache}, "attention": {"annsa": annsa, "block_k": 8}, "runtime": {"device": "cuda"}}
    engine = WorldEngine.from_config(tiny_config(**sections))
    batched_worlds, single_worlds = _twin_batches(engine, (0, 2, 12))  # apart beyond a CPU's padding, not a GPU's
    alone = []
    monkeypatch.setattr(attention, "attend", lambda *args: alone.append(1) or _attend(*args))
    for _ in range(3):
        alone.clear()
        batched = engine.step(batched_worlds, [FORWARD, TURN, IDLE])
        if policy == "dense":
            assert not alone  # step k pads to 3 x (13 + k) frames for 17 + 3 k: within a GPU's MAX_PADDING
        singles = [engine.step([w], [a])[0] for w, a in zip(single_worlds, [FORWARD, TURN, IDLE])]
        for b, s in zip(batched, singles):
            assert np.abs(b[0].astype(int) - s[0].astype(int)).max() <= 1


@pytest.mark.parametrize(
    "sections",
    [
        {"model": {"previous_frame_input": True}, "sampler": {"context_noise": 0.2}},
        {"model": {"chunk_frames": 2}},
        {"model": {"previous_frame_input": True}, "cache": {"max_slots": 20 * 16, "grow_frames": 20}},
        {
            "model": {"previous_frame_input": True},
            "cache": {"max_slots": 20 * 16, "grow_frames": 20},
            "chunks_a_forward": 2,
        },
        pytest.param(
            {
                "model": {"previous_frame_input": True},
                "cache": {"max_slots": 20 * 16, "grow_frames": 20},
                "runtime": {"device": "cuda"},
            },
            marks=pytest.mark.gpu,
        ),
    ],
    ids=["previous-frame-and-context-noise", "chunks-of-2", "pooled", "pooled-two-forwards", "pooled-on-a-gpu"],
)
def test_observed_chunks_written_in_one_forward_are_what_one_commit_pass_each_writes(
    sections: dict, monkeypatch
) -> None:
    """Under `dense` (every token kept exactly) `observe_latents` writes its chunks in one forward, each seeing the
    cached slots and the chunks before it: the caches, the latest latent, the noise drawn and the frames stepped
    after are those of one commit pass per chunk (float rounding aside), for worlds of different lengths."""
    sections = dict(sections)
    chunks_a_forward = sections.pop("chunks_a_forward", 3)  # of the 3 observed
    engine = WorldEngine.from_config(tiny_config(**sections))
    monkeypatch.setattr(world_engine, "PREFILL_TOKENS", chunks_a_forward * engine.sizes.tokens_per_chunk)
    if engine.model.dit.previous_embed is not None:
        torch.nn.init.normal_(engine.model.dit.previous_embed.weight, std=0.02)
    T, A = engine.chunk_frames, engine.action_space.dim
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3 * T, *engine.sizes.latent_shape, generator=generator).to(engine.device)
    actions = (torch.rand(2, 3 * T, A, generator=generator) < 0.3).float().to(engine.device)

    def observed(one_forward: bool) -> list:
        worlds = [engine.new_world("icy cave", seed=s) for s in (1, 2)]
        engine.step(worlds[:1], [FORWARD])  # one world a chunk ahead: the pooled read is padded
        calls = []
        with mock.patch.object(type(engine.policy), "keeps_every_token", one_forward):
            original = engine.model.dit.write_keys
            with mock.patch.object(
                engine.model.dit, "write_keys", side_effect=lambda *a: calls.append(1) or original(*a)
            ):
                engine.observe_latents(worlds, latents, actions)
        forwards = -(-3 // chunks_a_forward) if one_forward else 3
        assert len(calls) == 1 + forwards, "the first world's pending chunk, then the observed ones"
        return worlds

    passes, forward = observed(False), observed(True)
    for a, b in zip(passes, forward):
        assert a.frame_index == b.frame_index and a.cache.tokens_per_layer() == b.cache.tokens_per_layer()
        assert torch.equal(a.generator.get_state(), b.generator.get_state()), "the same context noise drawn"
        assert (a.last_latent is None) == (b.last_latent is None)
        if a.last_latent is not None:
            assert torch.equal(a.last_latent, b.last_latent)
        for x, y in zip(a.cache.layers, b.cache.layers):
            n = x.length
            for name in ("key", "value"):
                torch.testing.assert_close(getattr(x, name)[:n], getattr(y, name)[:n], rtol=1e-4, atol=1e-4)
            for name in ("pos", "count", "frame"):
                assert torch.equal(getattr(x, name)[:n], getattr(y, name)[:n]), name
    for a, b in zip(engine.step(passes, [FORWARD, TURN]), engine.step(forward, [FORWARD, TURN])):
        assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a, b))
