"""A small part-based diffusion transformer (random weights) for examples/part_dit.py.

Modelled on 3D part-generation models such as PartCrafter: the latent is a set of parts, each a
t x h x w grid of tokens with a part embedding added; every block runs
    local attention   within each part (the parts folded into the batch), F.scaled_dot_product_attention
    global attention  jointly over [part0 tokens, part1 tokens, ..., text tokens], with
                      scaled_dot_product_attention imported by name, as research code often does
and an MLP, all modulated by the timestep. Nothing here knows about attncap.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, by_name: bool):
        super().__init__()
        self.heads, self.by_name = heads, by_name
        self.qkv = nn.Linear(dim, 3 * dim)
        nn.init.normal_(self.qkv.weight, std=dim ** -0.25 / 2)  # peakier than the default init: visible structure
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        sdpa = scaled_dot_product_attention if self.by_name else F.scaled_dot_product_attention
        o = sdpa(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class PartBlock(nn.Module):
    def __init__(self, dim: int, heads: int, parts: int, part_tokens: int):
        super().__init__()
        self.parts, self.part_tokens = parts, part_tokens
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.local_attn = SelfAttention(dim, heads, by_name=False)
        self.global_attn = SelfAttention(dim, heads, by_name=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        g1, g2, g3 = (1 + self.modulation(temb)[:, None]).chunk(3, dim=-1)
        b, _, d = x.shape
        n_parts = self.parts * self.part_tokens
        parts, text = x[:, :n_parts], x[:, n_parts:]
        local = self.local_attn(self.norm1(parts).reshape(b * self.parts, self.part_tokens, d))
        x = x + g1 * torch.cat([local.reshape(b, n_parts, d), torch.zeros_like(text)], 1)
        x = x + g2 * self.global_attn(self.norm2(x))
        return x + g3 * self.mlp(self.norm3(x))


class PartDiT(nn.Module):
    """Denoiser over `parts` latent grids of `grid` tokens plus `text` condition tokens."""

    def __init__(self, parts: int = 3, grid: tuple[int, int, int] = (4, 4, 4), text_dim: int = 24, dim: int = 64,
                 heads: int = 4, depth: int = 2, latent_dim: int = 8):
        super().__init__()
        self.parts, self.grid = parts, grid
        self.part_tokens = math.prod(grid)
        self.latent_in = nn.Linear(latent_dim, dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.part_embed = nn.Parameter(torch.randn(parts, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.part_tokens, dim))
        self.t_mlp = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([PartBlock(dim, heads, parts, self.part_tokens) for _ in range(depth)])
        self.latent_out = nn.Linear(dim, latent_dim)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """latents [B, parts, t*h*w, latent_dim], text [B, T, text_dim], t [B] -> predicted noise like latents."""
        b = latents.shape[0]
        parts = self.latent_in(latents) + self.part_embed + self.pos_embed  # [B, P, L, dim]
        x = torch.cat([parts.reshape(b, -1, parts.shape[-1]), self.text_in(text)], 1)
        temb = self.t_mlp(t.reshape(b, 1).float())
        for blk in self.blocks:
            x = blk(x, temb)
        n_parts = self.parts * self.part_tokens
        return self.latent_out(x[:, :n_parts]).reshape(latents.shape)
