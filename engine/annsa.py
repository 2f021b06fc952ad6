"""AnnSA: which key blocks each query block attends to, from LSH buckets (FAST-AR section 5.4).

Queries and keys of one head are hashed with random-hyperplane LSH; a query may see a key when the key's bucket
is the query's own or one of its probed buckets (multi-probe, engine/lsh.py, so a query near a hyperplane keeps
its neighbours). To turn that into a *block-sparse* pattern without per-query gathers, tokens are sorted by
bucket, so that keys of one bucket are contiguous and fill whole tiles; a query block then attends to every key
block holding a bucket one of its queries probes.

Queries and keys live in different regions of space (DESIGN.md decision 5), so both are centred before hashing,
each by its own mean (keys over the sortable part). Centring only changes what is hashed, never what attention
computes (measured in tests/engine/test_sparse_attention.py).

The key sequence the planner receives is [always-visible prefix | sortable rest]: the prefix (sink slots and the
current chunk's own tokens) is never sorted and its blocks are always selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import AttentionConfig
from engine.kernels.block_sparse import BlockSparseLayout
from engine.lsh import LshHasher


def _block_buckets(ids: torch.Tensor, block: int, buckets: int, prefix: int = 0) -> torch.Tensor:
    """Which buckets occur in each block of a token sequence: ids (H, L, m) int64, m bucket ids per token, after
    `prefix` tokens holding none -> (H, ceil((prefix + L) / block), buckets) float, 1.0 where a bucket occurs."""
    H, length, m = ids.shape
    blocks = -(-(prefix + length) // block)
    after = blocks * block - prefix - length
    if prefix or after:  # tokens without a bucket point at one extra column, dropped at the end
        none = ids.new_full((H, 1, m), buckets)
        ids = torch.cat((none.expand(H, prefix, m), ids, none.expand(H, after, m)), dim=1)
    hot = ids.new_zeros((H, blocks, buckets + 1), dtype=torch.float32)
    return hot.scatter_(2, ids.view(H, blocks, block * m), 1.0)[..., :buckets]


@dataclass
class SortedKeys:
    """The sortable keys of one world and layer, hashed and sorted once per engine step (the cache is read-only
    until the commit pass): their order (h, R) and the buckets each key block holds, over the whole sequence
    [prefix of `fixed` keys (no buckets: always selected) | sorted keys], as (h, KB, 2^bits) float."""

    order: torch.Tensor
    blocks: torch.Tensor
    fixed: int


class AnnSAPlanner:
    def __init__(self, config: AttentionConfig, head_dim: int, centre: bool = True) -> None:
        self.block_q = config.block_q
        self.block_k = config.block_k
        self.probes = config.lsh_probes
        self.hasher = LshHasher(head_dim, config.lsh_bits, config.lsh_seed)
        self.centre = centre  # off only to measure what centring buys

    def sort_keys(self, rest: torch.Tensor, fixed: int, valid: torch.Tensor | None = None) -> SortedKeys:
        """rest (H, R, d): rotated keys after a prefix of `fixed` always-visible keys; valid (H, R) bool or None:
        which are keys at all (the rest is padding: it sorts last and holds no bucket, so no block is selected for
        it, and the keys' centre is the mean of the valid ones)."""
        if self.centre:
            if valid is None:
                rest = rest - rest.mean(dim=1, keepdim=True)
            else:
                weight = valid[..., None].to(rest.dtype)
                rest = rest - (rest * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
        buckets = self.hasher.bucket(rest)
        if valid is not None:
            buckets = torch.where(valid, buckets, self.hasher.buckets)  # one past the last bucket: dropped below
        ids, order = torch.sort(buckets, dim=1, stable=True)  # (H, R) each
        return SortedKeys(order, _block_buckets(ids[..., None], self.block_k, self.hasher.buckets, fixed), fixed)

    def layout(self, q: torch.Tensor, keys: SortedKeys) -> tuple[torch.Tensor, BlockSparseLayout]:
        """q (P H, N, d) rotated, the queries of P passes over the same keys (H rows each, pass-major: the heads
        of one world, or of several side by side) -> the query order (P H, N) and the layout (P H rows) over sorted
        queries and sorted keys."""
        heads = keys.blocks.shape[0]
        if self.centre:
            q = q - q.mean(dim=1, keepdim=True)
        ids = self.hasher.probe(q, self.probes)  # (P h, N, 1 + probes): own bucket first
        order = torch.sort(ids[..., 0], dim=1, stable=True).indices  # (P h, N)
        ids = torch.take_along_dim(ids, order[..., None], dim=1)  # in query order
        membership = _block_buckets(ids, self.block_q, self.hasher.buckets).unflatten(0, (-1, heads))  # (P, h, QB, 2^b)
        selected = (membership @ keys.blocks.transpose(1, 2)).flatten(0, 1) > 0  # (P h, QB, KB)
        selected[..., : -(-keys.fixed // self.block_k)] = True  # sinks and the current chunk
        return order, BlockSparseLayout(selected, self.block_q, self.block_k)

    def plan(
        self, q: torch.Tensor, k: torch.Tensor, fixed: int
    ) -> tuple[torch.Tensor, torch.Tensor, BlockSparseLayout]:
        """Both steps at once: q (h, N, d), k (h, S, d) with the first `fixed` keys always visible -> the query
        order (h, N), the key order (h, S) (prefix first, unmoved) and the layout."""
        keys = self.sort_keys(k[:, fixed:], fixed)
        q_order, layout = self.layout(q, keys)
        prefix = torch.arange(fixed, device=k.device).expand(k.shape[0], fixed)
        return q_order, torch.cat((prefix, keys.order + fixed), dim=1), layout
