"""The demo model's text encoder: token + position embeddings and a few pre-norm transformer layers.

Shape legend: B batch, L tokens (the tokenizer's MAX_LENGTH), D hidden_size.

Padding positions come out as exact zeros. In the UNet's cross-attention (projections without
bias) a zero key has logit 0 and a zero value adds nothing, so padding keys are a content-free
"look nowhere" sink: whatever the image learns from the prompt it must read from the word keys,
which is what makes the word maps meaningful. An all-padding prompt (the unconditional branch of
classifier-free guidance, the caption dropped in training) encodes to all zeros.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Explicit softmax (not SDPA): no capture hook ever mistakes the text encoder for the denoiser.
        s = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        s = s.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        x = x + self.proj((s @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """input_ids int64 [B, L] (+ attention_mask [B, L], 1 = word) -> float32 [B, L, D], zeros on padding."""

    @register_to_config
    def __init__(self, vocab_size: int = 14, max_length: int = 16, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, pad_token_id: int = 0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        self.layers = nn.ModuleList(_Layer(hidden_size, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {list(input_ids.shape)}")
        b, n = input_ids.shape
        if n > self.config.max_length:
            raise ValueError(f"input_ids has {n} tokens; this encoder takes at most {self.config.max_length}")
        valid = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        pos = torch.arange(n, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(pos)[None]
        # Every query may see itself, so an all-padding row never softmaxes over nothing.
        mask = valid[:, None, :] | torch.eye(n, dtype=torch.bool, device=x.device)[None]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        return x * valid[..., None].to(x.dtype)
