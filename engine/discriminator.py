"""Patch discriminator for the decoder's adversarial fine-tune (`worldserve train`, phase `decoder`).

A decoder trained on the mean squared error alone draws the mean of every texture it cannot place, so its frames
are blurred (docs/training.md). A discriminator that tells the game's frames from decoded ones, patch by patch,
rewards the decoder for drawing plausible texture instead, as the VQGAN and Stable Diffusion autoencoders do. Its
convolutions are spectrally normalised (Miyato et al. 2018) and it trains on the hinge loss (SAGAN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """Frames (B, 3, H, W) in [0, 1] -> one score per overlapping patch (B, 1, H / 4, W / 4): high for the game's,
    low for decoded ones. The receptive field of a score is 22 x 22 pixels, about a third of a 64 x 64 frame."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(3, width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 4 * width, 3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(4 * width, 1, 3, padding=1)),
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames * 2.0 - 1.0)


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: real patches scored above 1, decoded ones below -1."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the decoder: raise the discriminator's scores of its frames."""
    return -fake_scores.mean()
