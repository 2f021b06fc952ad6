"""The decoder's patch discriminator (engine/discriminator.py): its shapes and that it learns sharp from blurred."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.discriminator import PatchDiscriminator, discriminator_loss, generator_loss


def test_one_score_per_patch():
    scores = PatchDiscriminator(width=8)(torch.rand(2, 3, 64, 64))
    assert scores.shape == (2, 1, 16, 16)


def test_hinge_losses():
    high, low = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert float(discriminator_loss(high, low)) == 0.0  # both beyond the margin
    assert float(discriminator_loss(low, high)) == 6.0  # 3 + 3
    assert float(generator_loss(low)) == 2.0 and float(generator_loss(high)) == -2.0


def test_it_learns_to_score_sharp_frames_above_blurred_ones():
    torch.manual_seed(0)
    critic = PatchDiscriminator(width=8)
    optimizer = torch.optim.Adam(critic.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        sharp = (torch.rand(8, 3, 16, 16) > 0.5).float()  # texture
        blurred = F.avg_pool2d(F.pad(sharp, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # its local mean
        return sharp, blurred

    for _ in range(60):
        sharp, blurred = batch()
        loss = discriminator_loss(critic(sharp), critic(blurred))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sharp, blurred = batch()
    with torch.no_grad():
        assert critic(sharp).mean() > critic(blurred).mean() + 0.5
