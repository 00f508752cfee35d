"""The Triton kernels themselves (TRITON_INTERPRET=1 on CPU, natively on CUDA) against attncap.reference
in float64, at tolerances set by what each product's arithmetic rounds.

* tokens, entropy, peak: the forward computes them in fp32 from the final m and l (token columns in
  the epilogue), from the same rounded q and k the reference sees: rtol 1e-5 for every dtype.
  Entropy is LSE - sum P*S, a difference of fp32 values of the scores' size, so near zero (a causal
  row with one key) its error is absolute: scores here stay below 16, whose fp32 ulp is 1.9e-6,
  so atol 2e-6 (one ulp; the error seen is about 1e-7).
* map, rows, colsum: fp32 inputs pool in fp32 (ieee dots): rtol 1e-5. 16-bit inputs feed 2^14 P to
  fp16 one-hot products, two roundings of 2^-11 relative each: rtol 1e-3, and no underflow, so the
  relative bound holds for probabilities far below fp16's smallest normal (test_no_fp16_underflow).
* out: one rounding to the input dtype after P is cast to V's dtype: as tests/test_products.py.

The interpreter's tiles are 32 slots and it pretends to fill 2 multiprocessors, so these small
cases cross tiles, pad bins (grids the pool does not divide), let bins span several tiles (bins of
more than 32 tokens), and split heads and query tiles over programs whose partials are summed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import attncap
from attncap import MapRequest
from attncap.reference import attention_reference

from conftest import GPU

DEVICE = "cuda" if GPU else "cpu"
EXACT = dict(rtol=1e-5, atol=1e-8)
ENTROPY = dict(rtol=1e-5, atol=2e-6)
POOLED = {torch.float32: EXACT, torch.float16: dict(rtol=1e-3, atol=1e-8), torch.bfloat16: dict(rtol=1e-3, atol=1e-8)}
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Case:
    name: str
    B: int
    H: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype
    request: dict
    masks: tuple[str, ...] = ()   # "bool" (with a query that sees no key), "additive", "padding", "causal"
    q_scale: float = 1.0          # peaky scores: a few keys take most of each row
    inputs: dict = field(default_factory=dict)


CASES = [
    # GQA, 40 selected keys (> 32), a 7x9 grid pooled (7, 5): bins of 35 tokens span two 32-slot tiles.
    Case("fp32-gqa-40keys-bins-span-tiles", 2, 4, 2, 63, 63, 24, torch.float32, q_scale=3.0, request=dict(
        heads="mean", query_grid=(7, 9), query_pool=(7, 5), key_grid=(7, 9), key_pool=(7, 5),
        keys=list(range(0, 63, 3))[:21] + list(range(1, 63, 3))[:19], stats=("entropy", "peak", "colsum"))),
    Case("bf16-bool-padding-odd-pool", 2, 2, 2, 40, 70, 40, torch.bfloat16, masks=("bool", "padding"), request=dict(
        heads="all", key_grid=(7, 10), key_pool=(2, 3), keys=[0, 3, 35, 69], queries=[0, 3, 39],
        stats=("entropy", "peak", "colsum"))),
    Case("fp16-additive-causal-ranges", 1, 3, 1, 50, 61, 64, torch.float16, masks=("additive", "causal"), request=dict(
        heads=[2, 0], map=True, query_range=(5, 50), key_range=(3, 60), key_grid=(3, 19), key_pool=(1, 4),
        keys=[4, 10, 59], stats=("entropy", "peak"))),
    # colsum without a map: the whole query range is one bin of 100 tokens, four tiles summed by splits.
    Case("fp32-colsum-one-query-bin", 1, 3, 3, 100, 45, 32, torch.float32, q_scale=4.0, request=dict(
        heads="mean", key_grid=(5, 9), key_pool=(2, 2), stats=("colsum",))),
    Case("fp16-128keys-d100", 1, 2, 2, 33, 130, 100, torch.float16, q_scale=3.0, request=dict(
        heads="mean", keys=list(range(1, 129)), stats=("peak",))),
]


def make_inputs(c: Case):
    q = (torch.randn(c.B, c.H, c.Nq, c.D, device=DEVICE) * c.q_scale).to(c.dtype)
    k, v = (torch.randn(c.B, c.Hk, c.Nk, c.D, device=DEVICE).to(c.dtype) for _ in range(2))
    kw = {"is_causal": "causal" in c.masks}
    if "bool" in c.masks:
        m = torch.rand(c.B, 1, c.Nq, c.Nk, device=DEVICE) > 0.3
        m[0, 0, 3] = False
        kw["attn_mask"] = m
    if "additive" in c.masks:
        m = torch.randn(c.Nq, c.Nk, device=DEVICE) * 2
        m[:, :2] = float("-inf")
        kw["attn_mask"] = m
    if "padding" in c.masks:
        kpm = torch.ones(c.B, c.Nk, dtype=torch.bool, device=DEVICE)
        kpm[0, 50:] = False
        kpm[1, :] = False  # a batch element whose every key is padded: zeros, never NaN
        kw["key_padding_mask"] = kpm
    return q, k, v, kw


def check(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape, name
    assert not torch.isnan(got).any(), f"{name} has NaN (unwritten tile or masked row)"
    tol = POOLED[dtype] if name in ("map", "rows", "colsum") else ENTROPY if name == "entropy" else EXACT
    torch.testing.assert_close(got.cpu().double(), ref.cpu(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_products_match_reference(case: Case, poison_outputs):
    q, k, v, kw = make_inputs(case)
    request = MapRequest(**case.request)
    out, got = attncap.attention(q, k, v, request=request, backend="triton", **kw)
    ref_out, ref = attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request,
                                       **{n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in kw.items()})
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=OUT_TOL[case.dtype], rtol=OUT_TOL[case.dtype])
    assert set(got) == set(ref)
    for name in ref:
        check(name, got[name], ref[name], case.dtype)
    if "padding" in case.masks:  # batch element 1 sees no key at all
        assert torch.all(out[1] == 0) and all(torch.all(t[1] == 0) for t in got.values())


def test_no_fp16_underflow_in_pooling(poison_outputs):
    """Peaky rows over 2,048 keys: most probabilities lie far below fp16's smallest normal (6.1e-5)
    and many below its subnormals' spacing (6e-8). Pooled over queries with keys unpooled, every
    probability passes through an fp16 operand; scaled by 2^14 each keeps 11 significant bits."""
    q = (torch.randn(1, 1, 64, 32, device=DEVICE) * 4).half()
    k = torch.randn(1, 1, 2048, 32, device=DEVICE).half()
    request = MapRequest(query_grid=(8, 8), query_pool=(1, 8), map=True)
    _, got = attncap.attention(q, k, k, request=request, backend="triton")
    _, ref = attention_reference(q.cpu(), k.cpu(), k.cpu(), request=request)
    tiny = ref["map"] < 6.1e-5
    assert tiny.float().mean() > 0.5 and (ref["map"] < 6e-8).any()
    torch.testing.assert_close(got["map"].cpu().double(), ref["map"], rtol=1e-3, atol=1e-12)


def test_map_pass_is_deterministic_with_split_partials():
    """Heads split over programs (interpreter: 2 'multiprocessors'): partials summed in a fixed order."""
    q, k = (torch.randn(1, 6, 40, 16, device=DEVICE) for _ in range(2))
    request = MapRequest(query_grid=(5, 8), query_pool=2, key_grid=(5, 8), key_pool=2, stats=("colsum",))
    first = attncap.maps_from_lse(q, k, _lse(q, k), request=request, backend="triton")
    again = attncap.maps_from_lse(q, k, _lse(q, k), request=request, backend="triton")
    for name in first:
        assert torch.equal(first[name], again[name]), name


def _lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1).float()


def test_slot_layout_pads_bins_to_whole_tiles():
    """Bins of a 5x7 grid pooled 2: sizes 4, 2 and 1, padded to runs of 4 slots, 8 bins per 32-slot tile."""
    from attncap.kernels.slots import lay_out
    from attncap.layouts import plan_range

    plan = plan_range(0, 35, (5, 7), (2, 2))
    layout = lay_out(plan, 32)
    assert (layout.bin_slots, layout.bins_per_tile, layout.span, layout.n_tiles) == (4, 8, 1, 2)
    tok = layout.tok.view(-1, 4)[: plan.nbins]
    for b in range(plan.nbins):
        start, stop = int(plan.bin_start[b]), int(plan.bin_start[b + 1])
        assert tok[b, : stop - start].tolist() == plan.perm[start:stop].tolist()
        assert (tok[b, stop - start:] == -1).all()
    assert (layout.tok.view(-1, 4)[plan.nbins:] == -1).all()
    big = lay_out(plan_range(0, 35, (5, 7), (5, 7)), 16)  # one bin of 35 slots: 3 tiles of 16
    assert (big.bin_slots, big.bins_per_tile, big.span, big.n_tiles) == (16, 1, 3, 3)
