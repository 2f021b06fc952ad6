"""Block-sparse attention with a per-key additive bias: the layout object and the torch reference backend.

Both backends (this torch reference and the Triton kernel in `block_sparse_triton.py`) take the same arguments
and compute, for every head and every query block, softmax attention over the key blocks its layout lists:

    q:          (h, N, d) queries, already in block order (a query block is rows [qb * block_q, (qb + 1) * block_q))
    k, v:       (h, S, d) keys and values, already in block order (key block kb is rows [kb * block_k, ...))
    bias:       (h, S) float32 additive logit bias per key (log m of merged cache slots; 0 otherwise)
    kv_blocks:  (h, QB, KB) int32, per (head, query block) the key blocks to attend to in its first
                kv_counts[h, qb] entries; the rest is padding (ignored, by convention -1)
    kv_counts:  (h, QB) int32, at least 1 everywhere
    -> out:     (h, N, d) in q's dtype; logits are scaled by 1 / sqrt(d)

N and S need not be multiples of the block sizes: the last blocks are partial and masked. Putting tokens in block
order (sorting by LSH bucket) is the caller's job; the kernels never gather single queries or keys, only whole
key tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BlockSparseLayout:
    """Which key blocks each query block of each head attends to (see the module docstring)."""

    kv_blocks: torch.Tensor  # (h, QB, KB) int32, padded with -1
    kv_counts: torch.Tensor  # (h, QB) int32
    block_q: int
    block_k: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_q: int, block_k: int) -> BlockSparseLayout:
        """From a block mask (h, QB, KB) bool: selected blocks listed in increasing order."""
        counts = mask.sum(-1, dtype=torch.int32)  # (h, QB)
        kb = mask.shape[-1]
        index = torch.arange(kb, device=mask.device, dtype=torch.int32).expand_as(mask)
        # selected block indices first (ascending), padding after: sort keys put unselected blocks at the end
        order = torch.where(mask, index, index + kb).sort(dim=-1).values
        blocks = torch.where(order < kb, order, torch.full_like(order, -1))
        return cls(blocks.contiguous(), counts.contiguous(), block_q, block_k)

    @classmethod
    def dense(cls, heads: int, n: int, s: int, block_q: int, block_k: int, device: torch.device) -> BlockSparseLayout:
        qb, kb = -(-n // block_q), -(-s // block_k)
        return cls.from_mask(torch.ones(heads, qb, kb, dtype=torch.bool, device=device), block_q, block_k)

    def token_mask(self, n: int, s: int) -> torch.Tensor:
        """(h, N, S) bool: True where query i attends key j (for tests and density/recall measurement)."""
        h, qb, kb_total = self.kv_blocks.shape
        kb = -(-s // self.block_k)
        valid = torch.arange(kb_total, device=self.kv_blocks.device) < self.kv_counts[..., None]  # (h, QB, KB)
        block_mask = torch.zeros(h, qb, kb + 1, dtype=torch.bool, device=self.kv_blocks.device)
        block_mask.scatter_(-1, torch.where(valid, self.kv_blocks.long(), kb), True)
        block_mask = block_mask[..., :kb]
        rows = block_mask.repeat_interleave(self.block_q, dim=1)[:, :n]
        return rows.repeat_interleave(self.block_k, dim=2)[..., :s]


def block_sparse_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, layout: BlockSparseLayout
) -> torch.Tensor:
    """Reference backend: gathers each query block's key tiles and runs softmax attention over them.

    Work and memory scale with the largest number of blocks any query block selects, not with S. Reads
    kv_counts.max() on the host to size the gather (free on the CPU; one synchronisation on a GPU, where the Triton
    kernel is the fast path). Computes in float32 (SDPA would round the log m bias to a bf16 mask otherwise).
    """
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    h, n, d = q.shape
    s = k.shape[1]
    bq, bk = layout.block_q, layout.block_k
    qb = -(-n // bq)
    most = int(layout.kv_counts.max())
    blocks = layout.kv_blocks[..., :most].long()  # (h, QB, M)
    listed = torch.arange(most, device=q.device) < layout.kv_counts[..., None]  # (h, QB, M)
    keys = blocks.clamp(min=0)[..., None] * bk + torch.arange(bk, device=q.device)  # (h, QB, M, bk)
    usable = listed[..., None] & (keys < s)
    # whole key tiles, fetched with one index_select per tensor over the flattened (h S, d) rows
    rows = (keys.clamp(max=s - 1) + torch.arange(h, device=q.device)[:, None, None, None] * s).flatten()
    k_tiles = k.reshape(h * s, d).index_select(0, rows).view(h, qb, most * bk, d)
    v_tiles = v.reshape(h * s, d).index_select(0, rows).view(h, qb, most * bk, d)
    b_tiles = bias.float().reshape(h * s).index_select(0, rows).view(h, qb, most * bk)
    b_tiles = b_tiles.masked_fill(~usable.reshape(h, qb, most * bk), float("-inf"))
    q_blocks = F.pad(q, (0, 0, 0, qb * bq - n)).reshape(h, qb, bq, d)
    out = F.scaled_dot_product_attention(q_blocks, k_tiles, v_tiles, attn_mask=b_tiles[:, :, None, :])
    return out.reshape(h, qb * bq, d)[:, :n].to(dtype)
