"""KV cache storage: fixed-capacity slot buffers per layer, and the per-world set of them.

A *slot* holds one cached token of one layer, shared by all heads: its pre-rotary key and its value per head,
the position (t, y, x) of its newest member, a count m of the tokens merged into it (1 unless a merging policy
merged several), and the frame index at which it was last written. Attention adds log m to the slot's logit
(FAST-AR Lemma 5.1), so a slot with mean value and count m stands for m identical keys exactly.

This module only stores. Which slots exist (append, overwrite, merge, evict) and which slots a query sees is the
job of a `CachePolicy` (engine/policies.py); how attention is computed is the job of engine/attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVView:
    """The slots a query may attend to; positions travel with them, so order does not matter, except that the
    first `sinks` slots are the attention-sink frames (always visible to sparse attention).

    key, value: (S, h, d) pre-rotary keys and values; pos: (S, 3) int32 (t, y, x);
    bias: (S,) float32 additive logit bias (log m), or None when every count is 1.
    """

    key: torch.Tensor
    value: torch.Tensor
    pos: torch.Tensor
    bias: torch.Tensor | None
    sinks: int = 0


class LayerCache:
    """Preallocated slot buffers of one layer of one world; slots [0, length) are in use."""

    def __init__(self, heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.key = torch.zeros(capacity, heads, head_dim, dtype=dtype, device=device)
        self.value = torch.zeros(capacity, heads, head_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(capacity, 3, dtype=torch.int32, device=device)
        self.count = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.frame = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.length = 0
        self.merged = False  # True once any slot holds more than one token: attention then needs the log m bias
        self.merges = 0  # tokens merged into an existing slot, since creation
        self.evictions = 0  # slots evicted to make room, since creation
        self.recent: torch.Tensor | None = None  # slots the latest merged frame's tokens went to (tempcache's state)

    @property
    def capacity(self) -> int:
        return self.key.shape[0]

    def reserve(self, slots: int, grow: int) -> None:
        """Make room for `slots` slots in total, growing by at least `grow` slots at once (one copy per growth)."""
        if slots <= self.capacity:
            return
        capacity = max(slots, self.capacity + grow)
        for name in ("key", "value", "pos", "count", "frame"):
            old = getattr(self, name)
            new = old.new_zeros((capacity, *old.shape[1:]))
            new[: self.length] = old[: self.length]
            setattr(self, name, new)

    def write(self, start: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Write N fresh slots (count 1) at [start, start + N): key, value (N, h, d); pos (N, 3)."""
        end = start + key.shape[0]
        assert end <= self.capacity, f"write past capacity ({end} > {self.capacity})"
        self.key[start:end] = key
        self.value[start:end] = value
        self.pos[start:end] = pos
        self.count[start:end] = 1.0
        self.frame[start:end] = pos[:, 0].to(torch.int64)
        self.length = max(self.length, end)

    def write_at(self, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Write fresh slots (count 1) at reserved indices `slots` (u,) < length: key, value (u, h, d); pos (u, 3)."""
        self.key[slots] = key
        self.value[slots] = value
        self.pos[slots] = pos
        self.count[slots] = 1.0
        self.frame[slots] = pos[:, 0].to(torch.int64)

    def merge(self, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge one new token into each of `slots` (u,), distinct: newest key and position, running mean value."""
        count = self.count[slots]  # (u,)
        mean = (self.value[slots].float() * count[:, None, None] + value.float()) / (count[:, None, None] + 1)
        self.value[slots] = mean.to(self.value.dtype)
        self.key[slots] = key
        self.pos[slots] = pos
        self.count[slots] = count + 1
        self.frame[slots] = pos[:, 0].to(torch.int64)
        self.merged = True
        self.merges += slots.numel()

    def evict(self, slots: torch.Tensor) -> None:
        """Mark `slots` as evicted; the caller overwrites them with `write_at`."""
        self.evictions += slots.numel()

    def view(self, sinks: int = 0) -> KVView:
        """All slots in use; the first `sinks` of them are sink slots."""
        n = self.length
        bias = self.count[:n].log() if self.merged else None
        return KVView(self.key[:n], self.value[:n], self.pos[:n], bias, min(sinks, n))

    @property
    def nbytes(self) -> int:
        """Bytes allocated by this layer's buffers (not only the slots in use)."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.pos, self.count, self.frame))


class WorldCache:
    """The KV cache of one world: one `LayerCache` per transformer block."""

    def __init__(
        self, depth: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.layers = [LayerCache(heads, head_dim, capacity, dtype, device) for _ in range(depth)]

    def tokens_per_layer(self) -> list[int]:
        return [layer.length for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def stats(self) -> dict[str, list]:
        """Per layer: slots in use, merges and evictions so far, mean tokens per slot."""
        return {
            "slots": self.tokens_per_layer(),
            "merges": [layer.merges for layer in self.layers],
            "evictions": [layer.evictions for layer in self.layers],
            "mean_count": [
                round(float(layer.count[: layer.length].mean()), 4) if layer.length else 0.0 for layer in self.layers
            ],
        }
