"""attncap.attention: the kernel-level entry point.

Validates everything first, then runs the forward (output, LSE and one-pass products) and, when a
product needs it, the map pass from the LSE. On CUDA both run as Triton kernels; on CPU they run
as chunked PyTorch (attncap.cpu_path) unless backend="triton" asks for the kernels, which on CPU
needs TRITON_INTERPRET=1 (for tests).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

import torch

from . import cpu_path
from .layouts import AxisPlan, plan_range
from .request import MapRequest
from .validate import MAX_SELECTED_KEYS, Plan, check_masks, check_request, check_tensors

BACKENDS = ("auto", "triton", "torch")


def _backend(name: str, device: torch.device) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    use_triton = name == "triton" or (name == "auto" and device.type == "cuda")
    if not use_triton:
        return cpu_path
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before attncap is imported; "
                         "use backend='torch' (the chunked CPU path) or move the tensors to CUDA")
    from . import kernels
    return kernels


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              attn_mask: torch.Tensor | None = None, is_causal: bool = False,
              request: MapRequest | Sequence[MapRequest] | None = None, *,
              key_padding_mask: torch.Tensor | None = None, layout: str = "bhsd",
              backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]]:
    """Scaled dot-product attention that also returns reductions of its probabilities.

    Shapes (layout="bhsd", as torch SDPA; layout="bshd" swaps H and N in every tensor):
        q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv]; H % Hk == 0 (GQA/MQA).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to [B, H, Nq, Nk].
        key_padding_mask: bool [B, Nk], True = keep.   is_causal: query i sees keys j <= i (top-left).
    Returns (out [B, H, Nq, Dv] in q's dtype and layout, products): products is {} without a
    request, else the float32 tensors described in attncap.request (map, tokens, rows, colsum,
    entropy, peak). A list of requests (several relations of one joint sequence) shares one
    forward and returns a list of product dicts. A query with every key masked gets zeros in out
    and products, never NaN.
    """
    q4, k4, v4, shapes = check_tensors(q, k, v, layout)
    mask, mask_kind, kpm = check_masks(attn_mask, key_padding_mask, shapes, q4.device)
    scale = _check_scale(scale, shapes.D)
    single = request is None or isinstance(request, MapRequest)
    plans = [check_request(r, shapes) for r in ([] if request is None else [request] if single else request)]
    selected = _selected_union(plans)
    impl = _backend(backend, q4.device)
    if layout == "bhsd":
        out = torch.empty((shapes.B, shapes.H, shapes.Nq, shapes.Dv), dtype=q4.dtype, device=q4.device)
        out4 = out
    else:
        out = torch.empty((shapes.B, shapes.Nq, shapes.H, shapes.Dv), dtype=q4.dtype, device=q4.device)
        out4 = out.transpose(1, 2)
    want_stats = any(s in p.stats for p in plans for s in ("entropy", "peak"))
    masks = dict(mask=mask, mask_kind=mask_kind, key_padding=kpm, is_causal=bool(is_causal))
    sel = None if selected is None else selected.to(q4.device)
    if impl is cpu_path:
        # The CPU path reduces every map in the forward's own pass: list them first, in map_of's order.
        jobs = [job for plan in plans for job in _map_jobs(plan)]
        lse, tokens, ent, peak, done = impl.forward(q4, k4, v4, out4, float(scale), selected=sel,
                                                    want_stats=want_stats, maps=jobs, **masks)
        finished = iter(done)

        def map_of(qplan: AxisPlan, kplan: AxisPlan, heads_table: torch.Tensor) -> torch.Tensor:
            return next(finished)
    else:
        lse, tokens, ent, peak = impl.forward(q4, k4, v4, out4, float(scale), selected=sel,
                                              want_stats=want_stats, **masks)

        def map_of(qplan: AxisPlan, kplan: AxisPlan, heads_table: torch.Tensor) -> torch.Tensor:
            dev = q4.device
            return impl.map_pass(q4, k4, lse, float(scale), qplan.to(dev), kplan.to(dev), heads_table.to(dev),
                                 **masks)

    results = [_products(plan, map_of, tokens, ent, peak, selected) for plan in plans]
    if single:
        return out, results[0] if results else {}
    return out, results


def maps_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None = None,
                  attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                  request: MapRequest | Sequence[MapRequest] = MapRequest(), *,
                  key_padding_mask: torch.Tensor | None = None, layout: str = "bhsd",
                  backend: str = "auto") -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """The map products (map, rows, colsum) of attention whose forward ran elsewhere.

    For a flash forward attncap did not run (PyTorch SDPA's flash backend, flash-attn, FA3) that
    returns the log-sum-exp: attncap's map pass recomputes P = exp(scale * Q K^T + mask - LSE) tile
    by tile from it. q, k, masks and request as in attncap.attention; lse float32 [B, H, Nq] in
    natural-log units (-inf for a fully masked query), as torch's _scaled_dot_product_flash_attention
    returns it. Token columns, entropy and peak ride on the forward: ask attncap.attention for those.
    """
    q4, k4, _, shapes = check_tensors(q, k, k, layout)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (shapes.B, shapes.H, shapes.Nq) \
            or lse.dtype != torch.float32 or lse.device != q4.device:
        got = f"{tuple(lse.shape)} {lse.dtype} on {lse.device}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be float32 [B, H, Nq] = {(shapes.B, shapes.H, shapes.Nq)} on {q4.device}; got {got}")
    mask, mask_kind, kpm = check_masks(attn_mask, key_padding_mask, shapes, q4.device)
    scale = _check_scale(scale, shapes.D)
    single = isinstance(request, MapRequest)
    plans = [check_request(r, shapes) for r in ([request] if single else request)]
    for plan in plans:
        forward_only = [name for name, asked in (("keys", plan.selected is not None), ("entropy", "entropy" in plan.stats),
                                                 ("peak", "peak" in plan.stats)) if asked]
        if forward_only:
            raise ValueError(f"request asks for {forward_only}, which come from the forward pass; maps_from_lse "
                             "computes map, rows (queries=) and colsum: use attncap.attention for the others")
    impl = _backend(backend, q4.device)
    masks = dict(mask=mask, mask_kind=mask_kind, key_padding=kpm, is_causal=bool(is_causal))
    if impl is cpu_path:
        finished = iter(cpu_path.maps_from_lse(q4, k4, lse, float(scale),
                                               [job for plan in plans for job in _map_jobs(plan)], **masks))

        def map_of(qplan: AxisPlan, kplan: AxisPlan, heads_table: torch.Tensor) -> torch.Tensor:
            return next(finished)
    else:
        def map_of(qplan: AxisPlan, kplan: AxisPlan, heads_table: torch.Tensor) -> torch.Tensor:
            dev = q4.device
            return impl.map_pass(q4, k4, lse, float(scale), qplan.to(dev), kplan.to(dev), heads_table.to(dev),
                                 **masks)
    results = [_products(plan, map_of, None, None, None, None) for plan in plans]
    return results[0] if single else results


def _check_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None (1/sqrt(D)); got {scale!r}")
    return scale


def _products(plan: Plan, map_of, tokens, ent, peak, selected) -> dict[str, torch.Tensor]:
    """One request's products: maps from map_of (in _map_jobs' order), the rest from the forward."""
    products: dict[str, torch.Tensor] = {}
    if plan.want_map:
        products["map"] = map_of(plan.query, plan.key, plan.heads_table)
    if plan.selected is not None:
        columns = torch.searchsorted(selected, plan.selected).to(tokens.device)
        products["tokens"] = reduce_per_query(tokens[..., columns], plan)
    if plan.rows is not None:
        products["rows"] = map_of(plan.rows, plan.key, plan.heads_table)
    if "entropy" in plan.stats:
        products["entropy"] = reduce_per_query(ent, plan)
    if "peak" in plan.stats:
        products["peak"] = reduce_per_query(peak, plan)
    if "colsum" in plan.stats:
        products["colsum"] = _colsum(products.get("map"), plan, map_of)
    return products


def _map_jobs(plan: Plan) -> list[tuple[AxisPlan, AxisPlan, torch.Tensor]]:
    """The map-pass calls _products makes for ``plan``, in its order."""
    jobs = []
    if plan.want_map:
        jobs.append((plan.query, plan.key, plan.heads_table))
    if plan.rows is not None:
        jobs.append((plan.rows, plan.key, plan.heads_table))
    if "colsum" in plan.stats and not plan.want_map:
        jobs.append((_one_bin(plan.query), plan.key, plan.heads_table))
    return jobs


def _one_bin(qplan: AxisPlan) -> AxisPlan:
    """The query range of a plan as a single bin (colsum without a map)."""
    start, stop = int(qplan.perm.min()), int(qplan.perm.max()) + 1
    return plan_range(start, stop, (stop - start,), (stop - start,))


def _selected_union(plans: list[Plan]) -> torch.Tensor | None:
    """The sorted distinct keys all requests select: the forward computes their columns once."""
    chosen = [p.selected for p in plans if p.selected is not None]
    if not chosen:
        return None
    union = torch.unique(torch.cat(chosen))
    if union.numel() > MAX_SELECTED_KEYS:
        raise ValueError(f"the requests select {union.numel()} distinct keys together; the one-pass kernel takes "
                         f"at most {MAX_SELECTED_KEYS}: split them over several calls or use key_range with map=True")
    return union.to(torch.int32)


def reduce_per_query(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per-head, per-query values [B, H, Nq, ...] -> head groups and query bins [B, G, Qb, ...]."""
    axis = plan.query.to(x.device)
    x = x[:, :, axis.perm.long()]
    x = x[:, plan.heads_table.to(x.device).long()].mean(2)
    pooled = torch.zeros((x.shape[0], x.shape[1], axis.nbins) + tuple(x.shape[3:]), dtype=x.dtype, device=x.device)
    pooled.index_add_(2, axis.bin_of_slot.long(), x)
    counts = axis.counts.to(x.device).reshape((1, 1, -1) + (1,) * (x.dim() - 3))
    return pooled / counts


def _colsum(pooled_map: torch.Tensor | None, plan: Plan, map_of) -> torch.Tensor:
    """Attention received per key bin, summed over the query range.

    From the map when there is one (sum over query bins of mean * bin count, exact); otherwise
    from the map pass with the whole query range as a single bin.
    """
    qplan = plan.query
    if pooled_map is not None:
        return (pooled_map * qplan.counts.to(pooled_map.device)[:, None]).sum(2)
    one_bin = _one_bin(qplan)
    return map_of(one_bin, plan.key, plan.heads_table)[:, :, 0] * float(one_bin.nslots)
