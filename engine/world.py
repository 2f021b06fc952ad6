"""World: the state of one generated world (one player or agent session), created by `WorldEngine.new_world`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import WorldCache
from engine.prompt import PromptTokens


@dataclass
class WorldStats:
    frames: int = 0  # frames generated (init frames not counted)
    unknown_keys: int = 0  # key names ignored because the model does not know them
    last_step_ms: float = 0.0  # wall time of the last engine.step call this world took part in (whole batch)
    last_decode_ms: float = 0.0  # of which latent -> RGB (and back, with sampler.reencode) and the copy to the host


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
        self.stats = WorldStats()
