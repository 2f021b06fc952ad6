"""worldserve train: the teacher-forcing mask, causality of the training forward, the data stream, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine import WorldEngine, load_config
from engine import train as train_module
from engine.actions import Action
from engine.attention import SequenceAttention
from engine.config import ConfigError
from engine.kv_cache import CachePool
from engine.model import WorldModel
from engine.train import (
    Clips,
    EpisodePool,
    TrainConfig,
    TrainingError,
    dit_loss,
    load_train_config,
    predicted_history,
    rollout_engine,
    rollout_history,
    sample_clips,
    teacher_forcing_mask,
    train,
)
from server.cli import main
from tests.conftest import TINY, tiny_config

TINY_TRAIN = {
    "seed": 3,
    "episode_frames": 10,
    "pool_episodes": 3,
    "log_every": 1,
    "autoencoder": {"steps": 4, "batch": 4, "lr": 0.002, "warmup_steps": 1, "refresh_every": 2},
    "dit": {"steps": 4, "batch": 2, "lr": 0.001, "warmup_steps": 1, "frames": 4, "prompt_dropout": 0.5},
}


def tiny_train(**changes) -> TrainConfig:
    return TrainConfig.model_validate({**TINY_TRAIN, **changes})


def test_mask_gives_each_target_exactly_its_history():
    frames = 4
    mask = teacher_forcing_mask(frames, tokens_per_frame=1)  # rows: queries, columns: keys
    context, target = slice(0, frames), slice(frames, 2 * frames)
    assert torch.equal(mask[context, context], torch.tril(torch.ones(frames, frames, dtype=torch.bool)))
    assert not mask[context, target].any()  # the history never sees a frame being generated
    assert torch.equal(mask[target, context], torch.tril(torch.ones(frames, frames, dtype=torch.bool), -1))
    assert torch.equal(mask[target, target], torch.eye(frames, dtype=torch.bool))
    assert teacher_forcing_mask(frames, 3).shape == (2 * frames * 3, 2 * frames * 3)


def test_training_forward_is_causal_in_the_history():
    """Perturbing context frame k changes the targets after k and nothing at or before k."""
    config = tiny_config()
    torch.manual_seed(0)
    model = WorldModel(config).init_random_(1)
    dit, frames = model.dit, 4
    n = dit.grid[0] * dit.grid[1]
    x = torch.randn(1, 2 * frames, *config.sizes().latent_shape)
    times = torch.tensor([[0, 5, 6, 7] * 2])
    levels, actions = torch.rand(1, 2 * frames), torch.rand(1, 2 * frames, config.sizes().action_dim)
    prompt = model.prompt_encoder(["icy cave"])

    def targets(inputs: torch.Tensor) -> torch.Tensor:
        attention = SequenceAttention(dit.rope, dit.positions_at(times), teacher_forcing_mask(frames, n))
        with torch.no_grad():
            return dit(inputs, levels, actions, prompt, attention)[:, frames:]

    before = targets(x)
    k = 1
    perturbed = x.clone()
    perturbed[:, k] += 1.0  # context frame k
    after = targets(perturbed)
    torch.testing.assert_close(after[:, : k + 1], before[:, : k + 1], rtol=0, atol=1e-6)
    assert (after[:, k + 1 :] - before[:, k + 1 :]).abs().amax() > 1e-4


def test_pool_is_a_function_of_seed_and_position():
    config = tiny_config()
    schedule = tiny_train()
    a, b = EpisodePool(config, schedule, None), EpisodePool(config, schedule, None)
    a.fill(3)
    a.advance()  # now episodes 1, 2, 3
    b.fill(4)
    assert [e.index for e in a.episodes] == [e.index for e in b.episodes] == [1, 2, 3]
    for x, y in zip(a.episodes, b.episodes):
        assert torch.equal(x.frames, y.frames) and torch.equal(x.actions, y.actions) and x.prompt == y.prompt
    assert a.episodes[0].frames.shape == (10, 16, 16, 3) and a.episodes[0].frames.dtype == torch.uint8


def test_pool_recorded_by_workers_is_the_pool_recorded_in_process():
    config = tiny_config()
    inline, ahead = EpisodePool(config, tiny_train(), None), EpisodePool(config, tiny_train(record_workers=2), None)
    try:
        for pool in (inline, ahead):
            pool.fill(3)
            pool.advance()
            pool.advance()  # taken from the episodes the workers recorded ahead
        assert [e.index for e in ahead.episodes] == [e.index for e in inline.episodes] == [2, 3, 4]
        for x, y in zip(inline.episodes, ahead.episodes):
            assert torch.equal(x.frames, y.frames) and torch.equal(x.actions, y.actions) and x.prompt == y.prompt
    finally:
        ahead.close()
    ahead.close()  # a second close is harmless


def test_clips_start_with_the_sink_frame_and_are_consecutive():
    config = tiny_config()
    pool = EpisodePool(config, tiny_train(), lambda frames: frames.float().mean(-1)[:, None, :4, :4])
    pool.fill(3)
    clips = sample_clips(pool, batch=16, frames=4, prompt_dropout=0.0, generator=torch.Generator().manual_seed(0))
    assert clips.latents.shape == (16, 5, 1, 4, 4) and clips.actions.shape[:2] == (16, 5)
    assert (clips.times[:, 0] == 0).all() and (clips.times[:, 1] >= 1).all() and (clips.times[:, -1] <= 9).all()
    assert (clips.times[:, 2:] - clips.times[:, 1:-1] == 1).all()
    assert not clips.previous[:, 0].any()  # nothing comes before the start view
    consecutive = clips.times[:, 1] == 1  # clips that start at frame 1: frame 0 comes before it
    assert torch.equal(clips.previous[consecutive, 1], clips.latents[consecutive, 0]) and consecutive.any()
    assert torch.equal(clips.previous[:, 2:], clips.latents[:, 1:-1])
    assert all(prompt for prompt in clips.prompts)
    dropped = sample_clips(pool, 64, 4, prompt_dropout=1.0, generator=torch.Generator())
    assert dropped.prompts == [""] * 64
    with pytest.raises(ValueError, match="too short"):
        sample_clips(pool, 1, frames=10, prompt_dropout=0.0, generator=torch.Generator())


def test_dit_loss_falls_when_fitting_one_batch():
    config = tiny_config()
    torch.manual_seed(0)
    model = WorldModel(config)
    model.dit.zero_init_()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, *config.sizes().latent_shape, generator=generator)
    clips = Clips(
        latents,
        torch.zeros_like(latents),
        torch.zeros(2, 4, config.sizes().action_dim),
        torch.tensor([[0, 3, 4, 5]] * 2),
        ["a", "b"],
    )
    optimizer = torch.optim.AdamW(model.dit.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = dit_loss(model, clips, 0.3, torch.Generator().manual_seed(1))  # the same noise every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def _random_clips(config, batch: int = 2, frames: int = 5, seed: int = 0) -> Clips:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, *config.sizes().latent_shape, generator=generator)
    outside = torch.randn(latents[:, :1].shape, generator=generator)  # the frame before the clip's first
    previous = torch.cat((torch.zeros_like(outside), outside, latents[:, 1:-1]), 1)
    times = torch.tensor([[0, *range(3, 3 + frames - 1)]] * batch)
    return Clips(latents, previous, torch.zeros(batch, frames, config.sizes().action_dim), times, ["a", "b"][:batch])


def test_predicted_history_is_the_models_teacher_forced_prediction():
    config = tiny_config(model={"previous_frame_input": True})
    model = WorldModel(config).init_random_(0)
    torch.nn.init.normal_(model.dit.previous_embed.weight, std=0.02)  # the input starts at zero: make it count
    clips = _random_clips(config)

    def history(share: float, of: Clips = clips) -> tuple[torch.Tensor, torch.Tensor]:
        return predicted_history(model, of, 0.3, share, 0.5, torch.Generator().manual_seed(7))

    kept, before = history(0.0)
    assert torch.equal(kept, clips.latents) and torch.equal(before, clips.previous)
    own, before = history(1.0)
    assert ((own - clips.latents).flatten(2).abs().amax(-1) > 0).all(), "every frame is the model's"
    assert torch.equal(before[:, :2], clips.previous[:, :2]), "the frames before the clip's first two stay true"
    assert torch.equal(before[:, 2:], own[:, 1:-1]), "a frame's previous-frame input is the frame before, predicted"
    # teacher forced: a frame's prediction sees the history before it and its own noised target, nothing later
    changed = _random_clips(config)
    changed.latents[:, 3] += 1.0
    changed.previous[:, 4] += 1.0
    own_changed, _ = history(1.0, changed)
    assert torch.allclose(own_changed[:, :3], own[:, :3], atol=1e-6)
    assert not torch.allclose(own_changed[:, 3:], own[:, 3:], atol=1e-3)
    # the loss trains on such histories: finite, with gradients, and not the loss on the true history
    generator = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = dit_loss(model, clips, 0.3, generator())
    mixed = dit_loss(model, clips, 0.3, generator(), predicted_context=1.0)
    mixed.backward()
    assert torch.isfinite(mixed) and float(mixed.detach()) != float(plain.detach())
    assert model.dit.previous_embed.weight.grad.abs().amax() > 0


def test_predicted_history_passes_compound_the_models_own_predictions(monkeypatch: pytest.MonkeyPatch):
    config = tiny_config(model={"previous_frame_input": True})
    model = WorldModel(config).init_random_(0)
    torch.nn.init.normal_(model.dit.previous_embed.weight, std=0.02)
    clips = _random_clips(config)
    calls, velocity_of = [], train_module._teacher_forced_velocity

    def recorded(*args):
        velocity = velocity_of(*args)
        calls.append((args, velocity))
        return velocity

    monkeypatch.setattr(train_module, "_teacher_forced_velocity", recorded)
    # context noise 0: a pass is given exactly the history it is handed
    history, before = predicted_history(model, clips, 0.0, 1.0, 0.5, torch.Generator().manual_seed(7), 3)
    assert len(calls) == 3
    predictions = []
    for (_, _, context, target, _, target_level, previous), velocity in calls:
        predictions.append(target - target_level[:, :, None, None, None] * velocity)
        if len(predictions) == 1:
            assert torch.equal(context, clips.latents) and torch.equal(previous, clips.previous)
        else:
            assert torch.equal(context, predictions[-2]), "a later pass is given the history the pass before made"
            assert torch.equal(previous[:, 2:], predictions[-2][:, 1:-1])
    assert torch.equal(history, predictions[-1])  # share 1: every frame is the last pass's
    assert torch.equal(before[:, 2:], history[:, 1:-1]) and torch.equal(before[:, :2], clips.previous[:, :2])
    monkeypatch.undo()
    # still causal: a change to frame 3 reaches frames 3.. through every pass, never the frames before it
    changed = _random_clips(config)
    changed.latents[:, 3] += 1.0
    changed.previous[:, 4] += 1.0

    def three_passes(of: Clips) -> torch.Tensor:
        return predicted_history(model, of, 0.3, 1.0, 0.5, torch.Generator().manual_seed(7), 3)[0]

    plain, moved = three_passes(clips), three_passes(changed)
    assert torch.allclose(moved[:, :3], plain[:, :3], atol=1e-6)
    assert not torch.allclose(moved[:, 3:], plain[:, 3:], atol=1e-3)
    loss = dit_loss(model, clips, 0.3, torch.Generator().manual_seed(1), predicted_context=1.0, predicted_passes=2)
    assert torch.isfinite(loss)


def test_rollout_history_is_the_models_own_rollout_from_the_true_frames_before_it(monkeypatch):
    config = tiny_config(model={"previous_frame_input": True})
    model = WorldModel(config).init_random_(0)
    torch.nn.init.normal_(model.dit.previous_embed.weight, std=0.02)  # the input starts at zero: make it count
    clips = _random_clips(config, frames=6)
    clips.actions[:, :, 0] = 1.0  # a key held: the action guidance has something to push against
    engine = rollout_engine(model, config, 6)
    assert engine.policy.name == "dense" and engine.sampler.action_guidance == config.sampler.action_guidance
    assert engine.pool is not None, "a rollout's worlds are rows of one pool, bounded at a clip's frames"

    def rollout(of: Clips) -> tuple[torch.Tensor, torch.Tensor]:
        return rollout_history(engine, of, 2, torch.Generator().manual_seed(5))

    monkeypatch.setattr(CachePool, "FIRST_ROWS", 1)
    history, before = rollout(clips)
    assert [layers[0].rows for layers in engine.pool.segments] == [2], "the clips' caches, reserved in one segment"
    replay = torch.Generator().manual_seed(5)  # the draws rollout_history makes: the first generated frame, seeds
    start = 1 + int(torch.randint(6 - 2, (1,), generator=replay))
    seeds = torch.randint(2**31 - 1, (2,), generator=replay).tolist()
    window = slice(start, start + 2)
    kept = torch.ones(6, dtype=torch.bool)
    kept[window] = False
    assert torch.equal(history[:, kept], clips.latents[:, kept]), "frames outside the rollout stay true"
    assert ((history[:, window] - clips.latents[:, window]).flatten(2).abs().amax(-1) > 0).all()
    assert torch.equal(before[:, :2], clips.previous[:, :2]) and torch.equal(before[:, 2:], history[:, 1:-1])
    # each clip's frames are what a world of its own generates from the same start, one frame after another
    for b in range(2):
        world = engine.new_world(clips.prompts[b], seeds[b])
        engine.observe_latents([world], clips.latents[b : b + 1, :1], clips.actions[b : b + 1, :1])
        if start > 1:
            engine.observe_latents(
                [world],
                clips.latents[b : b + 1, 1:start],
                clips.actions[b : b + 1, 1:start],
                [int(clips.times[b, 1])],
                clips.previous[b : b + 1, 1],
            )
        for i in range(start, start + 2):
            own = engine.step_latents([world], clips.actions[b : b + 1, i : i + 1])
            assert torch.allclose(own[0, 0], history[b, i], atol=1e-5)
    # a rollout: blind to the true frames it replaces and to those after it, led by the true frames before it
    changed = _random_clips(config, frames=6)
    changed.actions[:, :, 0] = 1.0
    changed.latents[:, start:] += 1.0
    changed.previous[:, start + 1 :] += 1.0
    assert torch.allclose(rollout(changed)[0][:, window], history[:, window], atol=1e-6)
    changed.latents[:, start - 1] += 1.0
    assert not torch.allclose(rollout(changed)[0][:, window], history[:, window], atol=1e-3)
    # the loss trains on it: finite, with gradients, and not the loss on the true history
    plain = dit_loss(model, clips, 0.3, torch.Generator().manual_seed(1))
    own = dit_loss(model, clips, 0.3, torch.Generator().manual_seed(1), history=(history, before))
    own.backward()
    assert torch.isfinite(own) and float(own.detach()) != float(plain.detach())
    assert model.dit.previous_embed.weight.grad.abs().amax() > 0


def test_rollout_frames_must_fit_the_clip_and_exclude_predicted_history():
    with pytest.raises(ValueError, match="at most frames"):
        tiny_train(dit={**TINY_TRAIN["dit"], "rollout_frames": 5})
    with pytest.raises(ValueError, match="set one of them"):
        tiny_train(dit={**TINY_TRAIN["dit"], "rollout_frames": 2, "predicted_context": 0.5})


def test_a_rollout_share_rolls_out_in_some_steps_and_trains_on_true_histories_in_the_others(
    tmp_path: Path, monkeypatch
):
    rolled = []
    monkeypatch.setattr(train_module, "rollout_history", lambda *args: rolled.append(1) or rollout_history(*args))

    def rollouts_in(share: float) -> int:
        rolled.clear()
        config = tiny_train(
            autoencoder={**TINY_TRAIN["autoencoder"], "steps": 1},
            dit={**TINY_TRAIN["dit"], "steps": 12, "rollout_frames": 2, "rollout_share": share},
        )
        train(tmp_path / str(share), tiny_config(), config, device="cpu", progress=False)
        return len(rolled)

    assert rollouts_in(1.0) == 12
    assert 0 < rollouts_in(0.5) < 12
    with pytest.raises(ValueError):
        tiny_train(dit={**TINY_TRAIN["dit"], "rollout_frames": 2, "rollout_share": 0})


def test_run_with_rollout_histories_resumes_to_the_run_that_was_not_interrupted(tmp_path: Path):
    rollouts = tiny_train(
        autoencoder={**TINY_TRAIN["autoencoder"], "steps": 2}, dit={**TINY_TRAIN["dit"], "rollout_frames": 2}
    )
    straight = train(tmp_path / "straight", tiny_config(), rollouts, device="cpu", progress=False)
    assert straight.phase == "done"
    partial = train(tmp_path / "resumed", tiny_config(), rollouts, device="cpu", progress=False, max_steps=4)
    assert partial.phase == "dit" and partial.step == 2  # the rollouts' draws are a function of (seed, step)
    resumed = train(tmp_path / "resumed", tiny_config(), rollouts, device="cpu", progress=False)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert resumed.phase == "done" and a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_run_trains_both_phases_and_exports_a_loadable_model(tmp_path: Path):
    run = train(tmp_path / "run", tiny_config(), tiny_train(), device="cpu", progress=False)
    assert run.phase == "done"
    config = load_config(tmp_path / "run" / "config.yaml")
    assert config.model.autoencoder.latent_scale != 1.0  # measured at the end of the autoencoder phase
    engine = WorldEngine.from_config(
        load_config(
            tmp_path / "run" / "config.yaml", {"runtime.checkpoint": str(tmp_path / "run" / "model.safetensors")}
        )
    )
    [frames] = engine.step([engine.new_world("icy cave", 0)], [Action(frozenset({"KeyW"}))])
    assert frames[0].shape == (16, 16, 3) and frames[0].dtype == np.uint8
    log = [line for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 + 1 + 4  # a line per step (log_every 1), and the end of the autoencoder phase


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path: Path):
    straight = train(tmp_path / "straight", tiny_config(), tiny_train(), device="cpu", progress=False)
    assert straight.phase == "done"
    for _ in range(2):  # 3 steps, stop; 3 more (across the phase boundary), stop
        partial = train(tmp_path / "resumed", tiny_config(), tiny_train(), device="cpu", progress=False, max_steps=3)
        assert partial.phase != "done"
    resumed = train(tmp_path / "resumed", tiny_config(), tiny_train(), device="cpu", progress=False)
    assert resumed.phase == "done" and resumed.step == straight.step
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_a_fine_tune_may_add_the_previous_frame_input_and_trains_it(tmp_path: Path):
    train(tmp_path / "base", tiny_config(), tiny_train(), device="cpu", progress=False)
    start = tmp_path / "base" / "model.safetensors"
    finetune = tiny_train(seed=4, autoencoder={**TINY_TRAIN["autoencoder"], "steps": 0})
    config = tiny_config(model={"previous_frame_input": True})
    run = train(tmp_path / "fine", config, finetune, device="cpu", progress=False, init_from=start)
    assert run.phase == "done"
    weights = load_file(tmp_path / "fine" / "model.safetensors")
    assert weights["dit.previous_embed.weight"].abs().amax() > 0  # it started at zero and learned
    assert load_config(tmp_path / "fine" / "config.yaml").model.previous_frame_input


def test_resume_refuses_a_different_config(tmp_path: Path):
    train(tmp_path / "run", tiny_config(), tiny_train(), device="cpu", progress=False, max_steps=1)
    with pytest.raises(ConfigError, match="different model or training config"):
        train(tmp_path / "run", tiny_config(), tiny_train(seed=4), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="different model or training config"):
        train(tmp_path / "run", tiny_config(model={"depth": 1}), tiny_train(), device="cpu", progress=False)


def test_a_run_started_from_a_checkpoint_fine_tunes_its_dit_and_keeps_its_autoencoder(tmp_path: Path):
    base = train(tmp_path / "base", tiny_config(), tiny_train(), device="cpu", progress=False)
    start = tmp_path / "base" / "model.safetensors"
    finetune = tiny_train(seed=4, autoencoder={**TINY_TRAIN["autoencoder"], "steps": 0})
    run = train(tmp_path / "fine", tiny_config(), finetune, device="cpu", progress=False, init_from=start)
    assert run.phase == "done" and run.step == TINY_TRAIN["dit"]["steps"]  # no autoencoder steps were taken
    scale = base.config.model.autoencoder.latent_scale
    assert load_config(tmp_path / "fine" / "config.yaml").model.autoencoder.latent_scale == scale
    before, after = load_file(start), load_file(tmp_path / "fine" / "model.safetensors")
    for name in before:
        if name.startswith("autoencoder."):
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(after[name], before[name]) for name in before if name.startswith("dit."))
    assert '"init_from"' in (tmp_path / "fine" / "log.jsonl").read_text()


def test_fine_tuning_needs_a_matching_checkpoint(tmp_path: Path):
    no_autoencoder = tiny_train(autoencoder={**TINY_TRAIN["autoencoder"], "steps": 0})
    with pytest.raises(ConfigError, match="init-from"):
        train(tmp_path / "a", tiny_config(), no_autoencoder, device="cpu", progress=False)
    train(tmp_path / "base", tiny_config(), tiny_train(), device="cpu", progress=False, max_steps=1)
    with pytest.raises(ConfigError, match="different model"):
        train(
            tmp_path / "b",
            tiny_config(model={"depth": 1}),
            no_autoencoder,
            device="cpu",
            progress=False,
            init_from=tmp_path / "base" / "model.safetensors",
        )
    with pytest.raises(ConfigError, match="not found"):
        train(tmp_path / "c", tiny_config(), no_autoencoder, device="cpu", progress=False, init_from=tmp_path / "x")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("train*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_training_config_loads(path: Path):
    """The recipes docs/training.md quotes stay valid as TrainConfig changes."""
    config = load_train_config(path)
    assert config.autoencoder.steps + config.decoder.steps + config.dit.steps > 0


def test_bad_training_config_and_damaged_state_give_one_line_errors(tmp_path: Path, capsys):
    bad = tmp_path / "train.yaml"
    bad.write_text(yaml.safe_dump({**TINY_TRAIN, "dit": {**TINY_TRAIN["dit"], "lr": -1}, "extra": 1}))
    with pytest.raises(ConfigError, match=r"dit\.lr") as error:
        load_train_config(bad)
    assert "extra" in str(error.value)
    assert main(["train", "--out", str(tmp_path / "run"), "--train-config", str(bad)]) == 2
    assert "worldserve train: error:" in capsys.readouterr().err

    train(tmp_path / "run2", tiny_config(), tiny_train(), device="cpu", progress=False, max_steps=1)
    (tmp_path / "run2" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read the training state"):
        train(tmp_path / "run2", tiny_config(), tiny_train(), device="cpu", progress=False)


DECODER = {"steps": 3, "batch": 4, "lr": 0.001, "warmup_steps": 1, "adversarial_weight": 0.5}


def test_decoder_fine_tune_trains_the_decoder_only(tmp_path: Path):
    train(tmp_path / "base", tiny_config(), tiny_train(), device="cpu", progress=False)
    assert "discriminator" not in torch.load(tmp_path / "base" / "state.pt", weights_only=True)  # no decoder phase
    start = tmp_path / "base" / "model.safetensors"
    sharpen = tiny_train(
        seed=4,
        autoencoder={**TINY_TRAIN["autoencoder"], "steps": 0},
        decoder=DECODER,
        dit={**TINY_TRAIN["dit"], "steps": 0},
    )
    run = train(tmp_path / "sharp", tiny_config(), sharpen, device="cpu", progress=False, init_from=start)
    assert run.phase == "done" and run.step == DECODER["steps"]
    before, after = load_file(start), load_file(tmp_path / "sharp" / "model.safetensors")
    assert before.keys() == after.keys()  # the discriminator is not part of the model
    for name in before:
        if name.startswith("autoencoder.decoder."):
            continue
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)  # latents and DiT unchanged
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("autoencoder.decoder."))
    lines = [yaml.safe_load(line) for line in (tmp_path / "sharp" / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["phase"] == "decoder" and "loss" in line]
    assert len(steps) == DECODER["steps"]
    for line in steps:  # the loss is the MSE plus the weighted adversarial term, both logged, as is the critic's
        assert line["loss"] == pytest.approx(line["mse"] + DECODER["adversarial_weight"] * line["adversarial"])
        assert "critic" in line


def test_a_run_through_all_three_phases_resumes_to_the_same_weights(tmp_path: Path):
    three = tiny_train(decoder=DECODER)
    straight = train(tmp_path / "straight", tiny_config(), three, device="cpu", progress=False)
    assert straight.phase == "done"
    phases = []
    for _ in range(3):  # 3 steps at a time: stops inside each phase, the later two after crossing a boundary
        partial = train(tmp_path / "resumed", tiny_config(), three, device="cpu", progress=False, max_steps=3)
        phases.append(partial.phase)
    assert phases == ["autoencoder", "decoder", "dit"]
    resumed = train(tmp_path / "resumed", tiny_config(), three, device="cpu", progress=False)
    assert resumed.phase == "done" and resumed.step == straight.step
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    for name, value in reference["discriminator"].items():
        torch.testing.assert_close(state["discriminator"][name], value, rtol=0, atol=0, msg=name)


def _stopped_by_the_process_group(command: list[str], log: Path, stop: signal.Signals) -> tuple[str, str]:
    """Run `command` in a process group of its own (a terminal's job), wait until `log` has 3 more lines, then
    send `stop` to the whole group; returns its stdout and stderr once it has exited, with status 0."""
    before = len(log.read_text().splitlines()) if log.exists() else 0
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= before + 3):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        os.killpg(process.pid, stop)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr
    return stdout, stderr


def _long_training_command(tmp_path: Path, workers: int = 1) -> tuple[list[str], Path]:
    """`worldserve train` of the tiny model with a recording worker and an autoencoder phase that outlasts any
    test (a new episode every step), into tmp_path/run; and the run's log."""
    config, schedule, out = tmp_path / "config.yaml", tmp_path / "train.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(TINY))
    long = {**TINY_TRAIN["autoencoder"], "steps": 100_000, "refresh_every": 1}
    schedule.write_text(yaml.safe_dump({**TINY_TRAIN, "record_workers": workers, "autoencoder": long}))
    command = [sys.executable, "-m", "server.cli", "train", "--config", str(config), "--train-config", str(schedule)]
    return [*command, "--out", str(out), "--device", "cpu"], out / "log.jsonl"


def test_a_stop_sent_to_the_whole_process_group_saves_the_run(tmp_path: Path):
    """Ctrl-C in a terminal, `timeout` and a container's stop signal every process of the group, the recording
    workers included: the run still finishes its step, saves and exits cleanly, and resumes from there."""
    command, log = _long_training_command(tmp_path)
    out, steps = log.parent, []
    for stop in (signal.SIGTERM, signal.SIGINT):  # the second run resumes the first
        stdout, stderr = _stopped_by_the_process_group(command, log, stop)
        assert "stopped after" in stdout and f"{stop.name}: stopping after this step" in stderr
        saved = torch.load(out / "state.pt", weights_only=True)
        assert saved["phase"] == "autoencoder" and saved["step"] == json.loads(log.read_text().splitlines()[-1])["step"]
        steps.append(saved["step"])
    assert 3 <= steps[0] and steps[0] + 3 <= steps[1]


def test_a_worker_killed_from_outside_ends_the_run_saved_and_resumable(tmp_path: Path, monkeypatch):
    # steps enough after the kill for the pool to notice it (its manager thread sees a worker's end soon after)
    autoencoder = {**TINY_TRAIN["autoencoder"], "steps": 12, "refresh_every": 1}
    schedule = tiny_train(record_workers=1, autoencoder=autoencoder)
    advance, calls = EpisodePool.advance, []

    def killing(pool: EpisodePool) -> None:  # before the third step's advance, the system kills the worker
        calls.append(1)
        if len(calls) == 3 + schedule.pool_episodes:  # after the pool's first fill
            for process in list(pool._executor._processes.values()):
                os.kill(process.pid, signal.SIGKILL)
                process.join()
        advance(pool)

    monkeypatch.setattr(EpisodePool, "advance", killing)
    with pytest.raises(TrainingError, match=r"saved at phase autoencoder, step \d+: run the same command") as error:
        train(tmp_path / "run", tiny_config(), schedule, device="cpu", progress=False)
    # the pool notices at the first advance after the death that needs a worker: this step, or one soon after
    step = int(re.search(r"step (\d+):", str(error.value)).group(1))
    assert step >= 3 and torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == step
    monkeypatch.setattr(EpisodePool, "advance", advance)
    resumed = train(tmp_path / "run", tiny_config(), schedule, device="cpu", progress=False)
    straight = train(tmp_path / "straight", tiny_config(), schedule, device="cpu", progress=False)
    assert resumed.phase == straight.phase == "done"
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_recording_workers_end_with_a_training_process_killed_outright(tmp_path: Path):
    command, log = _long_training_command(tmp_path, workers=2)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().count("\n") >= 2):  # the workers are recording
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        process.kill()  # the training process alone, as the out-of-memory killer would
        process.wait()
        deadline = time.monotonic() + 30
        while True:  # until no process of its group is left
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "recording workers outlived the training process"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
