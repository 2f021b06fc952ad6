"""Block-sparse attention with a per-key additive bias: the layout object and the torch reference backend.

Both backends (this torch reference and the Triton kernel in `block_sparse_triton.py`) take the same arguments
and compute, for every head and every query block, softmax attention over the key blocks its layout selects:

    q:          (h, N, d) queries, already in block order (a query block is rows [qb * block_q, (qb + 1) * block_q))
    k, v:       (h, S, d) keys and values, already in block order (key block kb is rows [kb * block_k, ...))
    bias:       (h, S) float32 additive logit bias per key (log m of merged cache slots; 0 otherwise)
    layout:     the selected key blocks of every (head, query block), at least one each: a block mask
                (h, QB, KB) bool, and for the Triton kernel the same as lists, kv_blocks (h, QB, KB) int32 holding
                the selected blocks in their first kv_counts[h, qb] entries (the rest is padding, -1) and
                kv_counts (h, QB) int32
    -> out:     (h, N, d) in q's dtype; logits are scaled by 1 / sqrt(d)

N and S need not be multiples of the block sizes: the last blocks are partial and masked. Putting tokens in block
order (sorting by LSH bucket) is the caller's job; the Triton kernel never gathers single queries or keys, only
whole key tiles, and skips the blocks not selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class BlockSparseLayout:
    """Which key blocks each query block of each head attends to (see the module docstring)."""

    mask: torch.Tensor  # (h, QB, KB) bool
    block_q: int
    block_k: int

    @classmethod
    def dense(cls, heads: int, n: int, s: int, block_q: int, block_k: int, device: torch.device) -> BlockSparseLayout:
        qb, kb = -(-n // block_q), -(-s // block_k)
        return cls(torch.ones(heads, qb, kb, dtype=torch.bool, device=device), block_q, block_k)

    @cached_property
    def kv_counts(self) -> torch.Tensor:
        """(h, QB) int32: how many key blocks each query block selects."""
        return self.mask.sum(-1, dtype=torch.int32).contiguous()

    @cached_property
    def kv_blocks(self) -> torch.Tensor:
        """(h, QB, KB) int32: the selected key blocks in increasing order, then padding (-1)."""
        kb = self.mask.shape[-1]
        index = torch.arange(kb, device=self.mask.device, dtype=torch.int32).expand_as(self.mask)
        # sort keys put unselected blocks after the selected ones
        order = torch.where(self.mask, index, index + kb).sort(dim=-1).values
        return torch.where(order < kb, order, torch.full_like(order, -1)).contiguous()

    def token_mask(self, n: int, s: int) -> torch.Tensor:
        """(h, N, S) bool: True where query i attends key j."""
        h, qb, kb = self.mask.shape
        tokens = self.mask[:, :, None, :, None].expand(h, qb, self.block_q, kb, self.block_k)
        return tokens.reshape(h, qb * self.block_q, kb * self.block_k)[:, :n, :s]


def block_sparse_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, layout: BlockSparseLayout
) -> torch.Tensor:
    """Reference backend: attention over every key with the blocks not selected masked out (-inf logits).

    It computes every query-key pair and saves no arithmetic (the Triton kernel is what skips blocks), but on a CPU
    at one frame's queries it is the faster form: gathering each query block's key tiles instead copies the
    selected keys once per query block (docs/engine.md, "Step time on a CPU"). Memory: one (h, N, S) float32 logit bias.
    Computes in float32 (SDPA would round the log m bias to a bf16 mask otherwise).
    """
    n, s = q.shape[1], k.shape[1]
    h, kb, bk = layout.mask.shape[0], layout.mask.shape[2], layout.block_k
    # the (h, N, S) logit bias in one full-size operation: each query row's block row (0 or -inf per key block)
    # plus each key's own bias, the keys padded to whole blocks
    rows = torch.where(layout.mask, 0.0, float("-inf")).repeat_interleave(layout.block_q, dim=1)[:, :n]  # (h, N, KB)
    keys = F.pad(bias.float(), (0, kb * bk - s)).view(h, 1, kb, bk)
    logit_bias = (rows[..., None] + keys).flatten(2)[..., :s]  # (h, N, S)
    # 4D inputs: on the CPU only these reach the fused (flash) kernel
    out = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None], attn_mask=logit_bias[None])
    return out[0].to(q.dtype)
