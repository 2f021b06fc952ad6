"""CausalDiT: the action-conditioned, frame-causal diffusion transformer that predicts flow velocity.

Per frame, latents (C, h, w) are cut into p x p patches -> n = (h/p)(w/p) tokens of width D. Each block:

    x += gate1 * SelfAttn(adaLN(x))          frame-causal, over the KV cache; 3D RoPE at attention time
    x += CrossAttn(LN(x), prompt tokens)     prompt tokens projected to D
    x += gate2 * MLP(adaLN(x))

adaLN-zero modulation comes from the per-frame conditioning c = embed(timestep) + embed(action), so each frame's
action steers only that frame's tokens. Queries and keys are RMS-normalised per head (qk-norm) before rotation,
which keeps attention logits bounded and makes cached keys comparable by cosine similarity.

The model never touches a cache: attention goes through an attention context (engine/attention.py) that decides
what each query sees. Shapes: B worlds, T frames, n tokens per frame, N = T n, D width, h heads, d head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionContext, SequenceAttention, causal_mask
from engine.config import WorldConfig
from engine.prompt import PromptTokens
from engine.rope import Rope3D


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of noise levels t in [0, 1] (any shape) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@dataclass
class PromptKeys:
    """A prompt as the blocks' cross-attention reads it: per block, its normalised keys and values (B, L, h, d)
    each, and the mask (B, L), True where a token is real. The same for every frame and every denoising step of a
    world, so the engine computes them once per step (`CausalDiT.prompt_keys`) and every forward of the step reads
    them."""

    keys: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    def head(self, rows: int) -> PromptKeys:
        """The first `rows` rows of the batch."""
        return PromptKeys([(k[:rows], v[:rows]) for k, v in self.keys], self.mask[:rows])


class DiTBlock(nn.Module):
    def __init__(self, index: int, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.index = index
        self.heads = heads
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.cross_k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.cross_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def prompt_keys(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected prompt tokens (B, L, D) -> this block's cross-attention keys (normalised) and values."""
        B, L, D = prompt.shape
        k, v = self.cross_kv(prompt).reshape(B, L, 2, self.heads, D // self.heads).unbind(2)  # (B, L, h, d) each
        return self.cross_k_norm(k), v

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        prompt_mask: torch.Tensor,
        attention: AttentionContext,
        attention_only: bool = False,
    ) -> torch.Tensor | None:
        """x (B, T, n, D); cond (B, T, D); prompt keys and values (B, L, h, d); prompt_mask (B, L) -> (B, T, n, D).
        With `attention_only` the block stops after its self-attention has been handed its keys and values (a
        writing attention context stores them) and returns None."""
        B, T, n, D = x.shape
        h = self.heads
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, :, None].chunk(6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).reshape(B, T * n, 3, h, D // h)
        q, k = self._qk_norm(qkv[:, :, :2]).unbind(2)  # (B, N, h, d) each
        attended = attention.self_attention(self.index, q, k, qkv[:, :, 2])  # (B, N, h, d)
        if attention_only:
            return None
        x = x + gate1 * self.proj(attended.reshape(B, T, n, D))

        q = self.cross_q(self.norm_cross(x)).reshape(B, T * n, h, D // h)
        crossed = attention.cross_attention(self.index, self.cross_q_norm(q), *prompt, prompt_mask)
        x = x + self.cross_proj(crossed.reshape(B, T, n, D))

        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm and k_norm of qk (..., 2, h, d) in one normalisation (the same as each applied on its own)."""
        assert self.q_norm.eps == self.k_norm.eps
        weight = torch.stack((self.q_norm.weight, self.k_norm.weight))[:, None]  # (2, 1, d)
        return F.rms_norm(qk, qk.shape[-1:], eps=self.q_norm.eps) * weight


class CausalDiT(nn.Module):
    def __init__(self, config: WorldConfig) -> None:
        super().__init__()
        m = config.model
        sizes = config.sizes()
        self.patch = m.patch_size
        self.grid = sizes.token_grid
        self.chunk_frames = m.chunk_frames
        patch_features = sizes.latent_shape[0] * m.patch_size**2
        self.patch_embed = nn.Linear(patch_features, m.dim)
        # the previous frame's latent, patch for patch: a frame is mostly the one before it, moved
        self.previous_embed = nn.Linear(patch_features, m.dim) if m.previous_frame_input else None
        self.time_embed = nn.Sequential(nn.Linear(256, m.dim), nn.SiLU(), nn.Linear(m.dim, m.dim))
        self.action_embed = nn.Sequential(nn.Linear(sizes.action_dim, m.dim), nn.SiLU(), nn.Linear(m.dim, m.dim))
        self.prompt_proj = nn.Linear(m.prompt.dim, m.dim)
        self.blocks = nn.ModuleList(DiTBlock(i, m.dim, m.heads, m.mlp_ratio) for i in range(m.depth))
        self.final_norm = nn.LayerNorm(m.dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(m.dim, 2 * m.dim))
        self.final = nn.Linear(m.dim, patch_features)
        self.rope = Rope3D(m.head_dim, m.rope_theta)

    def positions(self, first_frames: torch.Tensor, frames: int) -> torch.Tensor:
        """(t, y, x) of every token of `frames` frames per world starting at first_frames (B,) -> (B, N, 3) int32."""
        times = first_frames[:, None] + torch.arange(frames, device=first_frames.device)  # (B, T)
        return self.positions_at(times)

    def positions_at(self, times: torch.Tensor) -> torch.Tensor:
        """(t, y, x) of every token of frames at frame indices `times` (B, T) -> (B, T n, 3) int32."""
        gh, gw = self.grid
        B, T = times.shape
        t = times[:, :, None, None].expand(B, T, gh, gw)
        y = torch.arange(gh, device=times.device)[None, None, :, None].expand(B, T, gh, gw)
        x = torch.arange(gw, device=times.device)[None, None, None, :].expand(B, T, gh, gw)
        return torch.stack((t, y, x), dim=-1).reshape(B, T * gh * gw, 3).to(torch.int32)

    def sequence_attention(self, batch: int, frames: int, device: torch.device) -> SequenceAttention:
        """The uncached frame-causal context for sequences of `frames` frames starting at frame 0."""
        pos = self.positions(torch.zeros(batch, dtype=torch.int64, device=device), frames)
        frame_of_token = torch.arange(frames, device=device).repeat_interleave(self.grid[0] * self.grid[1])
        return SequenceAttention(self.rope, pos, causal_mask(frame_of_token // self.chunk_frames))

    def prompt_keys(self, prompt: PromptTokens) -> PromptKeys:
        """Every block's cross-attention keys and values of prompt embeddings (B, L, D_prompt)."""
        projected = self.prompt_proj(prompt.embeddings.to(self.prompt_proj.weight.dtype))  # (B, L, D)
        return PromptKeys([block.prompt_keys(projected) for block in self.blocks], prompt.mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        prompt: PromptTokens | PromptKeys,
        attention: AttentionContext | None = None,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity (noise - clean) of latents x (B, T, C, h, w) at noise levels t (B, T).

        actions (B, T, A); prompt embeddings (B, L, D_prompt), or their keys from `prompt_keys`. Without an
        attention context the whole sequence is processed uncached and frame-causal (chunked by `chunk_frames`).
        With `model.previous_frame_input`, `previous` (B, T, C, h, w) is the latent of the frame before each frame
        (None: zeros, a first frame).
        """
        B, T, C, H, W = x.shape
        p, (gh, gw) = self.patch, self.grid
        if attention is None:
            attention = self.sequence_attention(B, T, x.device)
        tokens, cond, keys = self._inputs(x, t, actions, prompt, previous)
        for block, block_keys in zip(self.blocks, keys.keys):
            tokens = block(tokens, cond, block_keys, keys.mask, attention)
        shift, scale = self.final_modulation(cond)[:, :, None].chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))  # (B, T, n, C p p)
        out = out.reshape(B, T, gh, gw, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # (B, T, C, gh, p, gw, p)
        return out.reshape(B, T, C, H, W)

    def write_keys(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        prompt: PromptTokens | PromptKeys,
        attention: AttentionContext,
        previous: torch.Tensor | None = None,
    ) -> None:
        """Hand every block's self-attention keys and values of latents x to a writing attention context (the
        engine's commit pass), with the arguments of `forward`, and compute nothing the velocity alone needs: the
        last block stops after its self-attention, and the output layer does not run."""
        tokens, cond, keys = self._inputs(x, t, actions, prompt, previous)
        last = len(self.blocks) - 1
        for i, (block, block_keys) in enumerate(zip(self.blocks, keys.keys)):
            tokens = block(tokens, cond, block_keys, keys.mask, attention, attention_only=i == last)

    def _inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        prompt: PromptTokens | PromptKeys,
        previous: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, PromptKeys]:
        """The blocks' inputs: tokens (B, T, n, D), per-frame conditioning (B, T, D) and the prompt's keys."""
        tokens = self.patch_embed(self._patches(x))  # (B, T, n, D)
        if self.previous_embed is not None and previous is not None:
            tokens = tokens + self.previous_embed(self._patches(previous.to(x.dtype)))
        cond = self.time_embed(timestep_embedding(t, 256).to(x.dtype)) + self.action_embed(actions.to(x.dtype))
        keys = self.prompt_keys(prompt) if isinstance(prompt, PromptTokens) else prompt
        return tokens, cond, keys

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, T, C, h, w) -> (B, T, n, C p p), token by token."""
        B, T, C = x.shape[:3]
        p, (gh, gw) = self.patch, self.grid
        patches = x.reshape(B, T, C, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6)  # (B, T, gh, gw, C, p, p)
        return patches.reshape(B, T, gh * gw, C * p * p)

    def zero_init_(self) -> None:
        """DiT's adaLN-zero start for training: every residual branch and the output begin at zero, and so does
        the previous-frame input, so that a model given it starts as the same model without it."""
        if self.previous_embed is not None:
            nn.init.zeros_(self.previous_embed.weight)
            nn.init.zeros_(self.previous_embed.bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
