"""The DiT with a KV cache equals the DiT without one, and never looks ahead."""

from __future__ import annotations

import pytest
import torch

from engine import WorldModel
from engine.attention import CachedAttention, StepSlots
from engine.kv_cache import WorldCache
from engine.policies import make_policy
from engine.prompt import PromptTokens
from tests.conftest import tiny_config

TOLERANCE = 1e-5  # fp32, max absolute difference; outputs are O(1)


def _model(chunk_frames: int = 1) -> WorldModel:
    config = tiny_config(model={"chunk_frames": chunk_frames})
    return WorldModel(config).init_random_(seed=0).eval()


def _inputs(model: WorldModel, frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, h, w = model.config.sizes().latent_shape
    x = torch.randn(1, frames, c, h, w, generator=g)
    actions = torch.rand(1, frames, model.action_space.dim, generator=g)
    prompt = model.prompt_encoder(["green hedge maze"])
    return x, actions, prompt


def _empty_cache(model: WorldModel):
    """The model's cache policy and an empty cache for one world."""
    config, m = model.config, model.config.model
    policy = make_policy(config.cache, config.sizes())
    return policy, WorldCache.alone(m.depth, m.heads, m.head_dim, policy.capacity, torch.float32, torch.device("cpu"))


def _cached_pass(model, cache, policy, x, t, actions, prompt, first_frame, write):
    dit = model.dit
    pos = dit.positions(torch.tensor([first_frame]), x.shape[1])
    attention = CachedAttention(dit.rope, policy, [cache], pos, [first_frame], write, StepSlots())
    return dit(x, t, actions, prompt, attention)


@pytest.mark.parametrize("chunk_frames", [1, 2])
@torch.no_grad()
def test_cached_rollout_equals_uncached_forward(chunk_frames: int) -> None:
    model = _model(chunk_frames)
    frames = 6
    x, actions, prompt = _inputs(model, frames)
    t = torch.zeros(1, frames)
    uncached = model.dit(x, t, actions, prompt)  # one frame-causal forward over all frames

    config, m = model.config, model.config.model
    policy, cache = _empty_cache(model)
    outs = []
    for start in range(0, frames, chunk_frames):
        rows = slice(start, start + chunk_frames)
        outs.append(_cached_pass(model, cache, policy, x[:, rows], t[:, rows], actions[:, rows], prompt, start, True))
    cached = torch.cat(outs, dim=1)
    assert cache.tokens_per_layer() == [frames * config.sizes().tokens_per_frame] * m.depth
    torch.testing.assert_close(cached, uncached, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_denoising_pass_reads_the_cache_without_writing() -> None:
    """A denoising pass at noise t over cached history = the uncached forward of [history, noisy frame]."""
    model = _model()
    frames = 4
    x, actions, prompt = _inputs(model, frames)
    policy, cache = _empty_cache(model)
    for f in range(frames - 1):
        _cached_pass(model, cache, policy, x[:, f : f + 1], torch.zeros(1, 1), actions[:, f : f + 1], prompt, f, True)
    before = cache.tokens_per_layer()

    t = torch.tensor([[0.0, 0.0, 0.0, 0.7]])
    last = slice(frames - 1, frames)
    cached = _cached_pass(model, cache, policy, x[:, last], t[:, last], actions[:, last], prompt, frames - 1, False)
    uncached = model.dit(x, t, actions, prompt)[:, last]
    assert cache.tokens_per_layer() == before
    torch.testing.assert_close(cached, uncached, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_changing_a_later_frame_never_changes_earlier_outputs() -> None:
    model = _model()
    frames = 5
    x, actions, prompt = _inputs(model, frames)
    t = torch.full((1, frames), 0.5)
    base = model.dit(x, t, actions, prompt)
    for later in range(1, frames):
        x2, a2, t2 = x.clone(), actions.clone(), t.clone()
        x2[:, later] += 3.0
        a2[:, later] = 1.0 - a2[:, later]
        t2[:, later] = 0.1
        changed = model.dit(x2, t2, a2, prompt)
        assert torch.equal(changed[:, :later], base[:, :later]), f"frame {later} leaked into earlier frames"
        assert not torch.allclose(changed[:, later], base[:, later]), "the changed frame must change its output"


@torch.no_grad()
def test_each_frames_action_steers_its_frame() -> None:
    model = _model()
    x, actions, prompt = _inputs(model, 2)
    t = torch.full((1, 2), 0.5)
    other = actions.clone()
    other[:, 1] = 0.0
    assert not torch.allclose(model.dit(x, t, actions, prompt)[:, 1], model.dit(x, t, other, prompt)[:, 1])


@pytest.mark.parametrize("policy", ["dense", "tempcache"])
@torch.no_grad()
def test_passes_batched_in_one_forward_equal_one_forward_each(policy: str) -> None:
    """Guidance runs its passes as rows of one forward over the same cache: each row is the pass run alone."""
    model = WorldModel(tiny_config(cache={"policy": policy})).init_random_(seed=0).eval()
    frames = 5
    x, actions, prompt = _inputs(model, frames)
    policy_, cache = _empty_cache(model)
    for f in range(frames - 1):
        _cached_pass(model, cache, policy_, x[:, f : f + 1], torch.zeros(1, 1), actions[:, f : f + 1], prompt, f, True)
    dit, last = model.dit, frames - 1
    pos = dit.positions(torch.tensor([last]), 1)
    noisy, t = x[:, last:], torch.full((1, 1), 0.6)
    idle = torch.zeros_like(actions[:, last:])
    shared = StepSlots()
    alone = [
        dit(noisy, t, acting, prompt, CachedAttention(dit.rope, policy_, [cache], pos, [last], False, shared))
        for acting in (actions[:, last:], idle)
    ]
    two = CachedAttention(dit.rope, policy_, [cache], pos, [last], False, shared, passes=2)
    rows = dit(
        noisy.repeat(2, 1, 1, 1, 1),
        t.repeat(2, 1),
        torch.cat((actions[:, last:], idle)),
        PromptTokens.stack([prompt] * 2),
        two,
    )
    torch.testing.assert_close(rows, torch.cat(alone), atol=TOLERANCE, rtol=0)
    assert not torch.allclose(alone[0], alone[1]), "the two passes must differ for the check to mean anything"
    with pytest.raises(ValueError, match="commit"):
        CachedAttention(dit.rope, policy_, [cache], pos, [last], True, StepSlots(), passes=2)
