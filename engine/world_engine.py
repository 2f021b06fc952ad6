"""WorldEngine: builds the model once and advances batches of worlds chunk by chunk.

    engine = WorldEngine.from_config(load_config("configs/default.yaml"), device="cpu")
    world = engine.new_world(prompt="red brick dungeon", seed=0)
    [frames] = engine.step([world], [Action(frozenset({"KeyW"}))])   # chunk_frames uint8 (H, W, 3) arrays

One `step` is one batched call for all the worlds given: projections and feed-forward layers run over the whole
batch; dense attention runs over all worlds at once, each world's cache padded to the longest, where the padding
stays small, and per world over its own cache length otherwise (see engine/attention.py), so worlds that started
at different times batch together.

`step` is `predict` (denoise and decode the next chunk) followed by the commit (write it into the caches: with
`sampler.reencode`, the encoding of its decoded frames, as `observe` writes true frames). The commit of a step's
chunk runs in the first forward of the world's next step, as rows beside the denoising ones (one DiT forward fewer
per chunk; `flush` runs it at once). For
evaluation against ground truth the two halves are also public: teacher forcing predicts from the true history and
then writes the TRUE frame instead of the prediction,

    [[predicted]] = engine.predict([world], [action])   # the cache and frame_index stay as they were
    engine.observe(world, true_frame[None], [action])    # the true frame becomes the world's next frame
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.actions import IDLE, Action
from engine.attention import (
    CachedAttention,
    FoldedCommit,
    PrefillAttention,
    RotatedSlots,
    StepSlots,
    causal_mask,
    without_cudnn_attention,
)
from engine.checkpoint import load_checkpoint
from engine.config import WorldConfig
from engine.kv_cache import CachePool, WorldCache
from engine.meter import AttentionMeter
from engine.model import WorldModel
from engine.policies import make_policy
from engine.prompt import PromptTokens
from engine.sampler import FlowSampler
from engine.sparse_attention import SparseAttention
from engine.transfer import to_device
from engine.world import PendingCommit, World

ChunkActions = Action | Sequence[Action]  # one action for every frame of the chunk, or one per frame


# the most new tokens per world that `observe_latents` writes in one forward under a policy that keeps every token
# (the default model's 256 frames, a Wan2.1-shaped model's 2): attention's scores grow with their square (4,096
# tokens: 64 MiB per world and head in float32)
PREFILL_TOKENS = 4096


@dataclass
class _Chunk:
    """A denoised chunk of B worlds, not yet in their caches, and what its commit pass reuses."""

    clean: torch.Tensor  # (B, T, C, h, w) latents
    actions: torch.Tensor  # (B, T, A)
    shared: StepSlots  # rotated cache slots, read by the denoising passes and then by the commit pass


@dataclass
class _Commit:
    """The commit pass of the pending chunks of some worlds, as rows of a DiT forward: latents x (B', T, C, h, w)
    at noise levels t (B', T), actions (B', T, A), prompts, previous-frame inputs, and the writing context."""

    x: torch.Tensor
    t: torch.Tensor
    actions: torch.Tensor
    prompt: PromptTokens
    previous: torch.Tensor | None
    attention: CachedAttention


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class WorldEngine:
    def __init__(self, config: WorldConfig, model: WorldModel, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.sizes = config.sizes(dtype_bytes=torch.empty(0, dtype=dtype).element_size())
        self.policy = make_policy(config.cache, self.sizes)
        # a bounded policy's worlds (a dense one's bounded within one growth too) are rows of a few buffers per layer
        # (batched commits and attention); caches that grow are each on its own
        m = config.model
        self.pool = None
        if self.policy.pooled:
            self.pool = CachePool(m.depth, m.heads, m.head_dim, self.policy.capacity, dtype, device)
        self.sampler = FlowSampler(config.sampler)
        with torch.inference_mode():
            self._free_prompt = model.prompt_encoder([""])  # what prompt dropout trained: the unconditional branch
        self.action_space = model.action_space
        # action guidance's null: a chunk of standing still, (T, A)
        self._idle_actions = self.action_space.encode([IDLE] * self.chunk_frames)[0].to(device, dtype)
        attention = config.attention
        self.meter = AttentionMeter() if attention.measure else None
        self.sparse = None
        if attention.annsa or attention.annca:
            self.sparse = SparseAttention(attention, config.model.head_dim, config.sampler.steps, device, self.meter)

    @classmethod
    def from_config(cls, config: WorldConfig, device: str | torch.device | None = None) -> WorldEngine:
        """Build the model, load `runtime.checkpoint` (or seeded random weights) and move it to the device."""
        device = resolve_device(str(device) if device is not None else config.runtime.device)
        dtype = resolve_dtype(config.runtime.dtype, device)
        model = WorldModel(config)
        if config.runtime.checkpoint is not None:
            load_checkpoint(config.runtime.checkpoint, model)
        else:
            model.init_random_(config.runtime.init_seed)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        # the autoencoder stays in float32: it is small, and the shipped one's unscaled latents reach ~6e4, at the
        # edge of float16's range
        # channels-last convolutions: the same frames, ~12% less decode time on a CPU (docs/engine.md)
        model.autoencoder.float().to(memory_format=torch.channels_last)
        return cls(config, model, device, dtype)

    def sibling(self, config: WorldConfig) -> WorldEngine:
        """An engine with other inference settings (cache policy, attention, sampler) that shares this one's
        weights; `config.model` must equal this engine's. Its worlds batch only with their own engine's."""
        if config.model != self.config.model:
            raise ValueError("a sibling engine must have the same model section (it shares the weights)")
        return WorldEngine(config, self.model, self.device, self.dtype)

    @property
    def chunk_frames(self) -> int:
        return self.config.model.chunk_frames

    @torch.inference_mode()
    def new_world(self, prompt: str = "", seed: int = 0, init_frames: np.ndarray | None = None) -> World:
        """A fresh world; `init_frames` (T, H, W, 3) uint8, T a multiple of chunk_frames, are written into its
        cache as its first frames (`observe` under idle actions), so generation continues from them."""
        m = self.config.model
        if self.pool is not None:
            cache = self.pool.new_cache()
        else:
            cache = WorldCache.alone(m.depth, m.heads, m.head_dim, self.policy.capacity, self.dtype, self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        world = World(prompt, seed, self.model.prompt_encoder([prompt]), cache, generator)
        if init_frames is not None:
            init_frames = self._checked_frames(init_frames, "init_frames")
            self.observe(world, init_frames, [IDLE] * len(init_frames))
        return world

    def reserve_worlds(self, count: int) -> None:
        """Make room for `count` worlds about to be made together (a training rollout's clips): under a bounded
        policy their caches then come from one segment of the pool where memory allows, and a step of them takes a
        few indexed operations per layer rather than a few per segment (engine/kv_cache.py, `CachePool`). Nothing
        under an unbounded policy."""
        if self.pool is not None:
            self.pool.reserve(count)

    def set_prompt(self, world: World, prompt: str) -> None:
        """Condition the world's next frames on a new prompt; its history stays."""
        with torch.inference_mode():
            world.prompt_tokens = self.model.prompt_encoder([prompt])
        world.prompt = prompt

    @torch.inference_mode()
    def step(self, worlds: Sequence[World], actions: Sequence[ChunkActions]) -> list[list[np.ndarray]]:
        """Advance every world by one chunk in one batched call; returns per world its chunk's frames, each a uint8
        (H, W, 3) array. Worlds must be distinct and made by this engine."""
        started = time.perf_counter()
        # 1. denoise the next chunk from each world's own noise; the first forward also writes each world's pending
        # chunk (the one its previous step made) into its cache, and the caches are only read after that
        chunk = self._denoise(worlds, self._encode_actions(worlds, actions))
        # 2. decode to RGB on the device; with `reencode`, the frames' encoding becomes the history
        decode_started = time.perf_counter()
        pixels = self._pixels(chunk.clean)  # (B T, H, W, 3)
        history = self._history(chunk.clean, pixels)
        decoded = time.perf_counter()
        # 3. the chunk waits for its commit pass, which the worlds' next step runs in its first forward
        self._advance(worlds, chunk, history)
        committed = time.perf_counter()
        # 4. copy the frames to the host (the copy synchronises; TempCache and the sparse paths have a few host reads
        # of their own, each commented where it happens)
        frames = self._frames(pixels, len(worlds))
        finished = time.perf_counter()
        for world in worlds:
            world.stats.last_step_ms = (finished - started) * 1e3
            world.stats.last_decode_ms = (decoded - decode_started + finished - committed) * 1e3
        return frames

    @torch.inference_mode()
    def step_latents(self, worlds: Sequence[World], actions: torch.Tensor) -> torch.Tensor:
        """`step` for a caller that works in latents, as training on the model's own rollouts does: `actions` are
        already encoded, (B, T, A) in the action space's encoding, one row per world; returns the latents the worlds'
        caches receive for the chunk, (B, T, C, h, w) (the denoised ones, or with `reencode` the encoding of their
        decoded frames), before any context noise. Nothing is decoded otherwise; the step timings are not set."""
        expected = (len(worlds), self.chunk_frames, self.action_space.dim)
        if tuple(actions.shape) != expected:
            raise ValueError(f"step_latents needs encoded actions of shape {expected}, got {tuple(actions.shape)}")
        chunk = self._denoise(worlds, to_device(actions, self.device, self.dtype))
        history = self._history(chunk.clean)
        self._advance(worlds, chunk, history)
        return history

    @torch.inference_mode()
    def predict(self, worlds: Sequence[World], actions: Sequence[ChunkActions]) -> list[list[np.ndarray]]:
        """The frames `step` would generate for every world (same noise, same sampler, same batching), without
        writing them into the caches: each world's cache and `frame_index` stay as they were. Each world's random
        generator DOES advance (its noise is drawn), so a later call draws the noise of the chunk after. Returns per
        world its chunk's frames, uint8 (H, W, 3) arrays. Follow with `observe` to write the true frames instead."""
        self.flush(worlds)
        chunk = self._denoise(worlds, self._encode_actions(worlds, actions))
        return self._frames(self._pixels(chunk.clean), len(worlds))

    @torch.inference_mode()
    def observe(self, world: World, frames: np.ndarray, actions: Sequence[Action]) -> None:
        """Write true frames into the world's cache as its next frames, each conditioned on its own action, exactly
        as `step` writes a generated chunk (its commit pass, at `sampler.context_noise`), and advance `frame_index`.

        `frames` uint8 (T, H, W, 3), T a positive multiple of chunk_frames; `actions` T `Action`s (frame t is the
        view after action t). Observed frames are not counted in `world.stats.frames`. At a context noise above 0
        the world's generator advances (the commit's noise is drawn from it, as in `step`)."""
        frames = self._checked_frames(frames, "frames")
        if len(actions) != len(frames) or not all(isinstance(a, Action) for a in actions):
            raise ValueError(f"observe needs one Action per frame: got {len(actions)} for {len(frames)} frames")
        T = self.chunk_frames
        latents = self.model.autoencoder.encode(torch.from_numpy(frames)).to(self.dtype)  # (T0, C, h, w)
        encoded = torch.cat([self._encode_actions([world], [actions[s : s + T]])[0] for s in range(0, len(frames), T)])
        self.observe_latents([world], latents[None], encoded[None])

    @torch.inference_mode()
    def observe_latents(
        self,
        worlds: Sequence[World],
        latents: torch.Tensor,
        actions: torch.Tensor,
        first_frames: Sequence[int] | None = None,
        previous: torch.Tensor | None = None,
    ) -> None:
        """`observe` for a caller that works in latents, every world in the same commit passes: `latents` (B, T0, C,
        h, w) as the DiT sees them (scaled), T0 a positive multiple of chunk_frames, with their encoded actions (B,
        T0, A). `first_frames` (one per world) places each world's latents from that frame index on instead of its
        next one: a world may skip frames ahead, as a training clip does after its sink frame, under the `dense`
        policy only (a bounded cache's ring of exact frames assumes consecutive frames). `previous` (B, C, h, w)
        replaces each world's latest latent as the previous-frame input of the first observed frame. Under a policy
        that keeps every token (`dense`) without sparse attention the chunks are written in one forward
        (`PrefillAttention`), else in one commit pass per chunk."""
        B, T = len(worlds), self.chunk_frames
        shape = (B, latents.shape[1] if latents.ndim == 5 else 0, *self.sizes.latent_shape)
        if tuple(latents.shape) != shape or shape[1] == 0 or shape[1] % T:
            raise ValueError(
                f"observe_latents needs latents (B, T0, C, h, w) = {shape}, T0 a positive multiple of {T}, "
                f"got {tuple(latents.shape)}"
            )
        expected = (*shape[:2], self.action_space.dim)
        if tuple(actions.shape) != expected:
            raise ValueError(f"observe_latents needs encoded actions {expected}, got {tuple(actions.shape)}")
        self.flush(worlds)
        if first_frames is not None:
            if len(first_frames) != B or any(f < w.frame_index for f, w in zip(first_frames, worlds)):
                raise ValueError("first_frames needs one frame index per world, none before the world's next frame")
            if self.policy.name != "dense" and any(f != w.frame_index for f, w in zip(first_frames, worlds)):
                raise ValueError(f"only the dense policy may skip frames, not {self.policy.name}")
            for world, first in zip(worlds, first_frames):
                world.frame_index = int(first)
        if previous is not None:
            for world, latest in zip(worlds, to_device(previous, self.device, self.dtype)):
                world.last_latent = latest
        latents, actions = to_device(latents, self.device, self.dtype), to_device(actions, self.device, self.dtype)
        if self.policy.keeps_every_token and self.sparse is None:
            # in forwards of at most PREFILL_TOKENS new tokens a world: attention's memory grows with their square
            self._ensure_room(worlds, latents.shape[1] * self.sizes.tokens_per_frame)
            frames = max(1, PREFILL_TOKENS // self.sizes.tokens_per_chunk) * T
            for start in range(0, latents.shape[1], frames):
                self._prefill(worlds, latents[:, start : start + frames], actions[:, start : start + frames])
            return
        for start in range(0, latents.shape[1], T):
            for b, world in enumerate(worlds):
                world.pending = self._pending(world, latents[b, start : start + T], actions[b, start : start + T], {})
            self.flush(worlds)
            for world in worlds:
                world.frame_index += T

    def _prefill(self, worlds: Sequence[World], latents: torch.Tensor, actions: torch.Tensor) -> None:
        """`observe_latents`'s commit passes, latents (B, T0, C, h, w) and actions (B, T0, A), in one forward: every
        chunk at the context noise (drawn from each world's generator chunk after chunk, as the passes draw it), with
        the previous-frame input and frame indices its own pass would have, sees the chunks before it."""
        B, F, T = latents.shape[0], latents.shape[1], self.chunk_frames
        history, level = latents, self.sampler.context_noise
        if level > 0:
            draws = [[self._noise(world) for world in worlds] for _ in range(0, F, T)]  # chunk after chunk
            noise = torch.stack([torch.cat([chunk[b] for chunk in draws]) for b in range(B)])  # (B, T0, C, h, w)
            history = self.sampler.noised(latents, noise, level)
        previous = self._previous(worlds)
        if previous is not None:  # each chunk's: the last frame of the chunk before it
            before = torch.cat((previous[:, :1], latents[:, T - 1 : -1 : T]), dim=1)  # (B, T0 / T, C, h, w)
            previous = before.repeat_interleave(T, dim=1)
            for world, last in zip(worlds, latents[:, -1]):
                world.last_latent = last
        dit = self.model.dit
        first_frames = [w.frame_index for w in worlds]
        pos = dit.positions(to_device(first_frames, self.device), F)  # (B, T0 n, 3)
        chunk_of_token = torch.arange(F // T, device=self.device).repeat_interleave(T * self.sizes.tokens_per_frame)
        attention = PrefillAttention(
            dit.rope, self.policy, [w.cache for w in worlds], pos, first_frames, causal_mask(chunk_of_token)
        )
        prompt = PromptTokens.stack([w.prompt_tokens for w in worlds])
        with without_cudnn_attention():
            dit.write_keys(history, history.new_full((B, F), level), actions, prompt, attention, previous)
        for world in worlds:
            world.frame_index += F

    @torch.inference_mode()
    def flush(self, worlds: Sequence[World]) -> None:
        """Write the given worlds' pending chunks into their caches now, in one commit pass. `step` leaves each
        world's newest chunk pending and writes it in the first forward of the world's next step (one DiT forward
        fewer per chunk), so a world's cache lags its frames by one chunk between steps; call this before reading
        a cache (`observe` and `predict` do). Worlds without a pending chunk are left as they are."""
        pending = [w for w in worlds if w.pending is not None]
        if pending:
            self._ensure_room(pending)
            commit = self._commit(pending)
            dit = self.model.dit
            with without_cudnn_attention():
                dit.write_keys(commit.x, commit.t, commit.actions, commit.prompt, commit.attention, commit.previous)
            for world in pending:
                world.pending = None

    def _ensure_room(self, committing: Sequence[World], slots: int | None = None) -> None:
        """Raise `CacheFull` naming the worlds whose bounded dense caches cannot take their pending chunk (or `slots`
        tokens), before any noise is drawn or anything written: the caller may go on with the other worlds."""
        caches = [w.cache.layers[0] for w in committing]  # every layer holds as many slots
        self.policy.ensure_room(caches, slots or self.sizes.tokens_per_chunk, committing)

    def _denoise(self, worlds: Sequence[World], encoded: torch.Tensor) -> _Chunk:
        """The next chunk of every world under its encoded actions (B, T, A)."""
        if not worlds:
            raise ValueError("a step needs at least one world")
        if len({id(w) for w in worlds}) != len(worlds):
            raise ValueError("a world may appear only once per step")
        committing = [w for w in worlds if w.pending is not None]
        self._ensure_room(committing)
        B, T = len(worlds), self.chunk_frames
        # 1. conditioning: actions (B, T, A), prompts, positions of the chunk's tokens
        prompt = PromptTokens.stack([w.prompt_tokens for w in worlds])
        first_frames = [w.frame_index for w in worlds]
        pos = self.model.dit.positions(to_device(first_frames, self.device), T)  # (B, N, 3)
        # 2. noise from each world's own generator, so a world's frames do not depend on its batch mates
        noise = torch.stack([self._noise(w) for w in worlds])  # (B, T, C, h, w)
        previous = self._previous(worlds)
        # the commit pass of the chunks these worlds made in their previous step, folded into the first forward
        commit = self._commit(committing) if committing else None

        # 3. denoise; after the first forward's commit rows the caches are only read, and their rotated slots are
        # shared by the passes
        shared = StepSlots()

        # the passes of a denoising step: the conditioned one, then those guidance compares it with. Every pass
        # reads the same history (the cache); only the current chunk's conditioning differs, so they run as one
        # batch of P B rows, pass-major
        guidance, action_guidance = self.sampler.guidance, self.sampler.action_guidance
        passes = [(prompt, encoded)]
        if guidance != 1.0:  # classifier-free guidance: the model learned the prompt-free velocity (prompt dropout)
            passes.append((PromptTokens.stack([self._free_prompt] * B), encoded))
        if action_guidance:  # action guidance: standing still is the action's null; a world standing still is unchanged
            passes.append((prompt, self._idle_actions.expand(B, -1, -1)))
        P = len(passes)
        given = [p for p, _ in passes] + ([] if commit is None else [commit.prompt])
        # once per step: every forward of the step reads them (the commit rows' only the first)
        every_key = self.model.dit.prompt_keys(PromptTokens.stack(given) if len(given) > 1 else prompt)
        keys = every_key.head(P * B)
        acting = torch.cat([a for _, a in passes])  # (P B, T, A)
        previous_rows = None if previous is None else previous.repeat(P, 1, 1, 1, 1)

        def velocity(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
            attention = self._attention(worlds, pos, first_frames, shared, write=False, step=step, passes=P)
            rows = x.repeat(P, 1, 1, 1, 1)  # (P B, T, C, h, w)
            levels, given_actions, given_keys, before = x.new_full((P * B, T), t), acting, keys, previous_rows
            folded = step == 0 and commit is not None
            if folded:  # the commit rows after the denoising ones
                attention = FoldedCommit(attention, commit.attention, P * B)
                rows, levels = torch.cat((rows, commit.x)), torch.cat((levels, commit.t))
                given_actions, given_keys = torch.cat((acting, commit.actions)), every_key
                before = None if before is None else torch.cat((before, commit.previous))
            v = self.model.dit(rows, levels, given_actions, given_keys, attention, before)[: P * B].chunk(P)
            if folded:
                for world in committing:
                    world.pending = None
            v_prompt, guided, rest = v[0], v[0], list(v[1:])
            if guidance != 1.0:
                v_free = rest.pop(0)
                guided = v_free + guidance * (v_prompt - v_free)
            if action_guidance:
                guided = guided + action_guidance * (v_prompt - rest.pop(0))
            return guided

        with without_cudnn_attention():  # shapes that change every frame (engine/attention.py)
            clean = self.sampler.sample(velocity, noise)  # (B, T, C, h, w)
        return _Chunk(clean, encoded, shared)

    def _history(self, clean: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """What the caches receive for a chunk whose denoised latents are `clean` (B, T, C, h, w): those, or with
        `reencode` the encoding of their decoded frames (`pixels` (B T, H, W, 3) when the caller has decoded them)."""
        if not self.config.sampler.reencode:
            return clean
        pixels = self._pixels(clean) if pixels is None else pixels
        return self.model.autoencoder.encode(pixels).to(self.dtype).unflatten(0, clean.shape[:2])

    def _advance(self, worlds: Sequence[World], chunk: _Chunk, history: torch.Tensor) -> None:
        """Leave each world's new chunk (`history` (B, T, C, h, w)) pending for its commit pass and count its frames."""
        T = self.chunk_frames
        for b, world in enumerate(worlds):
            world.pending = self._pending(world, history[b], chunk.actions[b], chunk.shared.of_world(b))
            world.frame_index += T
            world.stats.frames += T

    def _previous(self, worlds: Sequence[World]) -> torch.Tensor | None:
        """With `model.previous_frame_input`: each world's latest committed latent (zeros before its first frame),
        the previous-frame input of every frame of its next chunk (B, T, C, h, w); else None."""
        if self.model.dit.previous_embed is None:
            return None
        zeros = torch.zeros(self.sizes.latent_shape, device=self.device, dtype=self.dtype)
        latest = torch.stack([zeros if w.last_latent is None else w.last_latent for w in worlds])  # (B, C, h, w)
        return latest[:, None].expand(-1, self.chunk_frames, -1, -1, -1)

    def _pixels(self, clean: torch.Tensor) -> torch.Tensor:
        """Latents (B, T, C, h, w) -> uint8 frames (B T, H, W, 3) on the device."""
        return self.model.autoencoder.decode(clean.flatten(0, 1).float())

    def _frames(self, pixels: torch.Tensor, worlds: int) -> list[list[np.ndarray]]:
        """uint8 frames (B T, H, W, 3) -> per world its T (H, W, 3) arrays on the host (the copy synchronises)."""
        T, frames = self.chunk_frames, pixels.cpu().numpy()
        return [list(frames[b * T : (b + 1) * T]) for b in range(worlds)]

    def _encode_actions(self, worlds: Sequence[World], actions: Sequence[ChunkActions]) -> torch.Tensor:
        if len(worlds) != len(actions) or not worlds:
            raise ValueError(f"need one action entry per world, got {len(actions)} for {len(worlds)} worlds")
        T = self.chunk_frames
        rows = []
        for world, entry in zip(worlds, actions):
            per_frame = [entry] * T if isinstance(entry, Action) else list(entry)
            if len(per_frame) != T:
                raise ValueError(f"expected 1 or {T} actions per world for a chunk of {T} frames, got {len(per_frame)}")
            encoded, unknown = self.action_space.encode(per_frame)
            world.stats.unknown_keys += unknown
            rows.append(encoded)
        return to_device(torch.stack(rows), self.device, self.dtype)  # (B, T, A)

    def _noise(self, world: World) -> torch.Tensor:
        shape = (self.chunk_frames, *self.sizes.latent_shape)
        return torch.randn(shape, generator=world.generator, device=self.device).to(self.dtype)

    def _attention(
        self,
        worlds: Sequence[World],
        pos: torch.Tensor,
        first_frames: list[int],
        shared: StepSlots,
        write: bool,
        step: int,
        passes: int = 1,
    ) -> CachedAttention:
        caches = [w.cache for w in worlds]
        return CachedAttention(
            self.model.dit.rope, self.policy, caches, pos, first_frames, write, shared, self.sparse, step, passes
        )

    def _pending(
        self, world: World, history: torch.Tensor, actions: torch.Tensor, slots: dict[int, RotatedSlots]
    ) -> PendingCommit:
        """A chunk of `world` that its cache is to receive, history (T, C, h, w) clean, with its actions (T, A) and
        the slots its denoising read ({} for none): re-noised to `sampler.context_noise` (drawn from the world's
        generator now, as the chunk's noise was), and its last frame the previous-frame input of the next chunk."""
        previous = self._previous([world])  # the frame before the chunk, as its denoising passes saw it
        if previous is not None:
            world.last_latent = history[-1]  # the chunk's last frame, before any context noise
        level = self.sampler.context_noise
        if level > 0:
            history = self.sampler.noised(history, self._noise(world), level)
        previous = None if previous is None else previous[0]
        return PendingCommit(history, actions, world.prompt_tokens, previous, world.frame_index, slots)

    def _commit(self, worlds: Sequence[World]) -> _Commit:
        """The commit pass of the worlds' pending chunks, as DiT rows and a writing attention context (the pass
        counts as the step after the last denoising step, for the sparse schedule)."""
        pending = [w.pending for w in worlds]
        assert all(p is not None for p in pending), "every world of a commit pass has a pending chunk"
        first_frames = [p.first_frame for p in pending]
        pos = self.model.dit.positions(to_device(first_frames, self.device), self.chunk_frames)
        shared = StepSlots.of_worlds([p.slots for p in pending])
        for p in pending:
            p.slots = {}  # the commit pass frees them layer by layer as it writes
        attention = self._attention(worlds, pos, first_frames, shared, write=True, step=self.sampler.steps)
        x = torch.stack([p.history for p in pending])  # (B', T, C, h, w)
        previous = None if pending[0].previous is None else torch.stack([p.previous for p in pending])
        prompt = PromptTokens.stack([p.prompt for p in pending])
        actions = torch.stack([p.actions for p in pending])
        return _Commit(x, x.new_full(x.shape[:2], self.sampler.context_noise), actions, prompt, previous, attention)

    def _checked_frames(self, frames: np.ndarray, name: str) -> np.ndarray:
        """`frames` as a uint8 (T, H, W, 3) array of the model's frame size, T a positive multiple of chunk_frames."""
        m, T = self.config.model, self.chunk_frames
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (m.frame_height, m.frame_width, 3):
            expected = f"uint8 (T, {m.frame_height}, {m.frame_width}, 3)"
            raise ValueError(f"{name} must be {expected}, got {frames.shape} {frames.dtype}")
        if len(frames) == 0 or len(frames) % T:
            raise ValueError(f"{name} must hold a positive multiple of chunk_frames={T} frames, got {len(frames)}")
        return frames
