"""attncap's entry points under torch.compile and CUDA graphs.

attncap.attention and attncap.maps_from_lse are custom ops (torch.ops.attncap.*) with fake
implementations: they must compile with fullgraph=True for every product and return exactly what
the eager call returns (the compiled graph calls the same implementation on the same tensors, so
the comparison is exact). On CUDA a warmed-up call must make no host synchronisation and must be
capturable in a CUDA graph; those tests skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import attncap
from attncap import MapRequest
from attncap.ops import _encode
from attncap.validate import check_request, check_tensors

from conftest import GPU

pytestmark = pytest.mark.usefixtures("one_thread")

# Every product kind: a pooled map over all heads with token columns, rows and every statistic;
# colsum without a map over a key range for a head list (a second request of the same call).
EVERY_PRODUCT = [
    MapRequest(heads="all", query_grid=(4, 6), query_pool=(2, 4), keys=[1, 5, 30], queries=[0, 23],
               stats=("entropy", "peak", "colsum"), map=True),
    MapRequest(heads=[1], key_range=(4, 31), key_grid=(3, 9), key_pool=2, stats=("colsum",)),
]
# A single request on BSHD tensors with a boolean mask, key padding and causal masking.
MASKED = MapRequest(heads="mean", keys=[0, 2], stats=("entropy", "peak"))
LSE_MAPS = MapRequest(heads="all", queries=[3, 7], key_grid=(3, 11), key_pool=(1, 4), stats=("colsum",))


def calls(q, k, v, mask, kpm, lse):
    """Every entry point and product kind in one function: what the compiled tests trace."""
    out, products = attncap.attention(q, k, v, request=EVERY_PRODUCT)
    plain, nothing = attncap.attention(q, k, v)
    bshd = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    masked, masked_products = attncap.attention(*bshd, attn_mask=mask, key_padding_mask=kpm, is_causal=True,
                                                request=MASKED, layout="bshd")
    from_lse = attncap.maps_from_lse(q[:, :, :10], k, lse, attn_mask=mask[:10], request=LSE_MAPS)
    return out, products, plain, nothing, masked, masked_products, from_lse


def inputs():
    B, H, Nq, Nk, D = 2, 2, 24, 33, 16
    q, k, v = torch.randn(B, H, Nq, D), torch.randn(B, H, Nk, D), torch.randn(B, H, Nk, D)
    mask = torch.rand(Nq, Nk) > 0.3
    mask[5] = False  # a query that sees no key: zeros, also compiled
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[1, 20:] = False
    lse = torch.randn(B, H, 10)
    return q, k, v, mask, kpm, lse


def assert_same(got, want, path="result"):
    """Exactly equal nested results (tuples, lists, dicts of tensors)."""
    assert type(got) is type(want), path
    if isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, path
        assert torch.equal(got, want), f"{path} differs by {(got - want).abs().max().item()}"
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for name in want:
            assert_same(got[name], want[name], f"{path}[{name!r}]")
    else:
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_every_product_compiles_fullgraph_and_equals_eager(backend):
    args = inputs()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(calls, fullgraph=True, backend=counter)
    got = compiled(*args)
    assert_same(got, calls(*args))
    assert set(got[1][0]) == {"map", "tokens", "rows", "entropy", "peak", "colsum"} and set(got[1][1]) == {"colsum"}
    assert counter.frame_count == 1 and counter.op_count >= 4  # one graph holding the four op calls
    fresh = tuple(a.clone() for a in args)
    assert_same(compiled(*fresh), calls(*fresh))
    assert counter.frame_count == 1, "a second call with the same shapes recompiled"


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation against the real one, and AOT dispatch (torch.library.opcheck)."""
    q, k, v, mask, kpm, lse = inputs()
    shapes = check_tensors(q, k, v, "bhsd")[3]
    plans = _encode(tuple(check_request(r, shapes) for r in EVERY_PRODUCT))
    torch.library.opcheck(torch.ops.attncap.attention.default, (q, k, v, None, kpm, 0.25, False, "bhsd", "auto", plans))
    lse_plans = _encode((check_request(LSE_MAPS, check_tensors(q[:, :, :10], k, k, "bhsd")[3]),))
    torch.library.opcheck(torch.ops.attncap.maps_from_lse.default,
                          (q[:, :, :10], k, lse, mask[:10], None, 0.25, True, "bhsd", "auto", lse_plans))


def test_plans_are_built_once_per_call_shape(monkeypatch):
    """A second call with an equal request (a new object, as integrations make per call) reuses the
    cached index tensors: nothing is planned again."""
    from attncap import layouts

    q, k, v, _, _, _ = inputs()
    make = lambda: [MapRequest(**vars(r)) for r in EVERY_PRODUCT]  # noqa: E731
    _, first = attncap.attention(q, k, v, request=make())

    def boom(*a, **kw):
        raise AssertionError("planned again")

    monkeypatch.setattr(layouts, "plan_range", boom)
    monkeypatch.setattr(layouts, "plan_indices", boom)
    _, again = attncap.attention(q, k, v, request=make())
    assert_same(again, first)
    with pytest.raises(AssertionError, match="planned again"):  # another shape is another plan
        attncap.attention(q[:, :, :12], k, v, request=MapRequest(query_grid=(3, 4)))


def test_dynamic_shapes_specialise_instead_of_breaking():
    """dynamic=True (or a shape change, which makes Dynamo try dynamic sizes) still gives one graph
    per call shape: the sizes the plans hold are specialised."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    request = MapRequest(heads="all", keys=[1], stats=("entropy",))
    compiled = torch.compile(lambda q, k, v: attncap.attention(q, k, v, request=request), fullgraph=True,
                             backend=counter, dynamic=True)
    for n in (20, 28):
        q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
        assert_same(compiled(q, k, v), attncap.attention(q, k, v, request=request))
    assert counter.frame_count == 2


needs_cuda = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: host syncs and CUDA graphs exist only there")


def cuda_inputs():
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v


@needs_cuda
def test_cuda_call_makes_no_host_sync():
    """After the first call of a plan (which builds and uploads its index tensors), a call reads no
    device value on the host and copies nothing to the device: torch's sync debug mode raises otherwise."""
    q, k, v = cuda_inputs()
    mask = torch.rand(300, 300, device="cuda") > 0.2
    lse = torch.randn(2, 4, 300, device="cuda")
    request = MapRequest(heads="all", query_grid=(15, 20), query_pool=3, keys=[1, 5], queries=[0, 9],
                         stats=("entropy", "peak", "colsum"))
    lse_request = MapRequest(query_grid=(15, 20), query_pool=2, stats=("colsum",))
    attncap.attention(q, k, v, attn_mask=mask, request=request)
    attncap.maps_from_lse(q, k, lse, request=lse_request)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attncap.attention(q, k, v, attn_mask=mask, request=request)
        attncap.maps_from_lse(q, k, lse, request=lse_request)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_graph_replays_a_captured_call():
    """Static inputs, one warm-up call, capture, then replay with new input values: the graph's
    output and product buffers hold what an eager call on those values returns."""
    q, k, v = cuda_inputs()
    request = MapRequest(heads="mean", query_grid=(15, 20), query_pool=4, keys=[3, 7], stats=("entropy", "colsum"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attncap.attention(q, k, v, request=request)  # warm-up: compiles the kernels, builds the plans
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_products = attncap.attention(q, k, v, request=request)
    for _ in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        out, products = attncap.attention(q, k, v, request=request)
        assert_same((static_out, static_products), (out, products))
