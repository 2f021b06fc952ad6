"""Random-hyperplane LSH (SimHash) with multi-probe.

`bits` hyperplanes drawn once from a seed (shared by every head and layer) split space into 2^bits buckets; a
vector's bucket is its sign pattern read as an integer. A vector lying close to a hyperplane has near neighbours
on the other side, so `probe` also returns the buckets reached by flipping its least confident bits (those with
the smallest |projection|): multi-bucket membership for queries, while keys keep one bucket each. One table with
probes rather than several tables, because AnnSA sorts keys by bucket to make dense tiles and a second table's
buckets are scattered across every tile (measured: 2 tables made the default model's layouts ~100% dense).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LshHasher:
    def __init__(self, dim: int, bits: int, seed: int) -> None:
        self.bits = bits
        generator = torch.Generator().manual_seed(seed)
        # (b, d): one hyperplane normal per row, moved to the data's device
        self._planes = torch.randn(dim, bits, generator=generator).t().contiguous()
        self._weights = 2 ** torch.arange(bits)  # (b,)

    @property
    def buckets(self) -> int:
        return 2**self.bits

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self._planes.device != x.device:
            self._planes, self._weights = self._planes.to(x.device), self._weights.to(x.device)
        return F.linear(x.float(), self._planes)  # (..., b); as a linear, not a broadcast batched matmul (2x faster)

    def bucket(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> bucket id (...,) int64 in [0, 2^bits)."""
        return ((self._project(x) > 0) * self._weights).sum(-1)

    def probe(self, x: torch.Tensor, probes: int) -> torch.Tensor:
        """x (..., d) -> (..., 1 + probes) int64: its bucket, then the buckets one least-confident bit away."""
        projection = self._project(x)
        own = ((projection > 0) * self._weights).sum(-1, keepdim=True)  # (..., 1)
        if probes == 0:
            return own
        shaky = projection.abs().topk(probes, dim=-1, largest=False).indices  # (..., probes)
        return torch.cat((own, own ^ self._weights[shaky]), dim=-1)

    def one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        """Bucket ids (..., m) -> (..., 2^bits) bool: which buckets occur among the m."""
        hot = torch.zeros(*ids.shape[:-1], self.buckets, dtype=torch.bool, device=ids.device)
        return hot.scatter_(-1, ids, True)
