"""Catch torch.nn.functional.scaled_dot_product_attention however it was imported.

A TorchFunctionMode sees the call whether the caller wrote F.scaled_dot_product_attention,
imported the function by name, or reached it through diffusers' dispatch_attention_fn. The
handler returns the attention output, or None to let the original SDPA run.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

SDPA = torch._C._nn.scaled_dot_product_attention
Handler = Callable[..., "torch.Tensor | None"]


class _SDPAMode(TorchFunctionMode):
    def __init__(self, handler: Handler):
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            out = self.handler(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextmanager
def intercept_sdpa(handler: Handler) -> Iterator[None]:
    """Inside the block, every SDPA call goes to handler(query, key, value, attn_mask=None,
    dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) first."""
    with _SDPAMode(handler):
        yield
