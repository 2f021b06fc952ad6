"""Few-step rectified-flow sampler (flow matching, Euler steps).

Convention: x_t = (1 - t) x_0 + t eps with t in [0, 1]; the model predicts the velocity v = eps - x_0, so
dx/dt = v and one step from t to t' < t is x <- x + (t' - t) v. Noise levels are spaced evenly in t and then
shifted, t <- shift t / (1 + (shift - 1) t) (SD3's timestep shift; shift 1 leaves them even).

The sampler only runs the loop: it knows nothing of caches, actions or worlds. The caller's `velocity` closes
over them; what the caches hold must not change between its calls (the engine's first call may write the chunk
before, in rows of its own, but before any denoising row reads the cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import SamplerConfig

Velocity = Callable[[torch.Tensor, float, int], torch.Tensor]  # (x, t, step index) -> v, same shape as x


class FlowSampler:
    def __init__(self, config: SamplerConfig) -> None:
        self.steps = config.steps
        self.shift = config.shift
        self.context_noise = config.context_noise
        self.guidance = config.guidance
        self.action_guidance = config.action_guidance

    def timesteps(self) -> list[float]:
        """steps + 1 noise levels from 1.0 down to 0.0."""
        even = [1.0 - i / self.steps for i in range(self.steps + 1)]
        return [self.shift * t / (1.0 + (self.shift - 1.0) * t) for t in even]

    def sample(self, velocity: Velocity, noise: torch.Tensor) -> torch.Tensor:
        """Integrate from pure noise (t = 1) to a clean sample (t = 0)."""
        x = noise
        levels = self.timesteps()
        for step, (t, t_next) in enumerate(zip(levels[:-1], levels[1:])):
            x = x + (t_next - t) * velocity(x, t, step)
        return x

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """x_t for a clean sample and its noise."""
        return (1.0 - t) * clean + t * noise
