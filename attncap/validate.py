"""Checks on attention inputs and requests, all done before any work.

Every error names the argument, what it got and what would work. The byte estimate refuses a
request whose products would not fit, and says which cheaper requests would.

Shape legend: B batch, H query heads, Hk key heads, Nq, Nk, D head dim, Dv value dim.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from .layouts import AxisSpec, as_int, normalize_grid, normalize_pool, pooled_grid
from .request import STATS, MapRequest

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SELECTED_KEYS = 128


@dataclass(frozen=True)
class Shapes:
    B: int
    H: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    Dv: int


@dataclass(frozen=True)
class Plan:
    """A validated request in plain numbers (no tensors): torch.compile traces its making, and
    attncap.ops caches the index tensors of each distinct plan per device."""
    query: AxisSpec                 # query range, pooled by query_pool
    key: AxisSpec                   # key range, pooled by key_pool
    rows: AxisSpec | None           # selected queries
    heads: tuple[tuple[int, ...], ...]  # [G][HPG]: the query heads averaged into output head g
    selected: tuple[int, ...] | None    # selected keys, in the request's order
    want_map: bool
    stats: tuple[str, ...]

    @property
    def groups(self) -> int:
        return len(self.heads)

    def wire(self) -> tuple:
        """The plan as nested tuples of ints, strings and bools (see from_wire)."""
        return (tuple(self.query), tuple(self.key), None if self.rows is None else tuple(self.rows), self.heads,
                self.selected, self.want_map, self.stats)

    @staticmethod
    def from_wire(t: tuple) -> "Plan":
        query, key, rows, heads, selected, want_map, stats = t
        return Plan(AxisSpec(*query), AxisSpec(*key), None if rows is None else AxisSpec(*rows), heads, selected,
                    want_map, stats)


def _as_bhsd(x: torch.Tensor, name: str, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        legend = "[B, H, N, D]" if layout == "bhsd" else "[B, N, H, D]"
        raise ValueError(f"{name} must be 4-D {legend} for layout={layout!r}; got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; attncap supports float16, bfloat16 and float32")
    return x if layout == "bhsd" else x.transpose(1, 2)


def check_tensors(q, k, v, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Shapes]:
    """Return BHSD views of q, k, v (no copies) and their sizes."""
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout must be 'bhsd' ([B, H, N, D], as SDPA) or 'bshd' ([B, N, H, D]); got {layout!r}")
    q, k, v = (_as_bhsd(x, n, layout) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; put q, k and v on one device")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share a dtype")
    # Plain ints (see layouts.as_int): under torch.compile with dynamic shapes the sizes the plans hold
    # are specialised.
    B, H, Nq, D = (operator.index(n) for n in q.shape)
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and keys; got k {tuple(k.shape)}, v {tuple(v.shape)} (BHSD)")
    Hk, Nk = operator.index(k.shape[1]), operator.index(k.shape[2])
    if Hk == 0 or H % Hk:
        raise ValueError(f"q has {H} heads and k has {Hk}: the query heads must be a multiple of the key heads (GQA/MQA)")
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has {D}, k has {k.shape[3]}")
    Dv = operator.index(v.shape[3])
    if not 1 <= D <= MAX_HEAD_DIM or not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be 1 to {MAX_HEAD_DIM}; got q/k {D}, v {Dv}")
    if Nq == 0 or Nk == 0:
        raise ValueError(f"q and k need at least one token; got Nq={Nq}, Nk={Nk}")
    return q, k, v, Shapes(B, H, Hk, Nq, Nk, D, Dv)


def check_masks(attn_mask, key_padding_mask, shapes: Shapes, device: torch.device) -> None:
    """Check the masks' types, shapes and devices (metadata only: nothing is read or copied)."""
    full = (shapes.B, shapes.H, shapes.Nq, shapes.Nk)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
        dims = tuple(attn_mask.shape)
        if len(dims) > 4 or any(d != 1 and d != f for d, f in zip(reversed(dims), reversed(full))):
            raise ValueError(f"attn_mask of shape {dims} does not broadcast to [B, H, Nq, Nk] = {full}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to scores); got {attn_mask.dtype}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, Nk], True = keep")
        if tuple(key_padding_mask.shape) != (shapes.B, shapes.Nk):
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = {(shapes.B, shapes.Nk)}; "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {device}")


def mask_views(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
               full: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
    """The checked masks as the kernels take them: (attn_mask expanded to [B, H, Nq, Nk] (a view:
    broadcast dims get stride 0; bool as uint8), mask kind 0 none / 1 bool / 2 additive,
    key padding uint8 [B, Nk] or None)."""
    mask, kind = None, 0
    if attn_mask is not None:
        mask = attn_mask.expand(full)
        mask, kind = (mask.view(torch.uint8), 1) if attn_mask.dtype == torch.bool else (mask, 2)
    kpm = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    return mask, kind, kpm


def _range(r, n: int, name: str) -> tuple[int, int]:
    if r is None:
        return 0, n
    start, stop = (as_int(x, name) for x in r)
    if not 0 <= start < stop <= n:
        raise ValueError(f"{name}={tuple(r)} must satisfy 0 <= start < stop <= {n}")
    return start, stop


def _indices(idx, n: int, name: str, limit: int | None = None) -> tuple[int, ...]:
    """Indices as a tuple of ints. Give a list: a tensor is read on the host (a sync on CUDA, a
    graph break under torch.compile)."""
    values = tuple(as_int(i, name) for i in (idx.reshape(-1).tolist() if isinstance(idx, torch.Tensor) else idx))
    if not values:
        raise ValueError(f"{name} is empty; give at least one index or None")
    if limit is not None and len(values) > limit:
        raise ValueError(f"{name} holds {len(values)} indices; at most {limit} fit the one-pass kernel. "
                         f"Use key_range with map=True for a wider block of keys")
    if min(values) < 0 or max(values) >= n:
        raise ValueError(f"{name} must lie in [0, {n}); got min {min(values)}, max {max(values)}")
    return values


def _head_groups(heads, H: int) -> tuple[tuple[int, ...], ...]:
    """[G][HPG]: the query heads averaged into each output head."""
    if heads == "mean":
        return (tuple(range(H)),)
    if heads == "all":
        return tuple((h,) for h in range(H))
    if isinstance(heads, str):
        raise ValueError(f"heads must be 'mean', 'all' or a list of head indices; got {heads!r}")
    return tuple((h,) for h in _indices(heads, H, "heads"))


def _axis(rng, grid, pool, n: int, prefix: str) -> AxisSpec:
    start, stop = _range(rng, n, f"{prefix}_range")
    g = normalize_grid(grid, stop - start, f"{prefix}_grid")
    return AxisSpec(start, stop, g, normalize_pool(g, pool, f"{prefix}_pool"))


def product_shapes(plan: Plan, B: int) -> dict[str, tuple[int, ...]]:
    """The shape of each product ``plan`` returns, in the order attncap.attention returns them."""
    G, qb, kb = plan.groups, plan.query.nbins, plan.key.nbins
    shapes: dict[str, tuple[int, ...]] = {}
    if plan.want_map:
        shapes["map"] = (B, G, qb, kb)
    if plan.selected is not None:
        shapes["tokens"] = (B, G, qb, len(plan.selected))
    if plan.rows is not None:
        shapes["rows"] = (B, G, plan.rows.nbins, kb)
    for s in ("entropy", "peak"):
        if s in plan.stats:
            shapes[s] = (B, G, qb)
    if "colsum" in plan.stats:
        shapes["colsum"] = (B, G, kb)
    return shapes


def product_bytes(plan: Plan, shapes: Shapes) -> dict[str, int]:
    """Bytes of each product (float32), plus the per-head workspace of one-pass products."""
    sizes = {name: math.prod(shape) * 4 for name, shape in product_shapes(plan, shapes.B).items()}
    per_head_query = shapes.B * shapes.H * shapes.Nq * 4
    if plan.selected is not None:
        # The forward keeps token columns per head for every query before the head reduction.
        sizes["tokens"] = per_head_query * len(plan.selected)
    for s in ("entropy", "peak"):
        if s in sizes:
            sizes[s] += per_head_query
    return sizes


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_request(request: MapRequest, shapes: Shapes) -> Plan:
    """Validate ``request`` against the call's sizes (pure Python on its fields) and refuse it when its
    products would pass request.max_bytes."""
    if not isinstance(request, MapRequest):
        raise TypeError(f"request must be an attncap.MapRequest or None, got {type(request).__name__}")
    stats = tuple(request.stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"stats={stats}: unknown {unknown}; choose from {STATS}")
    plan = Plan(
        query=_axis(request.query_range, request.query_grid, request.query_pool, shapes.Nq, "query"),
        key=_axis(request.key_range, request.key_grid, request.key_pool, shapes.Nk, "key"),
        rows=None if request.queries is None else AxisSpec(0, shapes.Nq, indices=_indices(request.queries, shapes.Nq,
                                                                                           "queries")),
        heads=_head_groups(request.heads, shapes.H),
        selected=_indices(request.keys, shapes.Nk, "keys", MAX_SELECTED_KEYS) if request.keys is not None else None,
        want_map=request.wants_map,
        stats=stats,
    )
    sizes = product_bytes(plan, shapes)
    total = sum(sizes.values())
    if total > request.max_bytes:
        raise ValueError(_over_budget_message(request, plan, shapes, sizes, total))
    return plan


def _over_budget_message(request: MapRequest, plan: Plan, shapes: Shapes, sizes: dict, total: int) -> str:
    detail = ", ".join(f"{k} {_fmt(v)}" for k, v in sizes.items())
    lines = [f"request would take {_fmt(total)} ({detail}) but max_bytes is {_fmt(request.max_bytes)}."]
    if plan.want_map:
        qb, kb = plan.query.nbins, plan.key.nbins
        lines.append(f"The map alone is [B={shapes.B}, G={plan.groups}, {qb}, {kb}].")
        if plan.groups > 1:
            lines.append(f"heads='mean' would make it {_fmt(shapes.B * qb * kb * 4)}.")
        for prefix, axis in (("query", plan.query), ("key", plan.key)):
            grid = getattr(request, f"{prefix}_grid")
            if grid is not None:
                g = tuple(grid)
                coarse = math.prod(pooled_grid(g, normalize_pool(g, 4, prefix)))
                other = kb if prefix == "query" else qb
                lines.append(f"{prefix}_pool=4 would make it {_fmt(shapes.B * plan.groups * coarse * other * 4)}.")
        lines.append("keys=[...] (token-selected maps), query_range/key_range, or a larger max_bytes also fit.")
    return " ".join(lines)


def selected_union(plans: Sequence[Plan]) -> tuple[int, ...] | None:
    """The sorted distinct keys all requests select: the forward computes their columns once."""
    chosen = sorted(set(k for p in plans if p.selected is not None for k in p.selected))
    if not chosen:
        return None
    if len(chosen) > MAX_SELECTED_KEYS:
        raise ValueError(f"the requests select {len(chosen)} distinct keys together; the one-pass kernel takes "
                         f"at most {MAX_SELECTED_KEYS}: split them over several calls or use key_range with map=True")
    return tuple(chosen)
