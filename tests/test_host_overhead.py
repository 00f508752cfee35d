"""The caches and shortcuts that keep a captured call's host work small (issue 13) never change a result.

attncap.ops validates a request once per (request key, call sizes) and reuses the Plan for equal
requests; the key must tell apart requests Python calls equal but validation reads differently
(True == 1, 3.0 == 3), follow a list mutated between calls, and skip what it cannot key (tensors).
On the CPU the NaN policy first checks with one sum whether anything is non-finite; a finite sum
that overflows, a NaN lse or a +inf mask must still take the exact path. Plain eager calls run the
op's implementation directly; a call under a dispatch mode or needing gradients goes through the op.
"""
from __future__ import annotations

import pytest
import torch

import attncap
from attncap import MapRequest
from attncap.request import request_key

pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(nq: int = 12, nk: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 8, generator=g) for n in (nq, nk, nk))


def test_equal_looking_requests_of_other_types_are_validated_afresh():
    """A cached plan for keys=[1] or query_grid=(3, 4) must not answer keys=[True] or (3.0, 4), which
    Python calls equal (same hash) and validation refuses."""
    q, k, v = qkv()
    attncap.attention(q, k, v, request=MapRequest(keys=[1]))
    attncap.attention(q, k, v, request=MapRequest(query_grid=(3, 4), query_pool=2))
    with pytest.raises(TypeError, match="keys takes integers"):
        attncap.attention(q, k, v, request=MapRequest(keys=[True]))
    with pytest.raises(TypeError, match="query_grid takes integers"):
        attncap.attention(q, k, v, request=MapRequest(query_grid=(3.0, 4), query_pool=2))
    assert request_key(MapRequest(keys=[1])) != request_key(MapRequest(keys=[True]))
    assert request_key(MapRequest(keys=[1, 2])) == request_key(MapRequest(keys=(1, 2)))  # read alike


def test_a_list_mutated_between_calls_gives_the_new_selection():
    q, k, v = qkv()
    keys = [1, 2]
    request = MapRequest(keys=keys)
    first = attncap.attention(q, k, v, request=request)[1]["tokens"]
    keys[1] = 5
    again = attncap.attention(q, k, v, request=request)[1]["tokens"]
    fresh = attncap.attention(q, k, v, request=MapRequest(keys=[1, 5]))[1]["tokens"]
    assert torch.equal(again, fresh) and not torch.equal(again, first)


def test_tensor_fields_are_read_every_call():
    q, k, v = qkv()
    keys = torch.tensor([1, 2])
    request = MapRequest(keys=keys)
    assert request_key(request) is None
    attncap.attention(q, k, v, request=request)
    keys[1] = 6
    got = attncap.attention(q, k, v, request=request)[1]["tokens"]
    assert torch.equal(got, attncap.attention(q, k, v, request=MapRequest(keys=[1, 6]))[1]["tokens"])


def test_the_same_request_at_other_sizes_is_planned_for_those_sizes():
    request = MapRequest(heads="all", stats=("entropy",), map=True)
    for nq, nk in ((12, 7), (20, 7), (12, 9)):
        q, k, v = qkv(nq, nk)
        _, got = attncap.attention(q, k, v, request=request)
        assert got["map"].shape == (1, 2, nq, nk) and got["entropy"].shape == (1, 2, nq)
    with pytest.raises(ValueError, match="query_grid"):  # a grid that fitted 12 queries does not fit 20
        q, k, v = qkv(20, 7)
        attncap.attention(q, k, v, request=MapRequest(query_grid=(3, 4)))


def test_a_head_list_is_not_taken_for_a_mean_over_heads():
    """heads=[0] is one group of heads 0..0: it must not be read as the mean over all heads."""
    q, k, v = qkv()
    request = dict(query_grid=(3, 4), query_pool=2, keys=[3], stats=("entropy", "peak"))
    _, every = attncap.attention(q, k, v, request=MapRequest(heads="all", **request))
    _, first = attncap.attention(q, k, v, request=MapRequest(heads=[0], **request))
    _, mean = attncap.attention(q, k, v, request=MapRequest(heads="mean", **request))
    for name in ("tokens", "entropy", "peak"):
        torch.testing.assert_close(first[name], every[name][:, :1], rtol=0, atol=0)
        torch.testing.assert_close(mean[name], every[name].mean(1, keepdim=True), rtol=1e-6, atol=1e-7)


REQUEST = MapRequest(heads="all", query_grid=(3, 4), query_pool=2, keys=[0, 3], queries=[1], stats=("colsum",),
                     map=True)


def test_a_finite_sum_that_overflows_poisons_nothing():
    """Every value finite, the float32 sum of k infinite: the quick check says 'maybe', the exact
    path finds no poisoned row (q = 0, so every score is 0: uniform attention)."""
    q, _, v = qkv()
    k = torch.full((1, 2, 7, 8), 3e38)
    out, got = attncap.attention(torch.zeros_like(q), k, v, request=REQUEST)
    assert not torch.isnan(out).any() and not any(torch.isnan(x).any() for x in got.values())
    torch.testing.assert_close(got["map"], torch.full_like(got["map"], 1 / 7))


def test_a_nan_lse_or_an_inf_mask_alone_still_poisons_its_row():
    q, k, _ = qkv()
    lse = torch.zeros(1, 2, 12)
    lse[0, 1, 5] = float("nan")
    request = MapRequest(heads="all", queries=[5, 6], stats=("colsum",))
    got = attncap.maps_from_lse(q, k, lse, request=request)
    assert torch.isnan(got["rows"][0, 1, 0]).all() and not torch.isnan(got["rows"][0, 0]).any()
    assert not torch.isnan(got["rows"][0, 1, 1]).any()
    mask = torch.zeros(12, 7)
    mask[4, 2] = float("inf")
    out, _ = attncap.attention(q, k, k, attn_mask=mask, request=REQUEST)
    assert torch.equal(torch.isnan(out).any(-1)[0], torch.arange(12).eq(4).expand(2, 12))


def test_calls_under_a_dispatch_mode_or_needing_gradients_go_through_the_op():
    """The direct path is for plain eager calls: FakeTensorMode (tracing) and inputs that require grad
    see the custom op, which gives fake shapes / refuses to differentiate as before."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attncap import ops

    with FakeTensorMode():
        q, k, v = (torch.empty(1, 2, n, 8) for n in (12, 7, 7))
        out, got = attncap.attention(q, k, v, request=REQUEST)
        assert out.shape == (1, 2, 12, 8) and got["map"].shape == (1, 2, 4, 7)
    q, k, v = qkv()
    assert ops._plain_eager(q, k, v, None) and not ops._plain_eager(q.requires_grad_(), k, v)


def test_a_new_plan_reaches_its_device_in_one_copy(monkeypatch):
    """A call's index tensors go to the device in one copy (one synchronisation on CUDA for a new plan,
    not one per tensor), with the dtypes, shapes and values built on the host, 16-byte aligned."""
    from attncap import ops
    from attncap.validate import check_tensors

    q, k, v = qkv()
    call = ops._checked((REQUEST, MapRequest(heads=[1], keys=[2], stats=("colsum", "entropy"))),
                        check_tensors(q, k, v, "bhsd")[3])
    host = ops._tables(call.text, torch.device("cpu"))
    copies, to = [], torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: copies.append(a) or to(self, *a, **kw))
    moved = ops._tables(call.text, torch.device("meta"))
    monkeypatch.undo()
    assert [a for a in copies if not isinstance(a[0], torch.dtype)] == [(torch.device("meta"),)]
    found, placed = [], []
    ops._tensors(host.tables + (host.selected,), found.append)
    ops._tensors(moved.tables + (moved.selected,), placed.append)
    assert len(found) > 10 and all(t.device.type == "meta" for t in placed)
    assert [(t.dtype, t.shape) for t in placed] == [(t.dtype, t.shape) for t in found]
    for got, want in zip(ops._upload(found, torch.device("cpu")), found):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.data_ptr() % 16 == 0  # as a fresh allocation: kernels see the same pointer alignment
