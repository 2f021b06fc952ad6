"""WorldModel: the trainable parts of a world model in one module, so one state dict is one checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from engine.actions import ActionSpace
from engine.autoencoder import FrameAutoencoder
from engine.config import WorldConfig
from engine.dit import CausalDiT
from engine.prompt import HashedWordPromptEncoder

# Gain of the seeded random weights: at 1.0 activations shrink layer by layer and the untrained decoder paints a flat
# grey; at 1.35 its frames show visible colour structure (std ~25 of 255) without saturating.
RANDOM_GAIN = 1.35


class WorldModel(nn.Module):
    def __init__(self, config: WorldConfig) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = FrameAutoencoder(config.model.autoencoder)
        self.prompt_encoder = HashedWordPromptEncoder(config.model.prompt)
        self.dit = CausalDiT(config)
        self.action_space = ActionSpace(config.model.actions)

    @torch.no_grad()
    def init_random_(self, seed: int) -> WorldModel:
        """Seeded random weights that do not depend on the global RNG or on module construction order.

        Matrices get N(0, (RANDOM_GAIN / sqrt(fan_in))^2), biases zero, norm scales one: an untrained model whose
        every path (actions, prompt, history) influences the output, unlike the zero-initialised start used for
        training.
        """
        generator = torch.Generator().manual_seed(seed)
        for name, param in sorted(self.named_parameters()):
            if param.ndim >= 2:
                fan_in = param[0].numel()
                values = torch.randn(param.shape, generator=generator) * RANDOM_GAIN / fan_in**0.5
                param.copy_(values.to(param.dtype))
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        return self

    def parameter_count(self) -> dict[str, int]:
        parts = {"autoencoder": self.autoencoder, "prompt_encoder": self.prompt_encoder, "dit": self.dit}
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(counts.values())
        return counts
