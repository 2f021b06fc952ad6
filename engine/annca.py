"""AnnCA: per frame, keep only the prompt tokens some current query meets in an LSH bucket (FAST-AR section 5.3).

For each world and head, a prompt token is kept when its LSH bucket is one that some query of the current chunk
falls into or probes (engine/lsh.py); cross-attention then runs over the kept tokens only. The selection is
redone for every chunk, layer and denoising step, so a token dropped now can come back later. As in AnnSA,
queries and prompt keys are each centred by their own mean (keys over the valid tokens) before hashing; attention
itself is unchanged. When no token is kept for a head, all its valid tokens are (a head must attend to something).
"""

from __future__ import annotations

import torch

from engine.config import AttentionConfig
from engine.lsh import LshHasher


class AnnCASelector:
    def __init__(self, config: AttentionConfig, head_dim: int) -> None:
        # its own hyperplanes: a different seed than AnnSA's, so the two selections are independent
        self.hasher = LshHasher(head_dim, config.lsh_bits, config.lsh_seed + 1)
        self.probes = config.lsh_probes

    def keep(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, N, h, d), prompt keys k (B, L, h, d), mask (B, L) bool -> kept (B, h, L) bool."""
        valid = mask[:, :, None, None].to(k.dtype)  # (B, L, 1, 1)
        mean = (k * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        probed = self.hasher.one_hot(self.hasher.probe(q - q.mean(1, keepdim=True), self.probes))  # (B, N, h, 2^b)
        met = probed.any(dim=1)  # (B, h, 2^bits): buckets some query falls into or probes
        buckets = self.hasher.bucket(k - mean).transpose(1, 2)  # (B, h, L)
        kept = met.gather(-1, buckets) & mask[:, None, :]  # (B, h, L)
        empty = ~kept.any(-1, keepdim=True)  # (B, h, 1)
        return torch.where(empty, mask[:, None, :].expand_as(kept), kept)
