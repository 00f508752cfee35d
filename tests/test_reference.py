"""The naive reference itself: against torch SDPA, and every product against its definition."""
import math

import pytest
import torch
import torch.nn.functional as F

from attncap.reference import attention_reference, normalize_pool, pool_matrix
from attncap.request import MapRequest


def _qkv(B=2, H=4, Hk=4, Nq=13, Nk=11, D=16, Dv=None):
    q = torch.randn(B, H, Nq, D, dtype=torch.float64)
    k = torch.randn(B, Hk, Nk, D, dtype=torch.float64)
    v = torch.randn(B, Hk, Nk, Dv or D, dtype=torch.float64)
    return q, k, v


def _sdpa(q, k, v, **kw):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **kw)


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("Nq,Nk", [(13, 11), (7, 19)], ids=lambda n: str(n))
@pytest.mark.parametrize("case", ["plain", "scale", "bool", "additive", "causal"])
def test_output_matches_sdpa(case, Nq, Nk):
    q, k, v = _qkv(Nq=Nq, Nk=Nk, Dv=24)
    kw = {}
    if case == "scale":
        kw["scale"] = 0.3
    elif case == "bool":
        mask = torch.rand(2, 1, Nq, Nk) > 0.3
        mask[..., 0] = True  # no fully masked rows: SDPA's answer there differs across versions
        kw["attn_mask"] = mask
    elif case == "additive":
        kw["attn_mask"] = torch.randn(Nq, Nk, dtype=torch.float64)
    elif case == "causal":
        kw["is_causal"] = True
    out, products = attention_reference(q, k, v, **kw)
    assert products == {} and out.dtype == torch.float64 and out.shape == (2, 4, Nq, 24)
    _assert_close(out, _sdpa(q, k, v, **kw))


def test_causal_top_left_when_nq_exceeds_nk():
    q, k, v = _qkv(Nq=9, Nk=5)
    out, _ = attention_reference(q, k, v, is_causal=True)
    p = torch.softmax((q @ k.transpose(-1, -2)) * 16 ** -0.5 + torch.full((9, 5), -math.inf).triu(1), -1)
    _assert_close(out, p @ v)


def test_gqa_bshd_and_key_padding():
    q, k, v = _qkv(H=6, Hk=2, Nq=10, Nk=12)
    pad = torch.rand(2, 12) > 0.4
    pad[:, 3] = True
    mask = pad[:, None, None, :].expand(2, 6, 10, 12)
    expected = _sdpa(q, k, v, attn_mask=mask)
    out, _ = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 key_padding_mask=pad, layout="bshd")
    assert out.shape == (2, 10, 6, 16)
    _assert_close(out, expected.transpose(1, 2))


def test_fully_masked_row_is_zero_not_nan():
    q, k, v = _qkv(Nq=6, Nk=8)
    mask = torch.ones(6, 8, dtype=torch.bool)
    mask[2] = False
    additive = torch.zeros(6, 8, dtype=torch.float64)
    additive[4] = -math.inf
    req = MapRequest(heads="all", map=True, keys=[0, 5], queries=[2, 4], stats=("entropy", "peak", "colsum"))
    for m in (mask, additive):
        out, prods = attention_reference(q, k, v, attn_mask=m, request=req)
        row = 2 if m.dtype == torch.bool else 4
        assert not out.isnan().any() and (out[:, :, row] == 0).all()
        for name, x in prods.items():
            assert not x.isnan().any(), name
        assert (prods["map"][:, :, row] == 0).all() and (prods["rows"][:, :, [2, 4].index(row)] == 0).all()
        assert (prods["entropy"][:, :, row] == 0).all() and (prods["peak"][:, :, row] == 0).all()
    # key padding removing every key of one batch element
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1] = False
    out, prods = attention_reference(q, k, v, key_padding_mask=pad, request=req)
    assert (out[1] == 0).all() and (prods["colsum"][1] == 0).all() and not out.isnan().any()


def test_normalize_pool():
    assert normalize_pool((4, 6), 2) == (2, 2)
    assert normalize_pool((3, 4, 6), 2) == (1, 2, 2)
    assert normalize_pool((10,), 3) == (3,)
    assert normalize_pool((3, 4, 6), (3, 1, 2)) == (3, 1, 2)
    assert normalize_pool((4, 6), None) == (1, 1)
    assert normalize_pool(None, None) is None
    for grid, pool in [((4, 6), (2,)), ((4, 6), 0), (None, 2)]:
        with pytest.raises(ValueError):
            normalize_pool(grid, pool)


def test_pool_matrix_non_dividing_grid():
    a = pool_matrix(35, (5, 7), 2)
    assert a.shape == (35, 12) and a.dtype == torch.float64  # 3 x 4 bins
    counts = (a > 0).sum(0).reshape(3, 4)
    assert counts.tolist() == [[4, 4, 4, 2], [4, 4, 4, 2], [2, 2, 2, 1]]
    _assert_close(a.sum(0), torch.ones(12, dtype=torch.float64))  # each bin averages
    assert ((a > 0).sum(1) == 1).all()  # each token in exactly one bin
    # token (r, c) = 7r + c sits in bin (r // 2) * 4 + c // 2
    for r in range(5):
        for c in range(7):
            assert a[7 * r + c, (r // 2) * 4 + c // 2] > 0
    assert torch.equal(pool_matrix(6, None, None), torch.eye(6, dtype=torch.float64))
    assert torch.equal(pool_matrix(6, (2, 3), None), torch.eye(6, dtype=torch.float64))
    # 3-D grid, int pool leaves t alone
    assert pool_matrix(2 * 3 * 5, (2, 3, 5), 2).shape == (30, 2 * 2 * 3)
    with pytest.raises(ValueError):
        pool_matrix(10, (3, 3), 2)


def _probs(q, k, scale=None):
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(scale * q @ k.repeat_interleave(rep, 1).transpose(-1, -2), -1)


@pytest.mark.parametrize("heads,G", [("mean", 1), ("all", 6), ([4, 0, 3], 3)], ids=["mean", "all", "list"])
def test_unpooled_map_and_heads(heads, G):
    q, k, v = _qkv(H=6, Hk=3, Nq=9, Nk=7)
    _, prods = attention_reference(q, k, v, request=MapRequest(heads=heads))
    assert set(prods) == {"map"} and prods["map"].shape == (2, G, 9, 7)
    p = _probs(q, k)
    expected = {"mean": p.mean(1, keepdim=True), "all": p}.get(heads) if isinstance(heads, str) else p[:, heads]
    _assert_close(prods["map"], expected)


def test_product_shapes_and_definitions():
    B, H, Nq, Nk = 2, 4, 3 + 5 * 7 + 2, 4 + 2 * 3 * 5
    q, k, v = _qkv(B=B, H=H, Hk=2, Nq=Nq, Nk=Nk)
    req = MapRequest(heads="all", map=True, query_range=(3, 38), query_grid=(5, 7), query_pool=2,
                     key_range=(4, 34), key_grid=(2, 3, 5), key_pool=(1, 2, 2),
                     keys=[0, 7, 33, 2], queries=[1, 20, 39], stats=("entropy", "peak", "colsum"))
    _, prods = attention_reference(q, k, v, request=req)
    shapes = {name: tuple(x.shape) for name, x in prods.items()}
    assert shapes == {"map": (B, H, 12, 12), "tokens": (B, H, 12, 4), "rows": (B, H, 3, 12),
                      "colsum": (B, H, 12), "entropy": (B, H, 12), "peak": (B, H, 12)}
    assert all(x.dtype == torch.float64 for x in prods.values())
    p = _probs(q, k)
    a_q, a_k = pool_matrix(35, (5, 7), 2), pool_matrix(30, (2, 3, 5), (1, 2, 2))
    # first query bin = tokens (0,0),(0,1),(1,0),(1,1) of the grid; first key bin = t0, (0,0),(0,1),(1,0),(1,1)
    qbin = [3 + 0, 3 + 1, 3 + 7, 3 + 8]
    kbin = [4 + 0, 4 + 1, 4 + 5, 4 + 6]
    _assert_close(prods["map"][:, :, 0, 0], p[:, :, qbin][..., kbin].mean((-1, -2)))
    # tokens are the map's columns when the selected keys make up one-token bins
    _, unpooled_k = attention_reference(q, k, v, request=MapRequest(
        heads="all", map=True, query_range=(3, 38), query_grid=(5, 7), query_pool=2, keys=[0, 7, 33, 2]))
    _assert_close(prods["tokens"], unpooled_k["map"][..., [0, 7, 33, 2]])
    _assert_close(unpooled_k["tokens"], prods["tokens"])
    # rows: full probability rows of the selected queries over the key range, key-pooled
    _assert_close(prods["rows"], p[:, :, [1, 20, 39], 4:34] @ a_k)
    # colsum: attention received, summed over the query range then averaged per key bin
    _assert_close(prods["colsum"], p[:, :, 3:38, 4:34].sum(-2) @ a_k)
    counts_k = (a_k > 0).sum(0).to(torch.float64)
    _assert_close((prods["colsum"] * counts_k).sum(-1), p[:, :, 3:38, 4:34].sum((-1, -2)))
    ent = -(p * p.log()).sum(-1)[:, :, 3:38]
    _assert_close(prods["entropy"], ent @ a_q)
    _assert_close(prods["peak"], p.amax(-1)[:, :, 3:38] @ a_q)
    # normalisation over ALL keys: a row of the map never renormalises over the key range
    assert (prods["map"].sum(-1) < 1).all()


def test_entropy_of_uniform_row_is_log_nk():
    q = torch.zeros(1, 2, 5, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 11, 8, dtype=torch.float64), torch.randn(1, 2, 11, 8, dtype=torch.float64)
    _, prods = attention_reference(q, k, v, request=MapRequest(stats=("entropy", "peak", "colsum")))
    assert set(prods) == {"entropy", "peak", "colsum"}
    _assert_close(prods["entropy"], torch.full((1, 1, 5), math.log(11), dtype=torch.float64))
    _assert_close(prods["peak"], torch.full((1, 1, 5), 1 / 11, dtype=torch.float64))
    _assert_close(prods["colsum"], torch.full((1, 1, 11), 5 / 11, dtype=torch.float64))


def test_dtype_argument_and_unknown_stat():
    q, k, v = (t.float() for t in _qkv())
    out, prods = attention_reference(q, k, v, request=MapRequest(), dtype=torch.float32)
    assert out.dtype == prods["map"].dtype == torch.float32
    with pytest.raises(ValueError):
        attention_reference(q, k, v, request=MapRequest(stats=("mass",)))
