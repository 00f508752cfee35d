"""Naive, materialising attention: the ground truth the kernels and the CPU path are checked against.

It builds the whole probability tensor P [B, H, Nq, Nk] in float64 (by default) and computes every
product of a MapRequest straight from its definition, with pooling done by a dense averaging matrix
built from grid coordinates in numpy. It shares no code with the kernels' token planning on purpose.
Only for small sizes: memory is O(B * H * Nq * Nk).

Shape legend (see attncap.request):
    B   batch                         H   query heads        Hk  key/value heads (GQA: H % Hk == 0)
    Nq  queries                       Nk  keys               D   head dim       Dv  value head dim
    G   heads kept: 1 for "mean", H for "all", len(list) for a list
    Qb  query bins of the query range (Nq_range tokens when unpooled), Kb likewise for keys
    Ks  selected key columns (request.keys)   Qs  selected query rows (request.queries)

Masks follow torch SDPA: a bool attn_mask is True where a query may attend, a float one is added to
the scores; key_padding_mask [B, Nk] is True for keys to keep; is_causal lets query i see keys j <= i
(top-left aligned, also when Nq != Nk). All masks combine. A query with every key masked gets an
all-zero probability row, so zero output and zero products, never NaN.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from attncap.request import MapRequest

PoolSpec = int | Sequence[int] | None


def normalize_pool(grid: Sequence[int] | None, pool: PoolSpec) -> tuple[int, ...] | None:
    """Per-axis pool factors for ``grid``: an int pools the last two axes (h, w) and leaves t alone
    (a 1-D grid pools its only axis); a tuple gives one factor per axis; None means all ones.
    Returns None when there is no grid (a flat, unpooled axis)."""
    if grid is None:
        if pool is not None:
            raise ValueError(f"pool={pool!r} needs a grid for its axis")
        return None
    grid = tuple(int(g) for g in grid)
    if pool is None:
        return (1,) * len(grid)
    if isinstance(pool, int):
        factors = (1,) * max(0, len(grid) - 2) + (pool,) * min(2, len(grid))
    else:
        factors = tuple(int(p) for p in pool)
    if len(factors) != len(grid) or any(f < 1 for f in factors):
        raise ValueError(f"pool={pool!r} does not fit grid {grid}")
    return factors


def pool_matrix(n: int, grid: Sequence[int] | None, pool: PoolSpec,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Averaging matrix A [n, nbins]: A[i, b] = 1 / count_b when token i (row-major on ``grid``) falls
    in bin b, else 0. Bin coordinates are coordinate // factor per axis, ceil(dim / factor) bins per
    axis, flattened row-major. ``x @ A`` averages the last axis of x over the bins."""
    factors = normalize_pool(grid, pool)
    if factors is None:
        return torch.eye(n, dtype=dtype)
    dims = tuple(int(g) for g in grid)
    if math.prod(dims) != n:
        raise ValueError(f"grid {dims} holds {math.prod(dims)} tokens, its range holds {n}")
    nbins = tuple(-(-d // f) for d, f in zip(dims, factors))
    a = np.zeros((n, math.prod(nbins)))
    for i in range(n):
        coord = np.unravel_index(i, dims)
        b = np.ravel_multi_index(tuple(c // f for c, f in zip(coord, factors)), nbins)
        a[i, b] = 1.0
    a /= a.sum(axis=0, keepdims=True)  # every bin holds at least one token
    return torch.from_numpy(a).to(dtype)


def _span(rng: tuple[int, int] | None, n: int, name: str) -> tuple[int, int]:
    start, stop = (0, n) if rng is None else (int(rng[0]), int(rng[1]))
    if not 0 <= start < stop <= n:
        raise ValueError(f"{name}={rng} is not a non-empty segment of 0..{n}")
    return start, stop


def _reduce_heads(x: torch.Tensor, heads) -> torch.Tensor:
    """x [B, H, ...] -> [B, G, ...]."""
    if heads == "mean":
        return x.mean(dim=1, keepdim=True)
    if heads == "all":
        return x
    if isinstance(heads, str):
        raise ValueError(f"heads={heads!r}: give 'mean', 'all' or a list of head indices")
    return x[:, list(heads)]


def probabilities(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, attn_mask=None,
                  is_causal: bool = False, key_padding_mask=None, softcap: float | None = None) -> torch.Tensor:
    """P [B, H, Nq, Nk] for q [B, H, Nq, D], k [B, Hk, Nk, D] (already in the compute dtype).
    softcap: scores become softcap * tanh(scores / softcap) before any mask, as in Gemma 2."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if H % Hk:
        raise ValueError(f"query heads {H} are not a multiple of key heads {Hk}")
    k = k.repeat_interleave(H // Hk, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(B, H, Nq, Nk, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask.to(q.device)
        else:
            s = s + attn_mask.to(device=q.device, dtype=s.dtype)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(q.device, torch.bool)[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))  # exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))  # fully masked row -> 0


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        key_padding_mask: torch.Tensor | None = None, request: MapRequest | None = None,
                        layout: str = "bhsd", dtype: torch.dtype = torch.float64,
                        softcap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output and the products of ``request``, computed naively in ``dtype``.

    q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] for layout "bhsd"; [B, N, H, D] for "bshd",
    and the output [B, Nq, H, Dv] in that case (else [B, H, Nq, Dv]). attn_mask broadcasts to
    [B, H, Nq, Nk]; key_padding_mask is bool [B, Nk]; softcap caps the scores (see probabilities). Products (empty dict when request is None):
        "map" [B, G, Qb, Kb], "tokens" [B, G, Qb, Ks], "rows" [B, G, Qs, Kb],
        "colsum" [B, G, Kb], "entropy" [B, G, Qb], "peak" [B, G, Qb]  (all in ``dtype``)
    """
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout={layout!r}: give 'bhsd' or 'bshd'")
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    p = probabilities(q, k, scale, attn_mask, is_causal, key_padding_mask, softcap)
    out = p @ v.repeat_interleave(H // k.shape[1], dim=1)
    if layout == "bshd":
        out = out.transpose(1, 2)
    if request is None:
        return out, {}

    qs, qe = _span(request.query_range, Nq, "query_range")
    ks, ke = _span(request.key_range, Nk, "key_range")
    a_q = pool_matrix(qe - qs, request.query_grid, request.query_pool, dtype).to(q.device)
    a_k = pool_matrix(ke - ks, request.key_grid, request.key_pool, dtype).to(q.device)
    block = p[:, :, qs:qe, ks:ke]  # [B, H, Nq_range, Nk_range]
    per_head: dict[str, torch.Tensor] = {}
    if request.wants_map:
        per_head["map"] = torch.einsum("qa,bhqk,kc->bhac", a_q, block, a_k)
    if request.keys is not None:
        keys = torch.as_tensor(list(request.keys), dtype=torch.long, device=q.device)
        per_head["tokens"] = torch.einsum("qa,bhqk->bhak", a_q, p[:, :, qs:qe][..., keys])
    if request.queries is not None:
        queries = torch.as_tensor(list(request.queries), dtype=torch.long, device=q.device)
        per_head["rows"] = p[:, :, queries, ks:ke] @ a_k
    for stat in request.stats:
        if stat == "colsum":
            per_head["colsum"] = block.sum(dim=-2) @ a_k
        elif stat == "entropy":
            plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))),
                                torch.zeros_like(p))
            per_head["entropy"] = -plogp.sum(dim=-1)[:, :, qs:qe] @ a_q
        elif stat == "peak":
            per_head["peak"] = p.amax(dim=-1)[:, :, qs:qe] @ a_q
        else:
            raise ValueError(f"unknown stat {stat!r}: give any of 'entropy', 'peak', 'colsum'")
    return out, {name: _reduce_heads(x, request.heads) for name, x in per_head.items()}
