"""Training the world model on the reference game (`worldserve train`): the frame autoencoder, then the causal DiT.

Data is recorded on the fly (engine/dataset.py `train_spec` / `record`, the game is nearly free to run): a pool
of `pool_episodes` recent episodes is sampled from, and every step replaces its oldest episode with the next one
of the training stream, so the model keeps seeing new mazes (a fixed set of maps over-fitted within minutes in an
early experiment). Held-out maze seeds are never drawn (asserted in `train_spec`).

Phase 1, autoencoder: frames -> latents -> frames, MSE in [0, 1], with relative Gaussian noise on the latents so
the decoder tolerates the DiT's imperfect latents. At its end `latent_scale` is set to 1 / std of the latents,
so the DiT sees roughly unit variance, and written into the run's config.

Phase 1b, decoder (only when `decoder.steps` > 0; encoder frozen, so the latents, and a DiT trained on them, stay
valid): the MSE plus `decoder.adversarial_weight` times the hinge loss of a patch discriminator
(engine/discriminator.py) trained beside it, one step each per batch, so the decoder draws texture where the MSE
alone draws its blurred mean.

Phase 2, DiT (autoencoder and its latents frozen): rectified flow with noised-context teacher forcing. A sample is
F = 1 + T frames of one episode: frame 0 (the start view, a sink frame as the cache policies keep it) and T
consecutive frames from a random offset s >= 1 (s = 1: one contiguous clip from the start). The sequence holds two
streams of these F frames, 2F frames in all:

    context stream   frame i at a small noise level c_i ~ U(0, context_noise_max): the history as the engine
                     commits it (at sampler.context_noise), noise augmentation against drift as in GameNGen
    target stream    frame i at t_i ~ U(0, 1), the frame being generated

    context i sees context j <= i;  target i sees context j < i and itself (mask below)

so every frame is a target whose history is exactly what inference gives it (frame 0 is generated from the prompt
alone, as a new world's first frame is). The loss is the flow-matching MSE on the target stream. With
`dit.predicted_context` > 0, that share of the history frames (and the previous-frame inputs made from them) is
first replaced by the model's own one-step prediction of them (`predicted_history`, passes without gradients:
the first from the true history, each of `dit.predicted_passes` - 1 more from the history the pass before
predicted), while the targets stay true: in a rollout the whole history is the model's own, and this teaches it to
correct its errors rather than continue them. With `dit.rollout_frames` K > 0 the history holds a true rollout
instead (`rollout_history`): K consecutive history frames generated one after another by the engine's own sampler
(its steps and action guidance, a dense cache) from the clip's true frames before them, in a `dit.rollout_share`
of the steps (the others train on true histories). Positions are the
frames' true indices (0, s, s + 1, ...), so attention also learns to reach a sink frame far back. Prompts are
dropped (replaced by "") for a `prompt_dropout` share of samples, so the model also runs without one. The DiT
and the prompt encoder train with AdamW; an exponential moving average of their weights is what is exported.

A run folder holds `config.yaml` (the world config, with the trained latent_scale), `train.yaml`, `state.pt`
(everything to resume: phase, step, weights, optimiser, EMA, RNG and, in runs with a decoder phase, the
discriminator), `model.safetensors` (the latest exportable checkpoint: EMA weights) and `log.jsonl`. Running the
same command again resumes; the stream of data and noise is a function of (seed, step), so a resumed run is the run
that was not interrupted.

A run may also start from a trained checkpoint (`--init-from`), e.g. to train the shipped model's DiT longer on
a new stream of episodes (`configs/train_finetune.yaml`: `autoencoder.steps: 0` skips phase 1, another `seed`), or
to sharpen its decoder (`configs/train_decoder_adversarial.yaml`: only phase 1b).
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from engine.attention import SequenceAttention
from engine.checkpoint import CheckpointError, load_checkpoint, read_model_config, save_checkpoint
from engine.config import (
    ConfigError,
    WorldConfig,
    describe_validation_error,
    load_config,
    read_yaml_mapping,
    with_overrides,
)
from engine.dataset import (
    EpisodeSpec,
    action_array,
    record,
    start_recording_worker,
    train_spec,
    workers_start_deaf_to_stops,
)
from engine.discriminator import PatchDiscriminator, discriminator_loss, generator_loss
from engine.model import WorldModel
from engine.world_engine import WorldEngine, resolve_device

STATE_FORMAT = "worldserve-train-state/1"
PHASES = ("autoencoder", "decoder", "dit", "done")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhaseConfig(_Section):
    steps: int = Field(ge=0, description="optimiser steps of this phase (count)")
    batch: int = Field(ge=1, description="samples per step: frames (autoencoder) or sequences (DiT) (count)")
    lr: float = Field(gt=0, description="peak learning rate of AdamW (unitless)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up, then cosine decay to lr / 10 (steps)")
    refresh_every: int = Field(1, ge=1, description="a new episode replaces the pool's oldest every this many steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (unitless)")


class AutoencoderTraining(PhaseConfig):
    latent_noise: float = Field(
        0.1, ge=0, description="std of the noise added to latents before decoding, relative to their std (unitless)"
    )


class DecoderTraining(AutoencoderTraining):
    adversarial_weight: float = Field(
        0.01,
        ge=0,
        description="weight of the patch discriminator's hinge loss beside the MSE in [0, 1]: more draws sharper "
        "texture and costs PSNR (unitless)",
    )
    discriminator_lr: float = Field(2e-4, gt=0, description="learning rate of the discriminator's AdamW (unitless)")


class DiTTraining(PhaseConfig):
    frames: int = Field(32, ge=1, description="consecutive frames T per sample, plus the sink frame 0 (frames)")
    context_noise_max: float = Field(
        0.3, ge=0, lt=1, description="context frames are noised to a level drawn from U(0, this) (unitless)"
    )
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="share of samples trained with an empty prompt")
    predicted_context: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of the history frames replaced by the model's own prediction of them (a pass without "
        "gradients, from the true history, at a target level drawn from U(predicted_level_min, 1)); the targets stay "
        "true, so the model learns to correct its own errors instead of continuing them (unitless)",
    )
    predicted_level_min: float = Field(
        0.5, ge=0, le=1, description="lowest noise level the predicted history frames are denoised from (unitless)"
    )
    predicted_passes: int = Field(
        1,
        ge=1,
        description="passes that make the predicted history: each predicts every frame from the history the pass "
        "before made (the first from the true one), so errors compound as over that many rollout steps (count)",
    )
    rollout_frames: int = Field(
        0,
        ge=0,
        description="history frames of each clip generated by the model itself, one after another as the engine "
        "generates them (the world config's sampler and action guidance, a dense cache), from the clip's true "
        "frames before them and under its true actions; the targets stay true (0: none) (frames)",
    )
    rollout_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="with rollout_frames, the share of steps whose histories hold rollouts, drawn step by step; the "
        "other steps train on true histories (unitless)",
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the exported weight average (unitless)")

    @model_validator(mode="after")
    def _one_history_source(self) -> DiTTraining:
        if self.rollout_frames > self.frames:
            raise ValueError(f"rollout_frames ({self.rollout_frames}) must be at most frames ({self.frames})")
        if self.rollout_frames and self.predicted_context:
            raise ValueError("rollout_frames and predicted_context each replace the history: set one of them")
        return self


class TrainConfig(_Section):
    seed: int = Field(0, description="seed of the episode stream, the initial weights and the noise")
    episode_frames: int = Field(160, ge=2, description="length of each recorded episode (frames)")
    pool_episodes: int = Field(128, ge=1, description="recent episodes sampled from (count)")
    checkpoint_minutes: float = Field(5.0, gt=0, description="state.pt and model.safetensors are written this often")
    log_every: int = Field(25, ge=1, description="a log.jsonl line every this many steps")
    record_workers: int = Field(
        0,
        ge=0,
        description="processes that record episodes ahead of the training loop; 0 records them in the training "
        "process (right for a CPU run, whose cores train; a GPU run has cores to spare) (count)",
    )
    autoencoder: AutoencoderTraining
    decoder: DecoderTraining = Field(
        DecoderTraining(steps=0, batch=32, lr=1e-4),
        description="the adversarial fine-tune of the decoder, encoder frozen (0 steps, the default: none)",
    )
    dit: DiTTraining


def load_train_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    data = read_yaml_mapping(path, "training config")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, str(path))) from None


# ---- data ------------------------------------------------------------------------------------------------------------


@dataclass
class PooledEpisode:
    """One recorded episode as training reads it: frames uint8 (L, H, W, 3) (autoencoder phase) or latents
    (L, C, h, w) (DiT phase, frames dropped), actions float32 (L, A) and the prompt."""

    index: int
    prompt: str
    actions: torch.Tensor
    frames: torch.Tensor | None = None
    latents: torch.Tensor | None = None


class TrainingError(RuntimeError):
    """A run that cannot go on, having saved what it could; the message says how to resume."""


class EpisodePool:
    """The `size` most recent episodes of training stream `seed`; `advance` records the next one in place of the
    oldest. Its contents are a function of (seed, next index), so a resumed run rebuilds the same pool, and so
    episodes can be recorded ahead, in `record_workers` processes: the pool then holds exactly what it holds when
    it records them itself, only sooner. `close` ends the workers."""

    def __init__(self, config: WorldConfig, train: TrainConfig, encode: Callable[[torch.Tensor], torch.Tensor] | None):
        self.config, self.train, self.encode = config, train, encode
        self.episodes: list[PooledEpisode] = []
        self.next_index = 0
        self._executor: ProcessPoolExecutor | None = None
        self._ahead: dict[int, Future] = {}  # episode index -> its recording in a worker
        if train.record_workers > 0:
            # spawn, not fork: the training process may hold CUDA, which a forked child must not touch
            self._executor = ProcessPoolExecutor(
                train.record_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=start_recording_worker,
            )

    def fill(self, next_index: int) -> None:
        """Rebuild the pool so that its newest episode is `next_index - 1`."""
        self.episodes, self.next_index = [], max(0, next_index - self.train.pool_episodes)
        self._request(range(self.next_index, next_index))
        while self.next_index < next_index or len(self.episodes) < self.train.pool_episodes:
            self.advance()

    def advance(self) -> None:
        m = self.config.model
        index = self.next_index
        if self._executor is None:
            episode = record(*self._recording(index))
        else:
            # keep every worker busy: episodes up to 4 per worker ahead of the one taken now
            self._request(range(index, index + 4 * self.train.record_workers))
            episode = self._ahead.pop(index).result()
        frames = torch.from_numpy(episode.frames)  # (L, H, W, 3)
        pooled = PooledEpisode(index, episode.prompt, torch.from_numpy(action_array(episode, m.actions.mouse_scale)))
        if self.encode is None:
            pooled.frames = frames
        else:
            pooled.latents = self.encode(frames)
        self.episodes.append(pooled)
        if len(self.episodes) > self.train.pool_episodes:
            self.episodes.pop(0)
        self.next_index += 1

    def _recording(self, index: int) -> tuple[EpisodeSpec, int, tuple[int, int], tuple[str, ...]]:
        """The arguments of `record` for episode `index` of the stream (picklable, for a worker)."""
        m = self.config.model
        spec = train_spec(self.train.seed, index)
        return spec, self.train.episode_frames, (m.frame_height, m.frame_width), tuple(m.actions.keys)

    def _request(self, indices: range) -> None:
        if self._executor is None:
            return
        with workers_start_deaf_to_stops():  # the executor starts its workers as jobs are submitted
            for index in indices:
                if index not in self._ahead:
                    self._ahead[index] = self._executor.submit(record, *self._recording(index))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._ahead = None, {}


def sample_frames(pool: EpisodePool, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random frames of the pool, uint8 (B, H, W, 3)."""
    which = torch.randint(len(pool.episodes), (batch,), generator=generator).tolist()
    out = []
    for e in which:
        frames = pool.episodes[e].frames
        out.append(frames[int(torch.randint(len(frames), (1,), generator=generator))])
    return torch.stack(out)


@dataclass
class Clips:
    """B samples of F = 1 + T frames (sink frame 0, then frames s .. s + T - 1): latents (B, F, C, h, w), the
    latents of the frames before them (B, F, C, h, w; zeros before frame 0), actions (B, F, A), frame indices
    (B, F), prompts."""

    latents: torch.Tensor
    previous: torch.Tensor
    actions: torch.Tensor
    times: torch.Tensor
    prompts: list[str]


def sample_clips(
    pool: EpisodePool, batch: int, frames: int, prompt_dropout: float, generator: torch.Generator
) -> Clips:
    latents, previous, actions, times, prompts = [], [], [], [], []
    for _ in range(batch):
        episode = pool.episodes[int(torch.randint(len(pool.episodes), (1,), generator=generator))]
        length = len(episode.latents)
        if length < frames + 1:
            raise ValueError(f"episodes of {length} frames are too short for clips of 1 + {frames} frames")
        start = 1 + int(torch.randint(length - frames, (1,), generator=generator))  # s in [1, L - T]
        index = torch.cat((torch.zeros(1, dtype=torch.int64), torch.arange(start, start + frames)))  # (F,)
        latents.append(episode.latents[index])
        before = episode.latents[(index - 1).clamp(min=0)]
        before[index == 0] = 0
        previous.append(before)
        actions.append(episode.actions[index])
        times.append(index)
        dropped = float(torch.rand((), generator=generator)) < prompt_dropout
        prompts.append("" if dropped else episode.prompt)
    return Clips(torch.stack(latents), torch.stack(previous), torch.stack(actions), torch.stack(times), prompts)


def teacher_forcing_mask(frames: int, tokens_per_frame: int) -> torch.Tensor:
    """(2 F n, 2 F n) bool over [context stream, target stream] of F frames each, n tokens per frame: context i
    sees context j <= i; target i sees context j < i and target i itself."""
    i = torch.arange(frames)
    context_sees_context = i[None, :] <= i[:, None]  # (F, F)
    target_sees_context = i[None, :] < i[:, None]
    target_sees_target = torch.eye(frames, dtype=torch.bool)
    top = torch.cat((context_sees_context, torch.zeros(frames, frames, dtype=torch.bool)), dim=1)
    bottom = torch.cat((target_sees_context, target_sees_target), dim=1)
    mask = torch.cat((top, bottom), dim=0)  # (2F, 2F) frames
    return mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def dit_loss(
    model: WorldModel,
    clips: Clips,
    context_noise_max: float,
    generator: torch.Generator,
    predicted_context: float = 0.0,
    predicted_level_min: float = 0.5,
    predicted_passes: int = 1,
    history: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Flow-matching loss of the target stream under noised-context teacher forcing (module docstring). With
    `predicted_context` > 0 that share of the history frames is first replaced by the model's own predictions
    (`predicted_history`, `predicted_passes` deep); `history` is one made by the caller instead, its latents and
    previous-frame inputs (B, F, C, h, w) each (`rollout_history`)."""
    x = clips.latents.to(model.dit.patch_embed.weight.device)  # (B, F, C, h, w)
    device = x.device
    B, Fr = x.shape[:2]
    history, before = (x, clips.previous.to(device)) if history is None else (t.to(device) for t in history)
    if predicted_context > 0:
        history, before = predicted_history(
            model, clips, context_noise_max, predicted_context, predicted_level_min, generator, predicted_passes
        )
    context_level, target_level, noise = _noise_draws(x, context_noise_max, 0.0, generator)
    context, target = _noised(history, context_level, noise[0]), _noised(x, target_level, noise[1])
    previous = None
    if model.dit.previous_embed is not None:
        # the frame before, noised like the history it comes from (a frame and its commit pass see the same one)
        level = (torch.rand(B, Fr, generator=generator) * context_noise_max).to(device)
        previous = _noised(before, level, torch.randn(before.shape, generator=generator).to(device))
    velocity = _teacher_forced_velocity(model, clips, context, target, context_level, target_level, previous)
    return F.mse_loss(velocity.float(), (noise[1] - x).float())


def _noise_draws(
    x: torch.Tensor, context_noise_max: float, target_level_min: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For latents x (B, F, C, h, w): context levels (B, F) from U(0, context_noise_max), target levels (B, F) from
    U(target_level_min, 1), and noise (2, B, F, C, h, w) for the two streams, drawn in that order."""
    B, Fr = x.shape[:2]
    context_level = torch.rand(B, Fr, generator=generator).to(x.device) * context_noise_max
    target_level = (target_level_min + (1 - target_level_min) * torch.rand(B, Fr, generator=generator)).to(x.device)
    noise = torch.randn((2, *x.shape), generator=generator).to(x.device)
    return context_level, target_level, noise


def _noised(clean: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified flow's x_t = (1 - t) x_0 + t noise, per frame: latents (B, F, C, h, w) at levels (B, F)."""
    t = level[:, :, None, None, None]
    return (1 - t) * clean + t * noise


def _teacher_forced_velocity(
    model: WorldModel,
    clips: Clips,
    context: torch.Tensor,
    target: torch.Tensor,
    context_level: torch.Tensor,
    target_level: torch.Tensor,
    previous: torch.Tensor | None,
) -> torch.Tensor:
    """The DiT's velocity (B, F, C, h, w) for the target stream of [context, target] (each (B, F, C, h, w), at
    levels (B, F)) under the teacher-forcing mask; `previous` (B, F, C, h, w) feeds both streams."""
    Fr, device = context.shape[1], context.device
    inputs = torch.cat((context, target), dim=1)  # (B, 2F, C, h, w)
    levels = torch.cat((context_level, target_level), dim=1)  # (B, 2F)
    actions = clips.actions.to(device).repeat(1, 2, 1)  # (B, 2F, A)
    times = clips.times.to(device).repeat(1, 2)  # (B, 2F)
    if previous is not None:
        previous = previous.repeat(1, 2, 1, 1, 1)
    dit = model.dit
    n = dit.grid[0] * dit.grid[1]
    attention = SequenceAttention(dit.rope, dit.positions_at(times), teacher_forcing_mask(Fr, n).to(device))
    prompt = model.prompt_encoder(clips.prompts)
    return dit(inputs, levels, actions, prompt, attention, previous)[:, Fr:]


@torch.no_grad()
def predicted_history(
    model: WorldModel,
    clips: Clips,
    context_noise_max: float,
    share: float,
    level_min: float,
    generator: torch.Generator,
    passes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips' latents (B, F, C, h, w) with a `share` of frames replaced by the model's prediction of them, and
    the matching previous-frame inputs (B, F, C, h, w): frame i's is frame i - 1 as replaced, where frame i - 1 is
    in the clip. A pass predicts every frame in one step, from a noise level in U(`level_min`, 1) of the true frame,
    given a (noised) history; the first pass is given the true history, each later pass the history the pass before
    predicted, so after `passes` passes a frame's history holds errors compounded as over that many rollout steps.
    In a rollout every frame of the history is the model's own; training on histories holding some of its errors
    and true targets teaches it to pull a drifting world back instead of continuing the drift."""
    x = clips.latents.to(model.dit.patch_embed.weight.device)
    device = x.device
    B, Fr = x.shape[:2]
    true_before = clips.previous.to(device)
    history, before = x, true_before
    for _ in range(passes):
        context_level, target_level, noise = _noise_draws(x, context_noise_max, level_min, generator)
        target = _noised(x, target_level, noise[1])
        previous = before if model.dit.previous_embed is not None else None
        velocity = _teacher_forced_velocity(
            model, clips, _noised(history, context_level, noise[0]), target, context_level, target_level, previous
        )
        history = (target - target_level[:, :, None, None, None] * velocity.to(x.dtype)).to(x.dtype)  # x_t - t v
        before = _previous_of(history, before)
    swap = (torch.rand(B, Fr, generator=generator) < share).to(device)[:, :, None, None, None]
    history = torch.where(swap, history, x)
    return history, _previous_of(history, true_before)


def rollout_engine(model: WorldModel, config: WorldConfig, frames: int) -> WorldEngine:
    """An engine that generates with `model` as it trains (its weights as they are at each call), under the
    config's sampler and a dense cache without sparse attention: the history the DiT's training pass attends to is
    exact, so the rollout's errors are the model's own, not a cache's. Its worlds hold at most `frames` frames (a
    clip's), so their caches are rows of one pool, allocated whole at that bound: each step writes and reads every
    world's slots in a few indexed operations per layer, where caches that grow each on its own take a copy per
    world."""
    tokens = config.sizes().tokens_per_frame
    dense = with_overrides(
        config,
        {
            "cache.policy": "dense",
            "cache.max_slots": frames * tokens,
            "cache.grow_frames": max(config.cache.grow_frames, frames),  # the bound within one growth: pooled
            "attention.annsa": False,
            "attention.annca": False,
        },
    )
    parameter = model.dit.patch_embed.weight
    return WorldEngine(dense, model, parameter.device, parameter.dtype)


@torch.no_grad()
def rollout_history(
    engine: WorldEngine, clips: Clips, frames: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips' latents (B, F, C, h, w) with `frames` consecutive history frames, from a clip frame r drawn from
    [1, F - frames], replaced by the model's own rollout, and the matching previous-frame inputs (B, F, C, h, w).
    Each clip becomes a world (its prompt, a seed drawn from `generator`) that observes its true frames before r
    (the sink frame 0, then frames s .. at their indices s ..) and then generates `frames` frames one after another
    under the clip's true actions, each from the frames it generated before: a rollout `frames` long, as a served
    world makes it. With true targets after such a history, the model learns to bring its own drifting frames back
    to the game's (`dit.rollout_frames`)."""
    if engine.chunk_frames != 1:
        raise ValueError("rollout histories need chunk_frames 1 (a clip's sink frame is a chunk of its own)")
    x = clips.latents.to(engine.device, engine.dtype)
    B, Fr = x.shape[:2]
    if not 1 <= frames <= Fr - 1:
        raise ValueError(f"a rollout of {frames} frames does not fit after the sink frame of a {Fr}-frame clip")
    start = 1 + int(torch.randint(Fr - frames, (1,), generator=generator))  # r: the first generated clip frame
    seeds = torch.randint(2**31 - 1, (B,), generator=generator).tolist()
    engine.reserve_worlds(B)
    worlds = [engine.new_world(prompt, seed) for prompt, seed in zip(clips.prompts, seeds)]
    actions = clips.actions.to(engine.device, engine.dtype)
    engine.observe_latents(worlds, x[:, :1], actions[:, :1])
    if start > 1:
        times = clips.times[:, 1].tolist()  # s: where the clip's frames after the sink start
        engine.observe_latents(worlds, x[:, 1:start], actions[:, 1:start], times, clips.previous[:, 1])
    generated = [engine.step_latents(worlds, actions[:, i : i + 1]) for i in range(start, start + frames)]
    history = x.clone()
    history[:, start : start + frames] = torch.cat(generated, dim=1).clone()  # out of inference mode
    return history.to(clips.latents.dtype), _previous_of(history, clips.previous.to(x.device)).to(clips.latents.dtype)


def _previous_of(history: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Previous-frame inputs (B, F, C, h, w) for a clip's `history`: clip frames 1.. are consecutive, so frame i's
    (i >= 2) is history frame i - 1; frames 0 and 1 keep theirs from `before` (what precedes them is not in the
    clip)."""
    before = before.clone()
    before[:, 2:] = history[:, 1:-1]
    return before


def reconstruct(
    model: WorldModel, frames: torch.Tensor, latent_noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, H, W, 3) uint8 through encoder, relative latent noise and decoder: (decoded, truth), both
    float (B, 3, H, W) in [0, 1]."""
    ae = model.autoencoder
    latents = ae.encode(frames)  # (B, C, h, w)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    noisy = latents + latent_noise * latents.detach().std() * noise
    decoded = ae.decode_float(noisy).float()  # (B, 3, H, W)
    return decoded, frames.to(decoded.device).permute(0, 3, 1, 2).float() / 255.0


def autoencoder_loss(model: WorldModel, frames: torch.Tensor, latent_noise: float, generator: torch.Generator):
    """MSE in [0, 1] of frames (B, H, W, 3) uint8 through encoder, relative latent noise and decoder."""
    decoded, truth = reconstruct(model, frames, latent_noise, generator)
    return F.mse_loss(decoded, truth)


# ---- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class Critic:
    """The decoder phase's patch discriminator and its optimiser, which live and are saved together."""

    net: PatchDiscriminator
    optimizer: torch.optim.Optimizer


def learning_rate(phase: PhaseConfig, step: int) -> float:
    if step < phase.warmup_steps:
        return phase.lr * (step + 1) / phase.warmup_steps
    progress = (step - phase.warmup_steps) / max(1, phase.steps - phase.warmup_steps)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class TrainingRun:
    """One run folder (module docstring): `run()` trains until its phases are done, `max_minutes` have passed
    since it was called, it has taken `max_steps` optimiser steps, or SIGTERM or SIGINT (Ctrl-C) arrives; it saves
    before returning. A second SIGINT while it finishes its step stops it at once, without saving."""

    def __init__(
        self,
        out: str | Path,
        config: WorldConfig,
        train: TrainConfig,
        device: str = "auto",
        max_minutes: float | None = None,
        progress: bool = True,
        max_steps: int | None = None,
        init_from: str | Path | None = None,
    ) -> None:
        self.out = Path(out)
        self.device = resolve_device(device)
        self.max_minutes = max_minutes
        self.max_steps = max_steps
        self._session_steps = 0
        self.progress = progress
        if config.model.chunk_frames != 1:
            raise ConfigError(
                "worldserve train supports model.chunk_frames = 1 only (the teacher-forcing mask is per frame)"
            )
        self.config, self.train = self._adopt(config, train)
        torch.manual_seed(self.train.seed)  # module construction below draws from the global RNG
        self.model = WorldModel(self.config)
        self.model.dit.zero_init_()
        self.model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.generator = torch.Generator().manual_seed(self.train.seed)
        # the decoder phase's critic, only in runs that have that phase (its weights and AdamW are ~5 MB of state)
        self.critic: Critic | None = None
        if self.train.decoder.steps > 0:
            with torch.random.fork_rng(devices=[]):  # leaves the global random state as it was without it
                torch.manual_seed(self.train.seed + 1)
                net = PatchDiscriminator().to(self.device)
            optimizer = torch.optim.AdamW(net.parameters(), lr=self.train.decoder.discriminator_lr, betas=(0.5, 0.9))
            self.critic = Critic(net, optimizer)
        self._phase_log: dict[str, torch.Tensor] = {}  # what the phase's loss adds to each log line
        self.step, self.elapsed = 0, 0.0
        self._enter("autoencoder")
        self.pool: EpisodePool | None = None
        self._stop = False
        if (self.out / "state.pt").exists():
            self._load_state()  # a resumed run continues from its own state; init_from only starts one
        else:
            self._start(None if init_from is None else Path(init_from))

    # -- setup ---------------------------------------------------------------------------------------------------------

    def _adopt(self, config: WorldConfig, train: TrainConfig) -> tuple[WorldConfig, TrainConfig]:
        """A new run writes its configs; a resumed one must have been started with the same ones."""
        self.out.mkdir(parents=True, exist_ok=True)
        saved_config, saved_train = self.out / "config.yaml", self.out / "train.yaml"
        if not saved_config.exists():
            config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"checkpoint": None})})
            _write_yaml(saved_config, config.model_dump(mode="json"))
            _write_yaml(saved_train, train.model_dump(mode="json"))
            return config, train
        stored = load_config(saved_config)
        stored_train = load_train_config(saved_train)
        ours, theirs = config.model.model_dump(), stored.model.model_dump()
        for model in (ours, theirs):
            del model["autoencoder"]["latent_scale"]  # the run measures and sets it
        if ours != theirs or stored_train != train:
            raise ConfigError(
                f"{self.out} holds a run started with a different model or training config; "
                "resume with the same configs or choose another --out"
            )
        return stored, stored_train

    def _start(self, init_from: Path | None) -> None:
        """A new run: from random weights, or from a trained checkpoint's (its latent_scale included). A phase of
        0 steps is skipped, so `autoencoder.steps: 0` fine-tunes the decoder (adversarially) or the DiT of
        `init_from` on fresh episodes."""
        if self.train.autoencoder.steps == 0:
            if init_from is None:
                raise ConfigError(
                    "autoencoder.steps is 0: the decoder and the DiT need a trained autoencoder; pass --init-from"
                )
            self._enter(self._following("autoencoder"))
        if init_from is not None:
            try:
                self._set_latent_scale(read_model_config(init_from).autoencoder.latent_scale)
                # in place (the optimiser's parameters stay the same); an input the checkpoint lacks starts at zero
                load_checkpoint(init_from, self.model, adding=True)
            except CheckpointError as error:
                raise ConfigError(f"--init-from: {error}") from None
            self.ema.load_state_dict(self.model.state_dict())
            self._log(event="initialised", init_from=str(init_from))

    def _trainable(self) -> list[torch.nn.Parameter]:
        if self.phase == "autoencoder":
            return list(self.model.autoencoder.parameters())
        if self.phase == "decoder":
            return list(self.model.autoencoder.decoder.parameters())
        return [*self.model.dit.parameters(), *self.model.prompt_encoder.parameters()]

    def _phase_config(self, phase: str | None = None) -> PhaseConfig:
        phase = phase or self.phase
        return {"autoencoder": self.train.autoencoder, "decoder": self.train.decoder}.get(phase, self.train.dit)

    def _following(self, phase: str) -> str:
        """The phase after `phase`, skipping those of 0 steps."""
        later = PHASES[PHASES.index(phase) + 1 :]
        return next(p for p in later if p == "done" or self._phase_config(p).steps > 0)

    def _enter(self, phase: str) -> None:
        """Make `phase` the current one: only what it trains has gradients, and its optimiser starts fresh."""
        self.phase = phase
        ae = self.model.autoencoder
        ae.requires_grad_(phase == "autoencoder")
        ae.decoder.requires_grad_(phase in ("autoencoder", "decoder"))
        self.optimizer = self._optimizer()

    def _optimizer(self) -> torch.optim.Optimizer:
        phase = self._phase_config()
        return torch.optim.AdamW(self._trainable(), lr=phase.lr, weight_decay=phase.weight_decay, betas=(0.9, 0.99))

    # -- state ---------------------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state = {
            "format": STATE_FORMAT,
            "phase": self.phase,
            "step": self.step,
            "elapsed": self.elapsed,
            "latent_scale": self.config.model.autoencoder.latent_scale,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.critic is not None:
            state["discriminator"] = self.critic.net.state_dict()
            state["discriminator_optimizer"] = self.critic.optimizer.state_dict()
        return state

    def _load_state(self) -> None:
        path = self.out / "state.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a damaged file
            raise ConfigError(f"{path}: cannot read the training state ({type(error).__name__}: {error})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"{path}: not a worldserve training state")
        self._set_latent_scale(state["latent_scale"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self._enter(state["phase"])
        self.optimizer.load_state_dict(state["optimizer"])
        # runs without a decoder phase keep no critic (a resumed run has the same phases: `_adopt`); states written
        # before the phase existed have none either
        if "discriminator" in state and self.critic is not None:
            self.critic.net.load_state_dict(state["discriminator"])
            self.critic.optimizer.load_state_dict(state["discriminator_optimizer"])
        self.generator.set_state(state["generator"])
        print(f"resuming {self.out}: phase {self.phase}, step {self.step}, {self.elapsed / 60:.1f} min trained")

    def save(self) -> None:
        """state.pt and model.safetensors (the autoencoder being trained, or the EMA weights of the DiT with the
        trained autoencoder), each written atomically."""
        partial = self.out / "state.pt.partial"
        torch.save(self._state(), partial)
        partial.replace(self.out / "state.pt")
        export = self.model if self.phase in ("autoencoder", "decoder") else self.ema
        meta = {
            "training": json.dumps({"phase": self.phase, "step": self.step, "minutes": round(self.elapsed / 60, 1)})
        }
        save_checkpoint(self.out / "model.safetensors.partial", export, meta)
        (self.out / "model.safetensors.partial").replace(self.out / "model.safetensors")

    def _set_latent_scale(self, scale: float) -> None:
        ae = self.config.model.autoencoder.model_copy(update={"latent_scale": scale})
        model = self.config.model.model_copy(update={"autoencoder": ae})
        self.config = self.config.model_copy(update={"model": model})
        for m in (getattr(self, "model", None), getattr(self, "ema", None)):
            if m is not None:
                m.config = self.config
                m.autoencoder.latent_scale = scale
        _write_yaml(self.out / "config.yaml", self.config.model_dump(mode="json"))

    # -- loop ----------------------------------------------------------------------------------------------------------

    def run(self) -> None:
        self._session_started = time.perf_counter()
        previous = {stop: signal.signal(stop, self._request_stop) for stop in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.phase != "done" and not self._out_of_time():
                self._run_phase()
        finally:
            for stop, handler in previous.items():
                signal.signal(stop, handler)

    def _request_stop(self, received: int, _: Any) -> None:
        if self._stop and received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now
        self._stop = True
        name = signal.Signals(received).name
        print(f"\n{name}: stopping after this step and saving (Ctrl-C again stops at once)", file=sys.stderr)

    def _out_of_time(self) -> bool:
        if self.max_steps is not None and self._session_steps >= self.max_steps:
            return True
        return self._stop or (self.max_minutes is not None and self._session_seconds() > 60 * self.max_minutes)

    def _session_seconds(self) -> float:
        return time.perf_counter() - self._session_started

    def _run_phase(self) -> None:
        phase = self._phase_config()
        ae = self.model.autoencoder
        encode = None if self.phase in ("autoencoder", "decoder") else self._encoder(ae)
        self.pool = EpisodePool(self.config, self.train, encode)
        try:
            started = time.perf_counter()
            # the decoder and DiT phases record episodes the autoencoder never saw
            first = 0 if self.phase == "autoencoder" else self.train.pool_episodes + self.train.autoencoder.steps
            self.pool.fill(first + self.train.pool_episodes + self.step // phase.refresh_every)
            ready = time.perf_counter() - started
            print(f"{self.phase}: pool of {self.train.pool_episodes} episodes ready in {ready:.1f} s")
            bar = tqdm(
                total=phase.steps,
                initial=self.step,
                desc=self.phase,
                disable=not self.progress,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                dynamic_ncols=True,
            )
            last_save = time.perf_counter()
            smoothed = None
            while self.step < phase.steps and not self._out_of_time():
                tick = time.perf_counter()
                lr = learning_rate(phase, self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self._loss()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), 1.0)
                self.optimizer.step()
                self._update_ema()
                self.step += 1
                self._session_steps += 1
                if self.step % phase.refresh_every == 0:
                    self.pool.advance()
                self.elapsed += time.perf_counter() - tick
                value = float(loss.detach())  # one host read per step, for the bar and the log
                smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.1e}", refresh=False)
                if self.step % self.train.log_every == 0:
                    parts = {name: float(part) for name, part in self._phase_log.items()}
                    self._log(loss=value, smoothed=smoothed, lr=lr, grad_norm=float(grad_norm), **parts)
                if time.perf_counter() - last_save > 60 * self.train.checkpoint_minutes:
                    self.save()
                    last_save = time.perf_counter()
            bar.close()
            if self.step >= phase.steps:
                self._finish_phase()
        except BrokenProcessPool as error:  # a worker was killed from outside (the system's out-of-memory killer)
            self.save()  # each step is whole: the pool is a function of the step, rebuilt as it was on resume
            raise TrainingError(
                f"an episode-recording worker process died ({error}); the run saved at phase {self.phase}, step "
                f"{self.step}: run the same command to resume (record_workers: 0 records in the training process)"
            ) from error
        finally:
            self.pool.close()
        self.save()

    def _loss(self) -> torch.Tensor:
        assert self.pool is not None
        if self.phase == "autoencoder":
            phase = self.train.autoencoder
            frames = sample_frames(self.pool, phase.batch, self.generator).to(self.device)
            return autoencoder_loss(self.model, frames, phase.latent_noise, self.generator)
        if self.phase == "decoder":
            frames = sample_frames(self.pool, self.train.decoder.batch, self.generator).to(self.device)
            return self._adversarial_decoder_loss(frames)
        phase = self.train.dit
        clips = sample_clips(self.pool, phase.batch, phase.frames, phase.prompt_dropout, self.generator)
        history = None
        rolled = phase.rollout_frames and (
            phase.rollout_share == 1 or float(torch.rand(1, generator=self.generator)) < phase.rollout_share
        )
        if rolled:  # generated in float32, outside the training pass's autocast
            engine = rollout_engine(self.model, self.config, clips.latents.shape[1])
            history = rollout_history(engine, clips, phase.rollout_frames, self.generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return dit_loss(
                self.model,
                clips,
                phase.context_noise_max,
                self.generator,
                phase.predicted_context,
                phase.predicted_level_min,
                phase.predicted_passes,
                history,
            )

    def _adversarial_decoder_loss(self, frames: torch.Tensor) -> torch.Tensor:
        """One discriminator step on this batch of frames and their reconstructions, then the decoder's loss
        against the updated discriminator: MSE in [0, 1] plus `adversarial_weight` times its hinge loss."""
        phase = self.train.decoder
        assert self.critic is not None  # built whenever decoder.steps > 0
        critic, critic_optimizer = self.critic.net, self.critic.optimizer
        decoded, truth = reconstruct(self.model, frames, phase.latent_noise, self.generator)
        critic.requires_grad_(True)
        critic_loss = discriminator_loss(critic(truth), critic(decoded.detach()))
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_optimizer.step()
        critic.requires_grad_(False)  # the decoder's loss needs gradients through it, not of its weights
        mse = F.mse_loss(decoded, truth)
        adversarial = generator_loss(critic(decoded))
        self._phase_log = {"mse": mse.detach(), "adversarial": adversarial.detach(), "critic": critic_loss.detach()}
        return mse + phase.adversarial_weight * adversarial

    def _encoder(self, ae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        @torch.no_grad()
        def encode(frames: torch.Tensor) -> torch.Tensor:
            return torch.cat([ae.encode(chunk.to(self.device)).cpu() for chunk in frames.split(64)])

        return encode

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.phase != "dit":
            return
        decay = min(self.train.dit.ema_decay, (1 + self.step) / (10 + self.step))
        for part in ("dit", "prompt_encoder"):
            for ema, live in zip(getattr(self.ema, part).parameters(), getattr(self.model, part).parameters()):
                ema.lerp_(live, 1 - decay)

    @torch.no_grad()
    def _finish_phase(self) -> None:
        if self.phase == "autoencoder":
            assert self.pool is not None
            frames = sample_frames(self.pool, 1024, self.generator).to(self.device)
            self.model.autoencoder.latent_scale = 1.0
            latents = torch.cat([self.model.autoencoder.encode(chunk) for chunk in frames.split(128)])
            scale = float(f"{1.0 / latents.float().std().item():.4g}")
            self._set_latent_scale(scale)
            self.ema.load_state_dict(self.model.state_dict())
            self._log(event="autoencoder done", latent_scale=scale)
            print(f"autoencoder done: latent_scale {scale}")
        elif self.phase == "decoder":
            self.ema.autoencoder.load_state_dict(self.model.autoencoder.state_dict())
            self._log(event="decoder done")
        following = self._following(self.phase)
        self._enter(following)
        if following != "done":
            self.step = 0
        self._phase_log = {}

    def _log(self, **fields: Any) -> None:
        entry = {"phase": self.phase, "step": self.step, "minutes": round(self.elapsed / 60, 4), **fields}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(yaml.safe_dump(data, sort_keys=False))
    partial.replace(path)


def train(
    out: str | Path,
    config: WorldConfig,
    train_config: TrainConfig,
    device: str = "auto",
    max_minutes: float | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    init_from: str | Path | None = None,
) -> TrainingRun:
    """Train (or resume) the run in `out` until its phases are done, `max_minutes` have passed or `max_steps`
    optimiser steps were taken in this call; returns the run, whose `phase` is "done" when all phases finished.
    A new run starts from the weights of checkpoint `init_from` when given (ignored when resuming)."""
    run = TrainingRun(out, config, train_config, device, max_minutes, progress, max_steps, init_from)
    run.run()
    return run
