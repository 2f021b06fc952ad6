"""Prompt encoder: text -> a sequence of prompt token embeddings for cross-attention.

The default is a learned embedding over hashed words: each lowercase word maps to one of `vocab_size` buckets by
a stable hash (BLAKE2b), so no vocabulary file is needed and every word has an embedding. Rare collisions are
the price; a small world model with a handful of theme words does not notice. Any other encoder (a real text
encoder, an image encoder) fits by returning `PromptTokens` from `__call__`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import PromptConfig
from engine.transfer import to_device

PAD_ID = 0
EMPTY_ID = 1  # the single token of an empty prompt, so cross-attention always has a key to attend to
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class PromptTokens:
    """Prompt token embeddings (B, L, D_prompt) and a mask (B, L), True where a token is real."""

    embeddings: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def stack(prompts: list[PromptTokens]) -> PromptTokens:
        """Concatenate single prompts along the batch, padding to the longest."""
        length = max(p.embeddings.shape[1] for p in prompts)
        embeddings, masks = [], []
        for p in prompts:
            pad = length - p.embeddings.shape[1]
            embeddings.append(nn.functional.pad(p.embeddings, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(p.mask, (0, pad), value=False))
        return PromptTokens(torch.cat(embeddings), torch.cat(masks))


def tokenize(text: str, config: PromptConfig) -> list[int]:
    """Words of `text` (lowercase alphanumeric runs, at most `max_tokens`) -> bucket ids in [2, vocab_size)."""
    words = _WORD.findall(text.lower())[: config.max_tokens]
    if not words:
        return [EMPTY_ID]
    buckets = config.vocab_size - 2
    return [2 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % buckets for w in words]


class HashedWordPromptEncoder(nn.Module):
    def __init__(self, config: PromptConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim, padding_idx=PAD_ID)

    def forward(self, texts: list[str]) -> PromptTokens:
        ids = [tokenize(text, self.config) for text in texts]
        length = max(len(row) for row in ids)
        device = self.embedding.weight.device
        padded = to_device([row + [PAD_ID] * (length - len(row)) for row in ids], device)  # (B, L)
        return PromptTokens(self.embedding(padded), padded != PAD_ID)
