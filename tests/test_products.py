"""Every product of attncap.attention equals attncap.reference in float64.

Both backends run: "triton" (the kernels, through TRITON_INTERPRET=1 on CPU, natively on CUDA)
and "torch" (the chunked CPU path). Inputs are fresh random draws; outputs start as NaN.

Tolerances, by what limits them:
* out: rounded to the input dtype once at the end and P is cast to V's dtype before P@V (as in
  every flash kernel), so the error is a few units of that dtype's rounding: fp32 1e-5 on CPU
  (exact fp32 arithmetic), 2e-3 on GPU (tf32 dots, 10-bit mantissa); fp16 (11-bit) 2e-3;
  bf16 (8-bit) 1.6e-2.
* products: always float32 from the same (already rounded) q and k values the reference sees,
  so the input dtype does not matter. The CPU path accumulates in fp32: ~1e-6 relative, rtol 1e-4.
  The kernels feed P to the token and pooling dots as fp16 (11-bit significand, unit roundoff
  4.9e-4, the precision tf32 would give) on every device: rtol 1e-3, twice that roundoff. On GPU
  fp32 inputs also meet tf32 in QK^T, hence 2e-3 there.
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
OUT_TOL = {torch.float32: 2e-3 if GPU else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
PRODUCT_TOL = dict(atol=2e-3, rtol=2e-3) if GPU else dict(atol=2e-6, rtol=1e-3)
CPU_PATH_TOL = dict(atol=2e-6, rtol=1e-4)


@dataclass
class Case:
    name: str
    B: int
    H: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype = torch.float32
    layout: str = "bhsd"
    mask: str | None = None          # "bool", "additive", "padding"
    causal: bool = False
    request: dict = field(default_factory=dict)


CASES = [
    Case("one-token", 1, 1, 1, 1, 1, 40, request=dict(stats=("entropy", "peak", "colsum"), keys=[0])),
    Case("63x63-d40-fp16", 2, 2, 2, 63, 63, 40, torch.float16,
         request=dict(heads="all", query_grid=(7, 9), query_pool=2, key_grid=(7, 9), key_pool=(3, 2),
                      stats=("entropy", "peak", "colsum"))),
    Case("111x300-d80-bf16-gqa", 1, 4, 2, 111, 300, 80, torch.bfloat16,
         request=dict(heads="mean", keys=[0, 7, 299, 150], queries=[0, 55, 110], stats=("colsum",))),
    Case("causal-63x111-d128-mqa", 1, 2, 1, 63, 111, 128, causal=True,
         request=dict(heads=[1], key_range=(10, 100), query_range=(5, 60), stats=("entropy", "peak"))),
    Case("bshd-bool-d72-fp16", 2, 2, 2, 47, 63, 72, torch.float16, layout="bshd", mask="bool",
         request=dict(heads="all", map=True, keys=list(range(0, 63, 3)), stats=("entropy", "peak", "colsum"))),
    Case("additive-d64-bf16", 1, 3, 3, 40, 77, 64, torch.bfloat16, mask="additive",
         request=dict(heads=[2, 0], query_grid=(5, 8), query_pool=3, key_range=(7, 77), key_grid=(2, 5, 7),
                      key_pool=(1, 2, 2), stats=("colsum", "entropy"))),
    Case("padding-d96", 2, 2, 2, 33, 50, 96, mask="padding",
         request=dict(heads="mean", keys=[1, 49], queries=[32], stats=("entropy", "peak", "colsum"))),
    # No one-pass product and no mask: the CPU path takes PyTorch's fused CPU flash forward here.
    Case("causal-90x40-bf16-fused-cpu-forward", 2, 2, 2, 90, 40, 64, torch.bfloat16, causal=True,
         request=dict(heads="all", queries=[0, 39, 89], query_grid=(9, 10), query_pool=3, map=True)),
    Case("d160-video-fp16", 1, 1, 1, 60, 37, 160, torch.float16,
         request=dict(query_grid=(3, 4, 5), query_pool=(2, 3, 2), stats=("colsum",))),
]


def make_inputs(c: Case):
    def rand(n_heads, n):
        shape = (c.B, n_heads, n, c.D) if c.layout == "bhsd" else (c.B, n, n_heads, c.D)
        return torch.randn(shape, device=DEVICE).to(c.dtype)

    q, k, v = rand(c.H, c.Nq), rand(c.Hk, c.Nk), rand(c.Hk, c.Nk)
    kw = {"is_causal": c.causal}
    if c.mask == "bool":
        m = torch.rand(c.B, 1, c.Nq, c.Nk, device=DEVICE) > 0.3
        m[0, 0, 3] = False  # one query sees no key at all: zeros, never NaN
        kw["attn_mask"] = m
    elif c.mask == "additive":
        m = torch.randn(c.Nq, c.Nk, device=DEVICE) * 2
        m[:, :5] = float("-inf")
        kw["attn_mask"] = m
    elif c.mask == "padding":
        kpm = torch.ones(c.B, c.Nk, dtype=torch.bool, device=DEVICE)
        kpm[0, 30:] = False
        kpm[1, :] = False  # a batch element with every key padded
        kw["key_padding_mask"] = kpm
    return q, k, v, kw


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_products_match_reference(case: Case, backend: str, poison_outputs):
    q, k, v, kw = make_inputs(case)
    request = MapRequest(**case.request)
    out, products = attncap.attention(q, k, v, request=request, layout=case.layout, backend=backend, **kw)
    ref_out, ref_products = attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request, layout=case.layout,
                                                **{n: (t.cpu() if isinstance(t, torch.Tensor) else t)
                                                   for n, t in kw.items()})
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (case.D,)
    assert not torch.isnan(out).any()
    tol = OUT_TOL[case.dtype]
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    assert set(products) == set(ref_products)
    for name, ref in ref_products.items():
        got = products[name]
        assert got.dtype == torch.float32, name
        assert got.shape == ref.shape, name
        assert not torch.isnan(got).any(), f"{name} has NaN (unwritten tile or masked row)"
        tol = CPU_PATH_TOL if backend == "torch" else PRODUCT_TOL
        torch.testing.assert_close(got.cpu().double(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_rows_are_zero(backend: str, poison_outputs):
    q, k, v = (torch.randn(1, 2, 16, 32, device=DEVICE) for _ in range(3))
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=DEVICE)
    mask[..., 5, :] = False
    req = MapRequest(heads="all", map=True, keys=[0, 1], queries=[5], stats=("entropy", "peak", "colsum"))
    out, p = attncap.attention(q, k, v, attn_mask=mask, request=req, backend=backend)
    assert torch.all(out[:, :, 5] == 0)
    assert torch.all(p["map"][:, :, 5] == 0) and torch.all(p["rows"] == 0)
    assert torch.all(p["tokens"][:, :, 5] == 0)
    assert torch.all(p["entropy"][:, :, 5] == 0) and torch.all(p["peak"][:, :, 5] == 0)
    assert not any(torch.isnan(t).any() for t in p.values())


def test_no_request_is_plain_attention(poison_outputs):
    q, k, v = (torch.randn(2, 3, 50, 64, device=DEVICE) for _ in range(3))
    out, products = attncap.attention(q, k, v, backend="triton")
    assert products == {}
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=OUT_TOL[torch.float32], rtol=OUT_TOL[torch.float32])


def test_small_workspace_chunks_give_the_same_products(monkeypatch):
    """The CPU path's query chunks must not change the result (bounded memory, same numbers)."""
    from attncap import cpu_path

    q, k, v = (torch.randn(1, 2, 77, 40) for _ in range(3))
    req = MapRequest(heads="all", query_grid=(7, 11), query_pool=2, keys=[1, 2], stats=("entropy", "colsum"))
    _, whole = attncap.attention(q, k, v, request=req, backend="torch")
    monkeypatch.setattr(cpu_path, "WORKSPACE_BYTES", 2 * 77 * 4 * 3 * 5)  # five query rows per chunk
    _, chunked = attncap.attention(q, k, v, request=req, backend="torch")
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_several_requests_share_one_forward(backend: str, poison_outputs):
    """Two relations of one joint [image, text] sequence, as SD3 has: one call, two product sets."""
    q, k, v = (torch.randn(1, 2, 30 + 6, 40, device=DEVICE) for _ in range(3))
    image_to_text = MapRequest(query_range=(0, 30), query_grid=(5, 6), key_range=(30, 36), keys=[31, 33])
    text_to_image = MapRequest(heads="all", query_range=(30, 36), key_range=(0, 30), key_grid=(5, 6), key_pool=2,
                               keys=[2, 31], stats=("entropy",))
    out, (a, b) = attncap.attention(q, k, v, request=[image_to_text, text_to_image], backend=backend)
    for request, got in ((image_to_text, a), (text_to_image, b)):
        _, ref = attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request)
        assert set(got) == set(ref)
        for name in ref:
            torch.testing.assert_close(got[name].cpu().double(), ref[name], **PRODUCT_TOL)


def test_a_thousand_tokens_through_the_kernels(poison_outputs):
    """Many tiles on both axes (1000 = 31 full blocks of 32 and a ragged one) with pooling."""
    q, k, v = (torch.randn(1, 1, 1000, 40, device=DEVICE) for _ in range(3))
    request = MapRequest(query_grid=(25, 40), key_grid=(25, 40), query_pool=3, key_pool=(2, 7), stats=("colsum", "entropy"))
    out, got = attncap.attention(q, k, v, request=request, backend="triton")
    ref_out, ref = attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=OUT_TOL[torch.float32], rtol=OUT_TOL[torch.float32])
    for name in ref:
        torch.testing.assert_close(got[name].cpu().double(), ref[name], **PRODUCT_TOL)


def reference_lse(q, k, c: Case, kw: dict, softcap: float | None = None) -> torch.Tensor:
    """float32 [B, H, Nq] natural-log LSE of the masked scores (capped first when softcap is set),
    -inf where a query sees no key."""
    if c.layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q, k = q.cpu().double(), k.cpu().double().repeat_interleave(c.H // c.Hk, dim=1)
    s = q @ k.transpose(-1, -2) * c.D ** -0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = kw.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask.cpu(), float("-inf"))
    elif mask is not None:
        s = s + mask.cpu().double()
    if kw.get("key_padding_mask") is not None:
        s = s.masked_fill(~kw["key_padding_mask"].cpu()[:, None, None, :], float("-inf"))
    if c.causal:
        s = s.masked_fill(~torch.ones(c.Nq, c.Nk, dtype=torch.bool).tril(), float("-inf"))
    return torch.logsumexp(s, -1).float().to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_maps_from_an_external_lse_match_reference(case: Case, backend: str, poison_outputs):
    """The hybrid path: another kernel's forward gave the LSE, attncap's map pass gives the maps."""
    q, k, v, kw = make_inputs(case)
    wanted = dict(case.request, keys=None, stats=tuple(s for s in case.request.get("stats", ()) if s == "colsum"))
    if wanted.get("queries") is None and not wanted["stats"] and wanted.get("map") is None:
        wanted["map"] = True
    request = MapRequest(**wanted)
    got = attncap.maps_from_lse(q, k, reference_lse(q, k, case, kw), request=request, layout=case.layout,
                                backend=backend, **kw)
    _, ref = attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request, layout=case.layout,
                                 **{n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()})
    assert set(got) == set(ref) and got
    for name in ref:
        assert not torch.isnan(got[name]).any(), name
        tol = CPU_PATH_TOL if backend == "torch" else PRODUCT_TOL
        torch.testing.assert_close(got[name].cpu().double(), ref[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_maps_from_lse_refuses_forward_products_and_bad_lse():
    q, k = (torch.randn(1, 2, 8, 16) for _ in range(2))
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match=r"\['keys', 'entropy'\].*attncap.attention"):
        attncap.maps_from_lse(q, k, lse, request=MapRequest(keys=[1], stats=("entropy",)))
    with pytest.raises(ValueError, match=r"lse must be float32 \[B, H, Nq\] = \(1, 2, 8\)"):
        attncap.maps_from_lse(q, k, lse[:, :1], request=MapRequest())
