"""Property tests: attncap.attention and attncap.maps_from_lse against attncap.reference in float64 on
random cases (hypothesis), on the chunked torch path and on the Triton kernels (through the interpreter
on CPU), plus the NaN / inf policy (attncap.nonfinite) and empty batches on both backends.

A case draws shapes (batch, GQA head groups, awkward lengths, head dims), dtype, layout, a mask
(bool with fully masked rows, additive with -inf columns, key padding with an all-padded batch
element, causal), and a request (heads, query/key ranges, (t,) h, w grids, pools that need not
divide them, selected keys and queries, stats). Examples are bounded and derandomised: each test
runs the same examples on every run, seeded by ATTNCAP_FUZZ_SEED (printed in pytest's header; set
it to explore others). The Triton interpreter is slow, so its examples are few and tiny.
Tolerances are those of tests/test_products.py, for the reasons written there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import attncap
from attncap import MapRequest
from attncap.reference import attention_reference

from test_products import CPU_PATH_TOL, DEVICE, OUT_TOL, PRODUCT_TOL

FUZZ_SEED = int(os.environ.get("ATTNCAP_FUZZ_SEED", "17"))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fuzz(max_examples: int):
    """Bounded, derandomised hypothesis settings (no example database: every run replays the seed)."""
    def wrap(test):
        return seed(FUZZ_SEED)(settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                                        suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                               HealthCheck.too_slow])(test))
    return wrap


@dataclass
class Case:
    B: int
    H: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype
    layout: str
    mask: str | None
    request: dict
    seed: int


@st.composite
def axis(draw, prefix: str, max_grid: int):
    """A token axis: (length, request fields) with an optional range, grid and pool."""
    grid = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, max_grid)] * draw(st.integers(1, 3)))))
    n = 1 if grid is None else int(torch.tensor(grid).prod())
    if grid is None:
        n = draw(st.integers(1, max_grid * max_grid))
    before, after = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    fields = {}
    if before or after:
        fields[f"{prefix}_range"] = (before, before + n)
    if grid is not None:
        fields[f"{prefix}_grid"] = grid
        pool = draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(*[st.integers(1, 3)] * len(grid))))
        if pool is not None:
            fields[f"{prefix}_pool"] = pool
    return before + n + after, fields


@st.composite
def cases(draw, max_grid: int, dims: tuple[int, ...], max_batch: int = 2):
    Hk = draw(st.integers(1, 2))
    H = Hk * draw(st.integers(1, 3))
    nq, qfields = draw(axis("query", max_grid))
    nk, kfields = draw(axis("key", max_grid))
    request = {**qfields, **kfields}
    request["heads"] = draw(st.one_of(st.sampled_from(["mean", "all"]),
                                      st.lists(st.integers(0, H - 1), min_size=1, max_size=H, unique=True)))
    if draw(st.booleans()):
        request["keys"] = draw(st.lists(st.integers(0, nk - 1), min_size=1, max_size=min(nk, 6), unique=True))
    if draw(st.booleans()):
        request["queries"] = draw(st.lists(st.integers(0, nq - 1), min_size=1, max_size=min(nq, 4), unique=True))
    request["stats"] = tuple(draw(st.lists(st.sampled_from(["entropy", "peak", "colsum"]), max_size=3, unique=True)))
    request["map"] = draw(st.sampled_from([None, True]))
    mask = draw(st.sampled_from([None, "bool", "additive", "padding", "causal"]))
    return Case(draw(st.integers(1, max_batch)), H, Hk, nq, nk, draw(st.sampled_from(dims)),
                draw(st.sampled_from(DTYPES)), draw(st.sampled_from(["bhsd", "bshd"])), mask, request,
                draw(st.integers(0, 2**31 - 1)))


def make(c: Case):
    """q, k, v and the mask keywords of a case, from its own seed (reproducible from the printed example)."""
    g = torch.Generator().manual_seed(c.seed)

    def rand(heads, n):
        x = torch.randn(c.B, heads, n, c.D, generator=g).to(c.dtype)
        return (x if c.layout == "bhsd" else x.transpose(1, 2).contiguous()).to(DEVICE)

    q, k, v = rand(c.H, c.Nq), rand(c.Hk, c.Nk), rand(c.Hk, c.Nk)
    kw = {}
    if c.mask == "bool":
        m = torch.rand(c.B, 1, c.Nq, c.Nk, generator=g) > 0.4
        m[0, 0, c.Nq // 2] = False  # a query that sees no key: zeros
        kw["attn_mask"] = m.to(DEVICE)
    elif c.mask == "additive":
        m = torch.randn(c.Nq, c.Nk, generator=g) * 2
        m[:, : c.Nk // 3] = float("-inf")
        kw["attn_mask"] = m.to(DEVICE)
    elif c.mask == "padding":
        kpm = torch.rand(c.B, c.Nk, generator=g) > 0.3
        kpm[-1] = False  # a batch element with every key padded
        kw["key_padding_mask"] = kpm.to(DEVICE)
    elif c.mask == "causal":
        kw["is_causal"] = True
    return q, k, v, kw


def reference(c: Case, q, k, v, kw, request: MapRequest):
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return attention_reference(q.cpu(), k.cpu(), v.cpu(), request=request, layout=c.layout, **cpu)


def lse_of(c: Case, q, k, kw) -> torch.Tensor:
    """float32 [B, H, Nq] natural-log LSE of the masked scores in float64 (-inf for a fully masked query)."""
    q4, k4 = (q, k) if c.layout == "bhsd" else (q.transpose(1, 2), k.transpose(1, 2))
    s = q4.cpu().double() @ k4.cpu().double().repeat_interleave(c.H // c.Hk, 1).transpose(-1, -2) * c.D ** -0.5
    m = kw.get("attn_mask")
    if m is not None:
        s = s.masked_fill(~m.cpu(), float("-inf")) if m.dtype == torch.bool else s + m.cpu().double()
    if "key_padding_mask" in kw:
        s = s.masked_fill(~kw["key_padding_mask"].cpu()[:, None, None, :], float("-inf"))
    if kw.get("is_causal"):
        s = s.masked_fill(~torch.ones(c.Nq, c.Nk, dtype=torch.bool).tril(), float("-inf"))
    return torch.logsumexp(s, -1).float().to(DEVICE)


def check_attention(c: Case, backend: str) -> None:
    q, k, v, kw = make(c)
    request = MapRequest(**c.request)
    out, got = attncap.attention(q, k, v, request=request, layout=c.layout, backend=backend, **kw)
    ref_out, ref = reference(c, q, k, v, kw, request)
    tol = OUT_TOL[c.dtype]
    assert out.dtype == c.dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    check_products(got, ref, backend)


def check_products(got: dict, ref: dict, backend: str) -> None:
    assert set(got) == set(ref)
    tol = CPU_PATH_TOL if backend == "torch" else PRODUCT_TOL
    for name, want in ref.items():
        assert got[name].dtype == torch.float32 and got[name].shape == want.shape, name
        assert not torch.isnan(got[name]).any(), f"{name} has NaN"
        torch.testing.assert_close(got[name].cpu().double(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")


def check_maps_from_lse(c: Case, backend: str) -> None:
    q, k, v, kw = make(c)
    fields = dict(c.request, keys=None, stats=tuple(s for s in c.request["stats"] if s == "colsum"))
    if fields.get("queries") is None and not fields["stats"]:
        fields["map"] = True
    request = MapRequest(**fields)
    got = attncap.maps_from_lse(q, k, lse_of(c, q, k, kw), request=request, layout=c.layout, backend=backend, **kw)
    check_products(got, reference(c, q, k, v, kw, request)[1], backend)


@fuzz(max_examples=40)
@given(c=cases(max_grid=7, dims=(8, 40, 72, 128, 160)))
def test_torch_path_matches_reference(c: Case, poison_outputs):
    check_attention(c, "torch")


@fuzz(max_examples=25)
@given(c=cases(max_grid=7, dims=(8, 40, 96)))
def test_torch_maps_from_lse_match_reference(c: Case, poison_outputs):
    check_maps_from_lse(c, "torch")


# The interpreter runs every kernel program in Python: a dozen tiny cases (about half a second each).
@fuzz(max_examples=12)
@given(c=cases(max_grid=4, dims=(8, 16), max_batch=1))
def test_triton_kernels_match_reference(c: Case, poison_outputs):
    check_attention(c, "triton")


@fuzz(max_examples=6)
@given(c=cases(max_grid=4, dims=(8, 16), max_batch=1))
def test_triton_maps_from_lse_match_reference(c: Case, poison_outputs):
    check_maps_from_lse(c, "triton")


# ----------------------------------------------------------------------------------- NaN / inf policy
POISON = {  # where the non-finite value goes -> which (batch, head, query) rows it poisons, for H=2, Hk=1 / Nq=5
    "nan-q": lambda q, k, v, m: q[0, 1, 3].fill_(float("nan")),
    "inf-q": lambda q, k, v, m: q[0, 0, 0, 2].fill_(float("-inf")),
    "inf-k": lambda q, k, v, m: k[0, 0, 4, 1].fill_(float("inf")),
    "nan-mask": lambda q, k, v, m: m[0, 0, 2, 1].fill_(float("nan")),
    "posinf-mask": lambda q, k, v, m: m[0, 0, 1, 5].fill_(float("inf")),
    "nan-v": lambda q, k, v, m: v[0, 0, 2, 3].fill_(float("nan")),
}
EXPECTED_ROWS = {"nan-q": [(0, 1, 3)], "inf-q": [(0, 0, 0)], "inf-k": [(0, h, i) for h in (0, 1) for i in range(5)],
                 "nan-mask": [(0, h, 2) for h in (0, 1)], "posinf-mask": [(0, h, 1) for h in (0, 1)], "nan-v": []}


def _rows_mask(rows) -> torch.Tensor:
    bad = torch.zeros(2, 2, 5, dtype=torch.bool)
    for r in rows:
        bad[r] = True
    return bad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN arithmetic
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", list(POISON))
def test_nonfinite_inputs_poison_exactly_their_rows(where: str, backend: str):
    """The documented policy (attncap.nonfinite): NaN exactly where a poisoned row enters, on both backends,
    and every other value as if the poisoned rows were not there (they never leak into other rows)."""
    g = torch.Generator().manual_seed(FUZZ_SEED)
    q, k, v = (torch.randn(2, heads, n, 8, generator=g) for heads, n in ((2, 5), (1, 7), (1, 7)))
    mask = torch.randn(2, 1, 5, 7, generator=g)
    POISON[where](q, k, v, mask)
    bad = _rows_mask(EXPECTED_ROWS[where])
    request = MapRequest(heads="all", query_grid=(5,), query_pool=2, keys=[0, 5], queries=[1, 3],
                         stats=("entropy", "peak", "colsum"), map=True)
    out, got = attncap.attention(q, k, v, attn_mask=mask, request=request, backend=backend)
    lse_got = attncap.maps_from_lse(q, k, torch.zeros(2, 2, 5), attn_mask=mask, backend=backend,
                                    request=MapRequest(heads="all", query_grid=(5,), query_pool=2, queries=[1, 3],
                                                       stats=("colsum",), map=True))
    if where == "nan-v":
        assert torch.isnan(out).any() and not any(torch.isnan(t).any() for t in got.values())
        return
    assert torch.equal(torch.isnan(out).any(-1), bad) and not torch.isnan(out[~bad]).any()
    bins = torch.stack([bad[..., 0:2].any(-1), bad[..., 2:4].any(-1), bad[..., 4]], -1)   # pool 2 over 5 queries
    want = {"map": bins[..., None].expand(-1, -1, -1, 7), "tokens": bins[..., None].expand(-1, -1, -1, 2),
            "rows": bad[:, :, [1, 3], None].expand(-1, -1, -1, 7), "entropy": bins, "peak": bins,
            "colsum": bad.any(-1)[..., None].expand(-1, -1, 7)}
    for name, nan_at in want.items():
        assert torch.equal(torch.isnan(got[name]), nan_at), name
    for name in ("map", "rows", "colsum"):
        assert torch.equal(torch.isnan(lse_got[name]), want[name]), f"maps_from_lse {name}"
    # every value outside the poisoned rows is what the same inputs give with those rows made harmless
    clean_q, clean_k, clean_mask = (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (q, k, mask))
    _, ref = attention_reference(clean_q, clean_k, v, attn_mask=clean_mask, request=request)
    for name, nan_at in want.items():
        torch.testing.assert_close(got[name][~nan_at].double(), ref[name][~nan_at], **PRODUCT_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_empty_results(backend: str):
    q, k = torch.randn(0, 2, 5, 8), torch.randn(0, 1, 6, 8)
    request = MapRequest(heads="all", keys=[1], queries=[0], stats=("entropy", "peak", "colsum"), map=True)
    out, got = attncap.attention(q, k, k, request=request, backend=backend)
    assert out.shape == (0, 2, 5, 8)
    assert {n: tuple(t.shape) for n, t in got.items()} == {
        "map": (0, 2, 5, 6), "tokens": (0, 2, 5, 1), "rows": (0, 2, 1, 6), "entropy": (0, 2, 5), "peak": (0, 2, 5),
        "colsum": (0, 2, 6)}
    lse = attncap.maps_from_lse(q, k, torch.zeros(0, 2, 5), request=MapRequest(stats=("colsum",)), backend=backend)
    assert lse["colsum"].shape == (0, 1, 6)
