"""relations="full": one record per attention call over all its query and key tokens, in sequence order.

This is the map users of transformers' output_attentions expect ([B, G, N, N] for a language model
over its text and image tokens; a joint DiT's whole [text + image] sequence), beside the per-segment
records. It has no grid (pool does not apply) and no token selection; heads and stats apply.

An integration that permutes a call's tokens into contiguous segments (the transformers VLM path)
says so with CallLayout.query_order / key_order: row i of the call is token order[i] of the model's
sequence ([N], or [B, N] per batch element). The products are put back in sequence order here.

Shape legend: B batch, G heads kept, Nq / Nk the call's queries / keys.
"""
from __future__ import annotations

import torch

from .request import MapRequest

FULL = "full"
QUERY_AXIS = {"map": 2, "entropy": 2, "peak": 2}   # product kind -> its query axis
KEY_AXIS = {"map": 3, "colsum": 2}                  # product kind -> its key axis


def full_request(nq: int, nk: int, heads, stats: tuple[str, ...], max_bytes: int) -> MapRequest:
    """The request of a "full" record: every query against every key of the call."""
    return MapRequest(heads=heads, map=True, query_range=(0, nq), key_range=(0, nk), stats=stats,
                      max_bytes=max_bytes)


def _unpermute(x: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """y with y[..., order[i], ...] = x[..., i, ...] along dim (order [N] shared, or [B, N] per batch)."""
    inverse = torch.argsort(order.to(x.device).long(), dim=-1)
    if inverse.dim() == 1:
        return x.index_select(dim, inverse)
    shape = [1] * x.dim()
    shape[0], shape[dim] = inverse.shape
    return torch.take_along_dim(x, inverse.reshape(shape), dim)


def in_sequence_order(kind: str, data: torch.Tensor, query_order: torch.Tensor | None,
                      key_order: torch.Tensor | None) -> torch.Tensor:
    """A "full" product of a permuted call, with its query and key axes back in the model's order."""
    if query_order is not None and kind in QUERY_AXIS:
        data = _unpermute(data, query_order, QUERY_AXIS[kind])
    if key_order is not None and kind in KEY_AXIS:
        data = _unpermute(data, key_order, KEY_AXIS[kind])
    return data
