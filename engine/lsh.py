"""Random-hyperplane LSH (SimHash): vectors at a small angle share a bucket with high probability.

`tables` independent tables of `bits` hyperplanes each; a vector's bucket in a table is its sign pattern read as
an integer in [0, 2^bits). The hyperplanes are drawn once from a seed and shared by every head and layer.
"""

from __future__ import annotations

import torch


class LshHasher:
    def __init__(self, dim: int, bits: int, tables: int, seed: int) -> None:
        self.bits = bits
        self.tables = tables
        generator = torch.Generator().manual_seed(seed)
        self._planes = torch.randn(dim, tables * bits, generator=generator)  # (d, T b), moved to the data's device
        self._weights = 2 ** torch.arange(bits)  # (b,)

    @property
    def buckets_per_table(self) -> int:
        return 2**self.bits

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> bucket ids (..., T) int64 in [0, 2^bits)."""
        if self._planes.device != x.device:
            self._planes, self._weights = self._planes.to(x.device), self._weights.to(x.device)
        signs = (x.float() @ self._planes) > 0  # (..., T b)
        return (signs.unflatten(-1, (self.tables, self.bits)) * self._weights).sum(-1)

    def membership(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> one-hot (..., T * 2^bits) bool: the (table, bucket) pairs each vector falls into."""
        ids = self.buckets(x) + torch.arange(self.tables, device=x.device) * self.buckets_per_table  # (..., T)
        hot = torch.zeros(*ids.shape[:-1], self.tables * self.buckets_per_table, dtype=torch.bool, device=x.device)
        return hot.scatter_(-1, ids, True)
