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


class _Route:
    """A captured call's route for the op test: attncap's output, counting its calls."""

    def __init__(self):
        self.calls = 0

    def route(self, index, q, k, v, attn_mask, dropout_p, is_causal, scale, layout, cp):
        self.calls += 1
        return attncap.attention(q, k, v, scale=scale, attn_mask=attn_mask, is_causal=is_causal, layout=layout)[0]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_captured_call_op_passes_opcheck_and_falls_back_to_sdpa(layout):
    """attncap::captured_call (what a traced captured call records): opcheck with a route and with a
    number no route holds (then it is torch SDPA, as the call would have been without capture)."""
    q, k, v, mask, _, _ = inputs()
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    owner = _Route()
    ident = attncap.traced.register(owner)
    args = (q, k, v, mask, ident, 0, 0.0, False, 0.3, layout, False)
    torch.library.opcheck(torch.ops.attncap.captured_call.default, args)
    assert owner.calls > 0
    unrouted = torch.ops.attncap.captured_call(q, k, v, mask, torch.tensor(-1), 0, 0.0, False, 0.3, layout, False)
    t = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
    want = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(unrouted, t(want).contiguous(), atol=0, rtol=0)
    routed = torch.ops.attncap.captured_call(*args)
    torch.testing.assert_close(routed, unrouted, atol=1e-5, rtol=1e-5)


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
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_captured_model_call_makes_no_host_sync(compiled):
    """A captured diffusers model call on CUDA, after a warm-up call: its blocks (every captured
    attention call, the filing into a CPU store by a non-blocking copy to pinned memory) make no host
    synchronisation. The denoiser's pre-hook reads the timestep on the host once per model call, so
    the sync debug mode is on from the first block to the last."""
    model, inputs = _wan(2)
    model = model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if compiled:
        model.compile(backend="aot_eager")
    eager_store = _captured_run(model, inputs)[1]

    def strict(*_):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def relaxed(*_):
        torch.cuda.set_sync_debug_mode("default")

    hooks = [model.blocks[0].register_forward_pre_hook(strict), model.blocks[-1].register_forward_hook(relaxed)]
    try:
        outs, store = _captured_run(model, inputs)
    finally:
        relaxed()
        for hook in hooks:
            hook.remove()
    assert len(store.records) == len(eager_store.records) > 0
    for r, e in zip(store.records, eager_store.records):
        assert r.data.device.type == "cpu"
        torch.testing.assert_close(r.data, e.data, atol=1e-5, rtol=1e-5)


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


# ---- capture of compiled diffusers models --------------------------------------------------------
# Each denoiser is called directly (attncap.capture on the model: one call = one step) with fixed
# inputs, twice inside the block (the steps' records must not depend on compiled state). Compiled
# before the block and called once, so the block starts from a warm cache, as in use.

def _wan(layers: int = 1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # tests/tiny_transformers.py's tiny Wan with few blocks (compiling is the cost here)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=layers,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 6, 10, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g), return_dict=False)
    return model, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 4, 8))
    g = torch.Generator().manual_seed(1)
    h, w, text = 4, 6, 7
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), -1)
    inputs = dict(hidden_states=torch.randn(1, h * w, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                  pooled_projections=torch.randn(1, 24, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(text, 3), return_dict=False)
    return model, inputs


def _unet(classic: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        block_out_channels=(8,), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    if classic:  # probabilities from get_attention_scores: captured eagerly, between graphs
        from diffusers.models.attention_processor import AttnProcessor

        model.set_attn_processor(AttnProcessor())
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(2, 4, 6, 10, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(2, 7, 16, generator=g), return_dict=False)
    return model, inputs


MODELS = {"wan": _wan, "wan2": lambda: _wan(2), "flux": _flux, "unet": _unet, "unet_classic": lambda: _unet(True)}
import attncap.traced  # noqa: E402  (registers attncap::captured_call)

CAPTURED_CALL = (torch.ops.attncap.captured_call, torch.ops.attncap.captured_call.default)  # as Dynamo, as AOT records it


def _captured_run(model, inputs):
    with torch.no_grad(), attncap.capture(model, relations="all", pool=2, stats=("entropy", "colsum")) as store:
        outs = [model(**inputs)[0] for _ in range(2)]
    return outs, store


class GraphCalls:
    """A torch.compile backend that counts the compiled graphs that run (a model that runs whole takes
    one graph per call; regional compile: one per block) and, per graph compiled, its captured calls."""

    def __init__(self, name: str):
        self.inner = torch._dynamo.lookup_backend(name)
        self.calls = 0
        self.compiled: list[int] = []  # attncap::captured_call nodes of each graph compiled

    def __call__(self, gm, example_inputs):
        self.compiled.append(sum(node.target in CAPTURED_CALL for node in gm.graph.nodes))
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run

    def per_call(self, model, inputs) -> int:
        before = self.calls
        with torch.no_grad():
            model(**inputs)
        return self.calls - before


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# (model, backend, regional compile): whole and regional, aot_eager and inductor, dispatcher processors
# (Wan, Flux), a processor that calls SDPA itself (UNet) and a classic processor (probabilities from
# get_attention_scores, which stays eager). wan2's two identical blocks must share one compiled graph.
CASES = [("wan", "aot_eager", False), ("flux", "aot_eager", True), ("unet", "aot_eager", False),
         ("wan2", "inductor", True), ("unet_classic", "aot_eager", False)]


@pytest.mark.parametrize("name, backend, regional", CASES)
def test_compiled_model_capture_equals_eager_capture(name, backend, regional):
    model, inputs = MODELS[name]()
    with torch.no_grad():
        plain = model(**inputs)[0]
    eager_outs, eager_store = _captured_run(model, inputs)
    counting = GraphCalls(backend)
    if regional:
        model.compile_repeated_blocks(backend=counting)
    else:
        model.compile(backend=counting)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], plain, atol=1e-5, rtol=1e-5)
    graphs_per_call = counting.per_call(model, inputs)
    compiled_before, calls_before, breaks_before = len(counting.compiled), counting.calls, _graph_breaks()
    outs, store = _captured_run(model, inputs)
    for out, eager_out in zip(outs, eager_outs):
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)   # fp32 CPU: kernels' rounding
    key = lambda r: (r.layer, r.step, r.relation, r.kind, r.branch)  # noqa: E731
    assert [key(r) for r in store.records] == [key(r) for r in eager_store.records] and store.records
    for r, e in zip(store.records, eager_store.records):
        torch.testing.assert_close(r.data, e.data, atol=1e-5, rtol=1e-5, msg=lambda m, r=r: f"{key(r)}: {m}")
    in_block = counting.compiled[compiled_before:]
    if name != "unet_classic":
        # The attention stays in the graph: the model runs as many graphs per call as uncaptured (no
        # split), each block kind compiles once more (identical blocks share it), with the captured calls.
        assert _graph_breaks() == breaks_before
        assert counting.calls - calls_before == 2 * graphs_per_call
        assert len(in_block) == (2 if name == "flux" else 1) and all(in_block)
        # A second capture block reuses that graph: a capture costs one recompile per block kind, once.
        _captured_run(model, inputs)
        assert len(counting.compiled) == compiled_before + len(in_block)
    else:
        assert not any(in_block) and _graph_breaks() > breaks_before  # eager between graphs
    # After the block the model runs as before: as many graphs per call, and no captured call among them.
    compiled_after = len(counting.compiled)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], plain, atol=1e-5, rtol=1e-5)
    assert counting.per_call(model, inputs) == graphs_per_call, "the model still runs split after the block"
    assert not any(counting.compiled[compiled_after:])
    if name != "unet_classic":  # the original graphs are still valid: nothing recompiles
        assert len(counting.compiled) == compiled_after


def test_compiled_layer_attncap_cannot_route_is_an_error_not_a_silent_gap():
    """Under torch.compile too: a captured layer whose processor computes attention itself raises
    CaptureIncomplete naming it at the end of the block, and the other layers' records are kept."""
    from test_capture_backends import HandWrittenProcessor

    model, inputs = _unet()
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn.set_processor(HandWrittenProcessor())
    model.compile(backend="aot_eager")
    with torch.no_grad():
        model(**inputs)
        with pytest.raises(attncap.CaptureIncomplete, match="does not intercept") as err:
            with attncap.capture(model) as store:
                model(**inputs)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in str(err.value)
    assert store.records and all(not r.layer.endswith("transformer_blocks.0.attn2") or "down" not in r.layer
                                 for r in store.records)


def test_model_compiled_inside_the_block():
    """Compiled inside the capture block: the first graph is the captured one (attention in it), the
    records equal the eager capture's, and after the block the model compiles its plain graph once."""
    model, inputs = _flux()
    with torch.no_grad():
        plain = model(**inputs)[0]
    eager_store = _captured_run(model, inputs)[1]
    counting = GraphCalls("aot_eager")
    with torch.no_grad(), attncap.capture(model, relations="all", pool=2, stats=("entropy", "colsum")) as store:
        model.compile(backend=counting)
        outs = [model(**inputs)[0] for _ in range(2)]
    assert counting.compiled and all(counting.compiled)
    assert [(r.layer, r.relation, r.kind) for r in store.records] == \
        [(r.layer, r.relation, r.kind) for r in eager_store.records]
    for r, e in zip(store.records, eager_store.records):
        torch.testing.assert_close(r.data, e.data, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], plain, atol=1e-5, rtol=1e-5)
    inside = len(counting.compiled)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], plain, atol=1e-5, rtol=1e-5)
        model(**inputs)
    assert len(counting.compiled) == inside + 1 and not counting.compiled[-1]
