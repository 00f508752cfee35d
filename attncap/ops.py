"""attncap.attention and attncap.maps_from_lse: the kernel-level entry points, as torch custom ops.

A public function checks its arguments in plain Python on shapes, dtypes and request fields (never a
tensor's values), turns the requests into Plans (attncap.validate; cached per equal request and
call sizes, so a repeated request costs a lookup) and calls a custom op,
``torch.ops.attncap.attention`` or ``torch.ops.attncap.maps_from_lse``, with the plans as text
(plain eager calls run the op's implementation directly: see _plain_eager). The implementation
finds the plans' index tensors in a cache per (plans, device), built on a call's first use, and
runs the forward and the map pass: on CUDA as Triton kernels, on CPU as
chunked PyTorch (attncap.cpu_path) unless backend="triton" asks for the kernels, which on CPU needs
TRITON_INTERPRET=1 (for tests). Its fake implementation gives every output's shape from the text
alone. So under torch.compile the whole call is one node of the graph (fullgraph=True works for
every product), and on CUDA a call reads no device value on the host: no synchronisation after the
first call of a plan, and a warmed-up call can be captured in a CUDA graph.
"""
from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Iterator, Sequence

import torch

from . import cpu_path, nonfinite
from .layouts import AxisPlan, AxisSpec, sum_bins
from .options import check_workspace_bytes
from .request import MapRequest, request_key
from .validate import (Plan, Shapes, check_masks, check_request, check_tensors, mask_views, product_shapes,
                       selected_union)

BACKENDS = ("auto", "triton", "torch")
PLAN_CACHE_SIZE = 256  # calls of distinct plans whose index tensors stay cached per process

Products = dict[str, torch.Tensor]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              attn_mask: torch.Tensor | None = None, is_causal: bool = False,
              request: MapRequest | Sequence[MapRequest] | None = None, *,
              key_padding_mask: torch.Tensor | None = None, layout: str = "bhsd",
              backend: str = "auto", softcap: float | None = None,
              workspace_bytes: int | None = None) -> tuple[torch.Tensor, Products | list[Products]]:
    """Scaled dot-product attention that also returns reductions of its probabilities.

    Shapes (layout="bhsd", as torch SDPA; layout="bshd" swaps H and N in every tensor):
        q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv]; H % Hk == 0 (GQA/MQA).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to [B, H, Nq, Nk].
        key_padding_mask: bool [B, Nk], True = keep.   is_causal: query i sees keys j <= i (top-left).
    softcap: logit softcapping (Gemma 2): scores = softcap * tanh(scale * q.k / softcap), applied
        before the masks are added, as transformers' eager attention does; None = no capping.
    workspace_bytes: on the torch path (CPU, MPS, backend="torch"), the bound on the call's working
        memory beyond its inputs, outputs and products (None: attncap.cpu_path.WORKSPACE_BYTES, 64 MiB);
        smaller means more, shorter tiles. A bound too small for one query row of the widest tile is a
        ValueError naming the least that works. The Triton kernels ignore it (their working tensors,
        per-head rows of the forward and the map pass's partial sums, follow from the request).
    Returns (out [B, H, Nq, Dv] in q's dtype and layout, products): products is {} without a
    request, else the float32 tensors described in attncap.request (map, tokens, rows, colsum,
    entropy, peak). A list of requests (several relations of one joint sequence) shares one
    forward and returns a list of product dicts. A query with every key masked gets zeros in out
    and products, never NaN; a query whose scores are built from NaN or inf is NaN in out and in
    every product it enters (attncap.nonfinite). B = 0 gives empty results. Not differentiable. Compiles with torch.compile(fullgraph=True).
    """
    _, _, _, shapes = check_tensors(q, k, v, layout)
    check_masks(attn_mask, key_padding_mask, shapes, q.device)
    scale = _check_scale(scale, shapes.D)
    softcap = _check_softcap(softcap)
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    _check_backend(backend, q.device)
    single = request is None or isinstance(request, MapRequest)
    call = _checked(() if request is None else (request,) if single else tuple(request), shapes)
    args = (q, k, v, attn_mask, key_padding_mask, scale, bool(is_causal), layout, backend, call.text, softcap,
            workspace_bytes)
    flat = _attention_impl(*args) if _plain_eager(q, k, v, attn_mask, key_padding_mask) \
        else torch.ops.attncap.attention(*args)
    results = _unflatten(call, flat[1:])
    if single:
        return flat[0], results[0] if results else {}
    return flat[0], results


def maps_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None = None,
                  attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                  request: MapRequest | Sequence[MapRequest] = MapRequest(), *,
                  key_padding_mask: torch.Tensor | None = None, layout: str = "bhsd",
                  backend: str = "auto", softcap: float | None = None,
                  workspace_bytes: int | None = None) -> Products | list[Products]:
    """The map products (map, rows, colsum) of attention whose forward ran elsewhere.

    For a flash forward attncap did not run (PyTorch SDPA's flash backend, flash-attn, FA3) that
    returns the log-sum-exp: attncap's map pass recomputes P = exp(scale * Q K^T + mask - LSE) tile
    by tile from it (with softcap: the capped scores, as attncap.attention). q, k, masks, softcap,
    workspace_bytes and request as in attncap.attention; lse float32 [B, H, Nq] in
    natural-log units (-inf for a fully masked query), as torch's _scaled_dot_product_flash_attention
    (CUDA) and _scaled_dot_product_flash_attention_for_cpu (CPU) return it; attncap.cpu_path.sdpa_with_lse
    calls the one for q's device and lists which forwards give a usable LSE where.
    Token columns, entropy and peak ride on the forward: ask attncap.attention for those.
    Compiles with torch.compile(fullgraph=True), like attncap.attention.
    """
    _, _, _, shapes = check_tensors(q, k, k, layout)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (shapes.B, shapes.H, shapes.Nq) \
            or lse.dtype != torch.float32 or lse.device != q.device:
        got = f"{tuple(lse.shape)} {lse.dtype} on {lse.device}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be float32 [B, H, Nq] = {(shapes.B, shapes.H, shapes.Nq)} on {q.device}; got {got}")
    check_masks(attn_mask, key_padding_mask, shapes, q.device)
    scale = _check_scale(scale, shapes.D)
    softcap = _check_softcap(softcap)
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    _check_backend(backend, q.device)
    single = isinstance(request, MapRequest)
    call = _checked((request,) if single else tuple(request), shapes)
    for plan in call.plans:
        forward_only = [name for name, asked in (("keys", plan.selected is not None), ("entropy", "entropy" in plan.stats),
                                                 ("peak", "peak" in plan.stats)) if asked]
        if forward_only:
            raise ValueError(f"request asks for {forward_only}, which come from the forward pass; maps_from_lse "
                             "computes map, rows (queries=) and colsum: use attncap.attention for the others")
    args = (q, k, lse, attn_mask, key_padding_mask, scale, bool(is_causal), layout, backend, call.text, softcap,
            workspace_bytes)
    flat = _maps_from_lse_impl(*args) if _plain_eager(q, k, lse, attn_mask, key_padding_mask) \
        else torch.ops.attncap.maps_from_lse(*args)
    results = _unflatten(call, flat)
    return results[0] if single else results


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may run the custom op's implementation directly: plain eager tensors that need
    no gradient, and nothing that would see, trace or transform the op (torch.compile and export,
    dispatch modes such as FakeTensorMode, torch function modes, jit tracing, functorch transforms,
    the profiler). The implementation is then exactly what the op would run, without the op's Python
    dispatch layers (autograd fallback, redispatch, Dynamo's disable wrapper): tens of microseconds a
    call on a CPU, as much as the rest of the host work of a small call."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None or torch.autograd._profiler_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return all(t is None or (type(t) is torch.Tensor and not t.requires_grad) for t in tensors)


def _check_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None (1/sqrt(D)); got {scale!r}")
    return float(scale)


def _check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive finite number (the logit cap, e.g. Gemma 2's 50.0) or None "
                         f"(no capping); got {softcap!r}")
    return float(softcap)


def _check_backend(name: str, device: torch.device) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before attncap is imported; "
                         "use backend='torch' (the chunked CPU path) or move the tensors to CUDA")


@dataclass(frozen=True)
class _Call:
    """A call's requests, validated: their plans, the plans as the ops' text argument, and each plan's
    product names in the order the ops return them."""
    plans: tuple[Plan, ...]
    text: str
    names: tuple[tuple[str, ...], ...]


class _Requests:
    """Requests keyed by their request_key, so the lru cache of _validated finds an equal request's
    validation (capture makes a new MapRequest per call); the objects ride along for a miss."""
    __slots__ = ("requests", "key", "hash")

    def __init__(self, requests: tuple[MapRequest, ...], key: tuple):
        self.requests, self.key, self.hash = requests, key, hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Requests) and self.key == other.key


def _checked(requests: tuple[MapRequest, ...], shapes: Shapes) -> _Call:
    """Validate ``requests`` against the call's sizes (raising before any work). Validation reads only
    the requests' fields and the sizes, so requests with equal keys (attncap.request.request_key) at
    equal sizes reuse one validation: a dictionary lookup per call. Requests without a key (a tensor
    of keys, numpy ints) are validated every call; under torch.compile the checks are traced as
    plain Python, as before, with no cache for Dynamo to guard on."""
    if not torch.compiler.is_compiling():
        keys = tuple(request_key(r) for r in requests)
        if None not in keys:
            return _validated(_Requests(requests, keys), shapes)
    return _validate(requests, shapes)


def _validate(requests: tuple[MapRequest, ...], shapes: Shapes) -> _Call:
    plans = tuple(check_request(r, shapes) for r in requests)
    selected_union(plans)  # refuses too many distinct keys before any work
    return _Call(plans, _encode(plans), tuple(tuple(product_shapes(p, 1)) for p in plans))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _validated(requests: _Requests, shapes: Shapes) -> _Call:
    return _validate(requests.requests, shapes)


def _encode(plans: tuple[Plan, ...]) -> str:
    """The plans as a Python literal: the custom ops take them as a string argument."""
    return repr(tuple(p.wire() for p in plans))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _decode(text: str) -> tuple[Plan, ...]:
    return tuple(Plan.from_wire(t) for t in ast.literal_eval(text))


def _unflatten(call: _Call, flat: Sequence[torch.Tensor]) -> list[Products]:
    """The op's flat list of products back into one dict per request, in product_shapes' order."""
    results, at = [], 0
    for names in call.names:
        results.append(dict(zip(names, flat[at:at + len(names)])))
        at += len(names)
    return results


# ---- the custom ops' implementations: eager code on real tensors --------------------------------

@dataclass(frozen=True)
class _Tables:
    """One plan's index tensors on one device."""
    query: AxisPlan
    key: AxisPlan
    rows: AxisPlan | None
    one_bin: AxisPlan | None      # the query range as a single bin: colsum without a map
    heads: torch.Tensor           # int32 [G, HPG]
    columns: torch.Tensor | None  # int64 [Ks]: each selected key's column among the forward's token columns,
                                  # None when the plan selects every column in order
    query_span: tuple[int, int]   # (start, length) of the query range
    query_bin: torch.Tensor | None  # int64 [length]: query bin of each token of the range in token order
                                    # (None: unpooled, one token per bin)
    mean_of: int                  # n when the plan's one group is heads 0..n-1 (0 otherwise): for a
                                  # call of n heads, a mean over the head dim


@dataclass(frozen=True)
class _CallTables:
    """Everything a call of the ops needs beyond its tensors, built once per (plans, device)."""
    plans: tuple[Plan, ...]
    tables: tuple[_Tables, ...]
    selected: torch.Tensor | None  # int32 [S]: the sorted union of selected keys
    jobs: tuple[tuple[AxisPlan, AxisPlan, torch.Tensor], ...]  # every map-pass call, in _products' order
    want_stats: bool               # some plan asks for entropy or peak


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _tables(text: str, device: torch.device) -> _CallTables:
    """The index tensors of a call's plans on ``device``: built on the host and copied there on first
    use, in one transfer (one synchronisation for a new plan on CUDA, not one per index tensor), then
    found by a cache lookup, so later calls copy nothing to the device and never wait on it."""
    plans = _decode(text)
    union = selected_union(plans)

    def table(plan: Plan) -> _Tables:
        q = plan.query
        one_bin = None
        if "colsum" in plan.stats and not plan.want_map:
            n = q.stop - q.start
            one_bin = AxisSpec(q.start, q.stop, (n,), (n,)).plan()
        columns = None
        if plan.selected is not None and plan.selected != union:
            columns = torch.tensor([union.index(k) for k in plan.selected], dtype=torch.int64)
        query = q.plan()
        query_bin = None
        if query.pooled:  # invert the bin-major order: the bin of each token, in token order
            query_bin = torch.empty(q.nslots, dtype=torch.int64)
            query_bin[query.perm - q.start] = query.bin_of_slot.long()
        return _Tables(query, plan.key.plan(), None if plan.rows is None else plan.rows.plan(), one_bin,
                       torch.tensor(plan.heads, dtype=torch.int32), columns, (q.start, q.nslots), query_bin,
                       len(plan.heads[0]) if plan.heads == (tuple(range(len(plan.heads[0]))),) else 0)

    host = tuple(table(p) for p in plans)
    selected = None if union is None else torch.tensor(union, dtype=torch.int32)
    if device.type != "cpu":
        found: list[torch.Tensor] = []
        _tensors((host, selected), found.append)
        moved = iter(_upload(found, device))
        host, selected = _tensors((host, selected), lambda t: next(moved))
    return _CallTables(plans, host, selected, tuple(_map_jobs(plans, host)),
                       any(s in p.stats for p in plans for s in ("entropy", "peak")))


def _tensors(x, visit):
    """``x`` (tensors inside tuples, _Tables and AxisPlans) rebuilt with each tensor t replaced by
    visit(t), in a fixed order."""
    if isinstance(x, torch.Tensor):
        return visit(x)
    if type(x) is tuple:
        return tuple(_tensors(i, visit) for i in x)
    if isinstance(x, (_Tables, AxisPlan)):
        return replace(x, **{f.name: _tensors(getattr(x, f.name), visit) for f in fields(x)})
    return x


def _upload(host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on ``device`` by one copy: their bytes packed into one buffer, then viewed back as
    each tensor's dtype and shape. Offsets are multiples of 16 bytes, as a fresh allocation's are:
    Triton specialises a kernel on its pointers' 16-byte alignment, so a view passed to a kernel
    (heads, selected keys) compiles the same variant as before."""
    chunks, offsets, at = [], [], 0
    for t in host:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        chunks += [raw, raw.new_zeros(-raw.numel() % 16)]
        offsets.append(at)
        at += raw.numel() + chunks[-1].numel()
    flat = torch.cat(chunks).to(device) if chunks else None
    return [flat[o:o + t.numel() * t.element_size()].view(t.dtype).reshape(t.shape) for o, t in zip(offsets, host)]


def _impl(name: str, device: torch.device) -> ModuleType:
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return cpu_path
    from . import kernels
    return kernels


def _bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhsd" else x.transpose(1, 2)


def _map_jobs(plans: Sequence[Plan], tables: Sequence[_Tables]) -> list[tuple[AxisPlan, AxisPlan, torch.Tensor]]:
    """Every map-pass call the plans need, in the order _products takes their results."""
    jobs = []
    for plan, t in zip(plans, tables):
        if plan.want_map:
            jobs.append((t.query, t.key, t.heads))
        if t.rows is not None:
            jobs.append((t.rows, t.key, t.heads))
        if t.one_bin is not None:
            jobs.append((t.one_bin, t.key, t.heads))
    return jobs


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    key_padding_mask: torch.Tensor | None, scale: float, is_causal: bool, layout: str, backend: str,
                    plans: str, softcap: float | None = None, workspace_bytes: int | None = None) -> list[torch.Tensor]:
    """[out, then each plan's products in product_shapes' order]. Arguments as checked by attention()."""
    q4, k4, v4 = (_bhsd(x, layout) for x in (q, k, v))
    B, H, Nq, _ = q4.shape
    call = _tables(plans, q.device)
    mask, mask_kind, kpm = mask_views(attn_mask, key_padding_mask, (B, H, Nq, k4.shape[2]))
    masks = dict(mask=mask, mask_kind=mask_kind, key_padding=kpm, is_causal=is_causal, softcap=softcap)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)  # q's layout
    if B == 0:  # an empty batch gives empty results, as SDPA does, on every backend
        return [out] + _fake_products(q, plans)
    impl = _impl(backend, q.device)
    if impl is cpu_path:
        # The CPU path reduces every map in the forward's own pass.
        lse, tokens, ent, peak, maps = impl.forward(q4, k4, v4, _bhsd(out, layout), scale, selected=call.selected,
                                                    want_stats=call.want_stats, maps=call.jobs,
                                                    want_entropy=any("entropy" in p.stats for p in call.plans),
                                                    workspace_bytes=workspace_bytes, **masks)
    else:
        lse, tokens, ent, peak = impl.forward(q4, k4, v4, _bhsd(out, layout), scale, selected=call.selected,
                                              want_stats=call.want_stats, **masks)
        maps = [impl.map_pass(q4, k4, lse, scale, qp, kp, heads, **masks) for qp, kp, heads in call.jobs]
    done = iter(maps)
    products = [x for p, t in zip(call.plans, call.tables) for x in _products(p, t, done, tokens, ent, peak)]
    # one NaN policy for every backend
    return [out] + nonfinite.enforce(q4, k4, mask, mask_kind, None, _bhsd(out, layout), call, products)


_attention_op = torch.library.custom_op("attncap::attention", _attention_impl, mutates_args=())


@_attention_op.register_fake
def _attention_fake(q, k, v, attn_mask, key_padding_mask, scale, is_causal, layout, backend, plans, softcap=None,
                    workspace_bytes=None):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return [out] + _fake_products(q, plans)


def _maps_from_lse_impl(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, attn_mask: torch.Tensor | None,
                        key_padding_mask: torch.Tensor | None, scale: float, is_causal: bool, layout: str,
                        backend: str, plans: str, softcap: float | None = None,
                        workspace_bytes: int | None = None) -> list[torch.Tensor]:
    """Each plan's products in product_shapes' order. Arguments as checked by maps_from_lse()."""
    q4, k4 = _bhsd(q, layout), _bhsd(k, layout)
    B, H, Nq, _ = q4.shape
    call = _tables(plans, q.device)
    mask, mask_kind, kpm = mask_views(attn_mask, key_padding_mask, (B, H, Nq, k4.shape[2]))
    masks = dict(mask=mask, mask_kind=mask_kind, key_padding=kpm, is_causal=is_causal, softcap=softcap)
    impl = _impl(backend, q.device)
    if B == 0:
        return _fake_products(q, plans)
    if impl is cpu_path:
        maps = cpu_path.maps_from_lse(q4, k4, lse, scale, call.jobs, workspace_bytes=workspace_bytes, **masks)
    else:
        maps = [impl.map_pass(q4, k4, lse, scale, qp, kp, heads, **masks) for qp, kp, heads in call.jobs]
    done = iter(maps)
    products = [x for p, t in zip(call.plans, call.tables) for x in _products(p, t, done, None, None, None)]
    return nonfinite.enforce(q4, k4, mask, mask_kind, lse, None, call, products)


_maps_from_lse_op = torch.library.custom_op("attncap::maps_from_lse", _maps_from_lse_impl, mutates_args=())


@_maps_from_lse_op.register_fake
def _maps_from_lse_fake(q, k, lse, attn_mask, key_padding_mask, scale, is_causal, layout, backend, plans,
                        softcap=None, workspace_bytes=None):
    return _fake_products(q, plans)


def _fake_products(q: torch.Tensor, plans: str) -> list[torch.Tensor]:
    return [q.new_empty(shape, dtype=torch.float32)
            for plan in _decode(plans) for shape in product_shapes(plan, q.shape[0]).values()]


def _products(plan: Plan, t: _Tables, maps: Iterator[torch.Tensor], tokens, ent, peak) -> list[torch.Tensor]:
    """One plan's products in product_shapes' order: maps from ``maps`` (in _map_jobs' order), the
    rest from the forward's per-head, per-query outputs. Contiguous, as the fake implementation says."""
    got: list[torch.Tensor] = []
    if plan.want_map:
        got.append(next(maps))
    if plan.selected is not None:
        got.append(reduce_per_query(tokens if t.columns is None else tokens[..., t.columns], t))
    if plan.rows is not None:
        got.append(next(maps))
    if "entropy" in plan.stats:
        got.append(reduce_per_query(ent, t))
    if "peak" in plan.stats:
        got.append(reduce_per_query(peak, t))
    if "colsum" in plan.stats:
        # Attention received per key bin, summed over the query range: from the map when there is one
        # (sum over query bins of mean x bin count, exact), else from the query range as one bin.
        if plan.want_map:
            got.append((got[0] * t.query.counts[:, None]).sum(2))
        else:
            got.append(next(maps)[:, :, 0] * float(t.one_bin.nslots))
    return [x.contiguous() for x in got]


def reduce_per_query(x: torch.Tensor, t: _Tables) -> torch.Tensor:
    """Per-head, per-query values [B, H, Nq, ...] -> head groups and query bins [B, G, Qb, ...]:
    the query range's tokens averaged over each head group, then over each query bin (summed in
    token order, the order in which the bin-major slots list each bin's tokens)."""
    x = x.narrow(2, *t.query_span)
    x = x.mean(1, keepdim=True) if t.mean_of == x.shape[1] else x[:, t.heads].mean(2)
    if t.query_bin is None:
        return x
    return sum_bins(x, t.query_bin, t.query.nbins) / t.query.counts.reshape((1, 1, -1) + (1,) * (x.dim() - 3))
