"""World: the state of one generated world (one player or agent session), created by `WorldEngine.new_world`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import RotatedSlots
from engine.kv_cache import WorldCache
from engine.prompt import PromptTokens


@dataclass
class WorldStats:
    frames: int = 0  # frames generated (init frames not counted)
    unknown_keys: int = 0  # key names ignored because the model does not know them
    last_step_ms: float = 0.0  # wall time of the last engine.step call this world took part in (whole batch)
    last_decode_ms: float = 0.0  # of which latent -> RGB (and back, with sampler.reencode) and the copy to the host


@dataclass
class PendingCommit:
    """A world's newest chunk, generated but not yet in its cache: its keys and values are written by the first DiT
    forward of the world's next `step` (beside that step's denoising rows), or by `WorldEngine.flush`.

    history (T, C, h, w) is what the commit pass writes (the denoised latents, or their re-encoding, at the
    context noise); actions (T, A), prompt and previous (T, C, h, w) or None are its conditioning as the chunk's
    denoising saw it; slots, per layer, the rotated cache slots that denoising read, which the commit pass reads
    too (the cache has not changed since)."""

    history: torch.Tensor
    actions: torch.Tensor
    prompt: PromptTokens
    previous: torch.Tensor | None
    first_frame: int
    slots: dict[int, RotatedSlots]


class World:
    """Prompt, KV cache, random generator and frame index of one world. Mutated only by its `WorldEngine`."""

    def __init__(
        self, prompt: str, seed: int, prompt_tokens: PromptTokens, cache: WorldCache, generator: torch.Generator
    ) -> None:
        self.prompt = prompt
        self.seed = seed
        self.prompt_tokens = prompt_tokens  # (1, L, D_prompt)
        self.cache = cache
        self.generator = generator
        self.frame_index = 0  # index of the next frame to generate = frames in this world so far
        self.last_latent: torch.Tensor | None = None  # (C, h, w) of its latest frame, as committed; None: no frame yet
        self.pending: PendingCommit | None = None  # its newest chunk, until the next step or flush writes it
        self.stats = WorldStats()
