"""Frame autoencoder: RGB uint8 frames <-> latent frames, one frame at a time (no temporal compression).

Each stage halves height and width, so a (H, W, 3) frame becomes a (C, H / 2^stages, W / 2^stages) latent.
Latents are multiplied by `latent_scale` so the diffusion model sees roughly unit variance.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import AutoencoderConfig


def _stage(c_in: int, c_out: int, down: bool) -> nn.Sequential:
    resample = (
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
        if down
        else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1))
    )
    return nn.Sequential(resample, nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU())


class FrameAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.latent_scale = config.latent_scale
        widths = list(config.channels)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1),
            nn.SiLU(),
            *(_stage(c_in, c_out, down=True) for c_in, c_out in zip([widths[0], *widths[:-1]], widths)),
            nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1),
        )
        back = widths[::-1]
        self.decoder = nn.Sequential(
            nn.Conv2d(config.latent_channels, back[0], 3, padding=1),
            nn.SiLU(),
            *(_stage(c_in, c_out, down=False) for c_in, c_out in zip(back, [*back[1:], back[-1]])),
            nn.Conv2d(back[-1], 3, 3, padding=1),
        )

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> latents (B, C, h, w) in the parameters' dtype."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (B, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
        weight = self.encoder[0].weight
        x = frames.to(weight.device).permute(0, 3, 1, 2).to(weight.dtype) / 127.5 - 1.0  # (B, 3, H, W)
        return self.encoder(x) * self.latent_scale

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> frames (B, 3, H, W) in [0, 1], differentiable (for training)."""
        return torch.sigmoid(self.decoder(latents / self.latent_scale))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> uint8 frames (B, H, W, 3) on the latents' device."""
        x = self.decode_float(latents)  # (B, 3, H, W)
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
