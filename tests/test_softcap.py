"""Logit softcapping (Gemma 2: scores = cap * tanh(scale * q.k / cap), before the masks) is exact:
every product of attncap.attention and attncap.maps_from_lse with ``softcap`` equals
attncap.reference in float64, on both backends, with test_products' cases and tolerances
(the kernels' tanh is 1 - 2 / (exp(2x) + 1) in fp32: ~cap * 6e-8 on a score, below fp32's
rounding of the score itself, so the fp32 tolerances hold). Outputs start as NaN.

CAP = 0.8 with unit-variance scores puts most scores in tanh's curved part: each case also checks
that the capped reference differs from the uncapped one by far more than the tolerance, so a
backend that ignored ``softcap`` would fail.
"""
from __future__ import annotations

import pytest
import torch

import attncap
import test_products as tp
from attncap import MapRequest
from attncap.reference import attention_reference

CAP = 0.8
CASES = [c for c in tp.CASES if c.name != "one-token"]  # one key: P = 1 whatever the cap


def _reference(q, k, v, case, request, kw, softcap):
    return attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request, layout=case.layout, softcap=softcap,
                               **{n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()})


def _assert_capping_matters(capped: dict, uncapped: dict) -> None:
    assert max((capped[n] - uncapped[n]).abs().max().item() for n in capped) > 1e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_softcapped_products_match_reference(case: tp.Case, backend: str, poison_outputs):
    q, k, v, kw = tp.make_inputs(case)
    request = MapRequest(**case.request)
    out, products = attncap.attention(q, k, v, request=request, layout=case.layout, backend=backend,
                                      softcap=CAP, **kw)
    ref_out, ref = _reference(q, k, v, case, request, kw, CAP)
    _assert_capping_matters(ref, _reference(q, k, v, case, request, kw, None)[1])
    assert not torch.isnan(out).any()
    tol = tp.OUT_TOL[case.dtype]
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    assert set(products) == set(ref)
    tol = tp.CPU_PATH_TOL if backend == "torch" else tp.PRODUCT_TOL
    for name in ref:
        assert not torch.isnan(products[name]).any(), name
        torch.testing.assert_close(products[name].cpu().double(), ref[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("63x63-d40-fp16", "causal-63x111-d128-mqa",
                                                                  "bshd-bool-d72-fp16", "additive-d64-bf16")],
                         ids=lambda c: c.name)
def test_softcapped_maps_from_lse_match_reference(case: tp.Case, backend: str, poison_outputs):
    q, k, v, kw = tp.make_inputs(case)
    request = MapRequest(**dict(case.request, keys=None, stats=("colsum",), map=True))
    got = attncap.maps_from_lse(q, k, tp.reference_lse(q, k, case, kw, CAP), request=request, layout=case.layout,
                                backend=backend, softcap=CAP, **kw)
    _, ref = _reference(q, k, v, case, request, kw, CAP)
    _assert_capping_matters(ref, _reference(q, k, v, case, request, kw, None)[1])
    tol = tp.CPU_PATH_TOL if backend == "torch" else tp.PRODUCT_TOL
    for name in ref:
        assert not torch.isnan(got[name]).any(), name
        torch.testing.assert_close(got[name].cpu().double(), ref[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("bad", [0.0, -50.0, float("inf"), float("nan"), True, "50"])
def test_softcap_must_be_a_positive_finite_number(bad):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"softcap must be a positive finite number.*or None"):
        attncap.attention(q, q, q, request=MapRequest(), softcap=bad)
    with pytest.raises(ValueError, match=r"softcap must be a positive finite number"):
        attncap.maps_from_lse(q, q, torch.zeros(1, 1, 4), softcap=bad)
