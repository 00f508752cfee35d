"""The torch path (attncap.cpu_path) beyond tests/test_products.py: tilings that split batches,
heads and queries, key axes the column order does not serve, any device, the LSE of PyTorch's CPU
flash forward.

Tolerances as in tests/test_products.py: the torch path accumulates in fp32 from the same rounded
inputs the float64 reference sees, so products agree to ~1e-6 relative (rtol 1e-4, atol 2e-6).
"""
from __future__ import annotations

import pytest
import torch

import attncap
from attncap import MapRequest, cpu_path
from attncap.layouts import plan_indices, plan_range
from attncap.reference import attention_reference

TOL = dict(atol=2e-6, rtol=1e-4)


def _check(got: dict, ref: dict, **tol) -> None:
    assert set(got) == set(ref)
    for name, want in ref.items():
        assert not torch.isnan(got[name]).any(), name
        torch.testing.assert_close(got[name].double(), want, **(tol or TOL), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tile_bytes, workspace", [(2**40, 2**40), (2 * 74 * 4 * 7, 2**40), (2 * 74 * 4 * 7, 400_000)],
                         ids=["one-tile", "split-batches-heads-rows", "split-with-kv-copies-per-tile"])
def test_two_relations_with_ragged_pools_any_tiling(monkeypatch, poison_outputs, tile_bytes, workspace):
    """A joint [image 7x9, text 11] sequence, GQA, two requests whose pooled key axes differ (the
    first orders the score columns, the second is gathered), heads in no order, and tiles that cut
    through batches, key heads and queries (7 rows of one key head's 2 query heads per tile); the
    K/V copies made once for all heads, or (a workspace too small for that) per tile."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(cpu_path, "WORKSPACE_BYTES", workspace)
    monkeypatch.setattr(cpu_path, "MIN_ROWS", 7)
    n = 63 + 11
    q = torch.randn(2, 6, n, 40)
    k, v = torch.randn(2, 3, n, 40), torch.randn(2, 3, n, 24)
    image = dict(query_range=(0, 63), query_grid=(7, 9), key_range=(0, 63), key_grid=(7, 9))
    first = MapRequest(heads="mean", query_pool=2, key_pool=(3, 2), keys=[63, 70], queries=[5, 62],
                       stats=("colsum", "entropy", "peak"), **image)
    second = MapRequest(heads=[4, 0, 5], query_range=(63, n), key_range=(0, 63), key_grid=(7, 9), key_pool=4,
                        stats=("colsum",))
    k_before, v_before = k.clone(), v.clone()
    out, (a, b) = attncap.attention(q, k, v, request=[first, second], backend="torch")
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # scaled and permuted copies, never in place
    for request, got in ((first, a), (second, b)):
        ref_out, ref = attention_reference(q, k, v, request=request)
        _check(got, ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", ["causal", "bool", "additive"])
def test_masked_rows_across_tiles(monkeypatch, poison_outputs, mask):
    """Masks with pooled keys (permuted columns) and small tiles; one query sees no key at all."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", 45 * 4 * 5)  # 5 rows of one head per tile
    monkeypatch.setattr(cpu_path, "MIN_ROWS", 5)
    q, k, v = (torch.randn(1, 2, 45, 32) for _ in range(3))
    kw = {"is_causal": True} if mask == "causal" else {}
    if mask == "bool":
        m = torch.rand(1, 2, 45, 45) > 0.4
        m[0, 1, 9] = False
        kw["attn_mask"] = m
    elif mask == "additive":
        m = torch.randn(45, 45)
        m[9] = float("-inf")
        kw["attn_mask"] = m
    request = MapRequest(heads="all", query_grid=(5, 9), query_pool=2, key_grid=(5, 9), key_pool=(2, 4),
                         queries=[9, 44], stats=("colsum", "entropy", "peak"))
    out, got = attncap.attention(q, k, v, request=request, backend="torch", **kw)
    ref_out, ref = attention_reference(q, k, v, request=request, **kw)
    _check(got, ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows_per_tile", [48, 7], ids=["one-tile", "tiles-cut-runs"])
def test_query_pooling_by_runs_any_tiling(monkeypatch, poison_outputs, rows_per_tile):
    """Queries pooled (2, 4) on a 6x8 grid come in runs of 4 rows per bin (summed by reshape before
    index_add_); tiles of 7 rows cut runs at both ends. float64 reference, GQA, two batches."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", 2 * 60 * 4 * rows_per_tile)  # both query heads of a key head
    monkeypatch.setattr(cpu_path, "MIN_ROWS", rows_per_tile)
    q, k, v = torch.randn(2, 4, 48, 72), torch.randn(2, 2, 60, 72), torch.randn(2, 2, 60, 40)
    request = MapRequest(heads="mean", map=True, query_range=(0, 48), query_grid=(6, 8), query_pool=(2, 4),
                         key_range=(0, 48), key_grid=(6, 8), key_pool=2, stats=("colsum", "entropy"))
    qp = plan_range(0, 48, (6, 8), (2, 4))
    job = cpu_path._MapJob(qp, qp, torch.zeros(1, 4, dtype=torch.int32), cpu_path._columns([], 60, q.device),
                           torch.arange(60), q.device)
    assert job.run == 4
    out, got = attncap.attention(q, k, v, request=request, backend="torch")
    ref_out, ref = attention_reference(q, k, v, request=request)
    _check(got, ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows_per_tile", [111, 40, 7], ids=["one-tile", "tiles-of-whole-bands", "tiles-cut-bands"])
def test_query_pooling_by_whole_bands(monkeypatch, poison_outputs, rows_per_tile):
    """Queries pooled (2, 4) on a 6x16 grid after 15 text tokens come in bands of 2 grid rows (32
    tokens, 4 bins): a tile's whole bands are summed by reshape (_MapJob._add_bands), the cut ones
    by runs. Tiles of 40 rows hold one whole band and cut others; tiles of 7 hold none. Head means
    and every head, keys pooled on the same grid or text keys unpooled, GQA; float64 reference."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", 2 * 111 * 4 * rows_per_tile)  # both query heads of a key head
    monkeypatch.setattr(cpu_path, "MIN_ROWS", rows_per_tile)
    q, k, v = torch.randn(2, 4, 111, 40), torch.randn(2, 2, 111, 40), torch.randn(2, 2, 111, 24)
    image = dict(query_range=(15, 111), query_grid=(6, 16), query_pool=(2, 4))
    requests = [MapRequest(heads="mean", map=True, key_range=(15, 111), key_grid=(6, 16), key_pool=4,
                           stats=("colsum", "entropy"), **image),
                MapRequest(heads="all", map=True, key_range=(0, 15), **image)]
    qp = plan_range(15, 111, (6, 16), (2, 4))
    job = cpu_path._MapJob(qp, qp, torch.zeros(1, 4, dtype=torch.int32), cpu_path._columns([], 111, q.device),
                           torch.arange(111), q.device)
    assert job.band == (32, 2, 4, 4, 0)
    ragged = plan_range(15, 111, (6, 16), (4, 4))  # a last band of 2 grid rows: runs and index_add_ only
    assert cpu_path._MapJob(ragged, ragged, torch.zeros(1, 4, dtype=torch.int32), cpu_path._columns([], 111, q.device),
                            torch.arange(111), q.device).band is None
    out, got = attncap.attention(q, k, v, request=requests, backend="torch")
    for request, products in zip(requests, got):
        ref_out, ref = attention_reference(q, k, v, request=request)
        _check(products, ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


def test_column_order_pools_ragged_bins_by_slot():
    """The pooled key axis orders the columns by bin size, the bins of one size slot by slot, and
    pool() sums each bin's own keys, whatever sizes the bins have (a 5x7 grid in 2x3 bins)."""
    kp = plan_range(3, 38, (5, 7), (2, 3))
    cols = cpu_path._columns([(None, kp, None)], 40, torch.device("cpu"))
    assert sorted(cols.token.tolist()) == list(range(40))
    x = torch.randn(2, 40, dtype=torch.float64)
    got = cols.bin_order(cols.pool(x[:, cols.token]))
    want = torch.zeros(2, kp.nbins, dtype=torch.float64).index_add_(1, kp.bin_of_slot.long(), x[:, kp.perm.long()])
    torch.testing.assert_close(got, want)
    assert [(size, n) for _, size, n in cols.groups] == [(6, 4), (3, 2), (2, 2), (1, 1)]  # short last row, column


def test_runs_on_any_device_without_reading_it_back():
    """On the meta device (shapes only, no values) every op must exist and nothing may be read to
    the host: all per-call tensors are made on the inputs' device from host plan tables."""
    dev = torch.device("meta")
    q, k, v = torch.empty(1, 4, 30, 16, device=dev), torch.empty(1, 2, 30, 16, device=dev), \
        torch.empty(1, 2, 30, 8, device=dev)
    out = torch.empty(1, 4, 30, 8, device=dev)
    qp, kp = plan_range(0, 30, (5, 6), (2, 2)), plan_range(0, 30, (5, 6), (3, 2))
    rows = plan_indices(torch.tensor([1, 29]))
    heads = torch.arange(4, dtype=torch.int32)[None, :]
    lse, tokens, ent, peak, maps = cpu_path.forward(
        q, k, v, out, 0.25, selected=torch.tensor([0, 7], device=dev), want_stats=True,
        maps=[(qp, kp, heads), (rows, kp, heads)], is_causal=True)
    assert [tuple(m.shape) for m in maps] == [(1, 1, qp.nbins, kp.nbins), (1, 1, 2, kp.nbins)]
    assert tokens.shape == (1, 4, 30, 2) and ent.shape == peak.shape == lse.shape == (1, 4, 30)
    assert all(t.device == dev for t in (lse, tokens, ent, peak, *maps))
    again = cpu_path.maps_from_lse(q, k, lse, 0.25, [(qp, kp, heads)], is_causal=True)
    assert again[0].shape == maps[0].shape and again[0].device == dev


def test_an_op_without_a_kernel_names_the_device(monkeypatch):
    """torch raises NotImplementedError for an op a backend lacks (MPS: 'not currently implemented
    for the MPS device'); the torch path says which device and what to do."""
    def missing(self, *args, **kwargs):
        raise NotImplementedError(f"Could not run 'aten::exp2_' with arguments from the '{self.device.type}' backend")

    monkeypatch.setattr(torch.Tensor, "exp2_", missing)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(NotImplementedError, match=r"no kernel on device 'cpu'.*aten::exp2_.*move q, k, v"):
        attncap.attention(q, q, q, request=MapRequest(), backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maps_from_the_lse_of_pytorchs_cpu_flash_forward(dtype, poison_outputs):
    """The hybrid path on CPU: the LSE from torch's fused CPU flash forward (sdpa_with_lse) is what
    maps_from_lse needs. Causal, so early queries see few keys. For bf16 inputs that kernel's
    reduced-precision products leave the LSE ~6e-5 off (measured), which P = exp(S - LSE) takes
    on as relative error: 3e-4 there, the fp32 tolerances otherwise."""
    q, k, v = (torch.randn(2, 3, 50, 40).to(dtype) for _ in range(3))
    out, lse = cpu_path.sdpa_with_lse(q, k, v, is_causal=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 50)
    s = (q.double() @ k.double().transpose(-1, -2)) * 40 ** -0.5
    s = s.masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(), float("-inf"))
    lse_tol = 1e-5 if dtype == torch.float32 else 3e-4
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=lse_tol, rtol=lse_tol)
    request = MapRequest(heads="all", query_grid=(5, 10), query_pool=2, key_grid=(5, 10), key_pool=3,
                         queries=[0, 49], stats=("colsum",))
    got = attncap.maps_from_lse(q, k, lse, request=request, is_causal=True, backend="torch")
    _, ref = attention_reference(q, k, v, request=request, is_causal=True)
    _check(got, ref, **({} if dtype == torch.float32 else dict(atol=2e-6, rtol=3e-4)))


def test_sdpa_with_lse_refuses_a_device_without_such_op():
    q = torch.empty(1, 1, 4, 8, device="meta")
    with pytest.raises(ValueError, match=r"device 'meta'.*attncap.attention"):
        cpu_path.sdpa_with_lse(q, q, q)


@pytest.mark.parametrize("heads", ["mean", "all", [3, 0]])
@pytest.mark.parametrize("tile_rows", [111, 7], ids=["one-row-block", "rows-and-heads-split"])
def test_unpooled_maps_start_empty_and_are_written_by_each_rows_first_head(monkeypatch, poison_outputs, heads,
                                                                         tile_rows):
    """An unpooled map whose values come from one head or from every head starts as torch.empty
    (NaN here) and the first head of each row block writes it (cpu_path._MapJob.writes_first): with
    tiles of one key head's query heads and 7 rows, every row block is written once and then added
    to. GQA; the key range a slice of the columns; peak without entropy (one exp2 buffer)."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", 2 * 80 * 4 * tile_rows)
    monkeypatch.setattr(cpu_path, "MIN_ROWS", tile_rows)
    q, k, v = torch.randn(2, 4, 111, 72), torch.randn(2, 2, 80, 72), torch.randn(2, 2, 80, 40)
    request = MapRequest(heads=heads, map=True, query_range=(5, 104), key_range=(3, 77), stats=("peak",))
    out, got = attncap.attention(q, k, v, request=request, backend="torch")
    ref_out, ref = attention_reference(q, k, v, request=request)
    _check(got, ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [list(range(3, 9)), [1, 2, 5, 6, 9], [0, 2, 4, 6, 8, 10, 40]],
                         ids=["one-run", "three-runs", "gathered"])
@pytest.mark.parametrize("pooled_keys", [False, True], ids=["identity-columns", "slot-major-columns"])
def test_token_columns_sliced_by_runs_or_gathered(monkeypatch, poison_outputs, keys, pooled_keys):
    """Selected keys in at most MAX_RUNS runs of consecutive score columns are sliced from each tile,
    more are gathered; with a pooled key axis the columns are in slot-major order, so consecutive
    tokens are no longer consecutive columns. Both against the float64 reference, tiles of 7 rows."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", 2 * 48 * 4 * 7)
    monkeypatch.setattr(cpu_path, "MIN_ROWS", 7)
    q, k, v = torch.randn(1, 2, 63, 40), torch.randn(1, 2, 48, 40), torch.randn(1, 2, 48, 40)
    pool = dict(key_range=(0, 48), key_grid=(6, 8), key_pool=2, map=True) if pooled_keys else {}
    request = MapRequest(heads="all", keys=keys, **pool)
    _, got = attncap.attention(q, k, v, request=request, backend="torch")
    _, ref = attention_reference(q, k, v, request=request)
    _check(got, ref)
    plan = cpu_path._columns([(None, plan_range(0, 48, (6, 8), (2, 2)), None)] if pooled_keys else [], 48, q.device)
    found = plan.selection(torch.tensor(keys, dtype=torch.int32))
    columns = plan.pos[torch.tensor(keys)]
    runs = 1 + int((columns.diff() != 1).sum())
    assert isinstance(found, torch.Tensor) == (runs > cpu_path.MAX_RUNS)
    if not isinstance(found, torch.Tensor):  # the runs cover the selection in order
        assert torch.cat([torch.arange(first, first + n) for first, n, _ in found]).tolist() == columns.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_copies_made_once_per_block(monkeypatch, dtype):
    """When the keys and values must be copied (permuted for a pooled key axis; bf16: cast too)
    and the workspace is too small to copy every head at once, each block of key heads is copied
    once: tiles then take a block's rows one after another (heads vary fastest otherwise, and a copy
    per tile cost ~0.13x SDPA at H24 N4096). Products still match the reference."""
    monkeypatch.setattr(cpu_path, "TILE_BYTES", 64 * 4 * 9)   # 9 rows of one head per tile
    monkeypatch.setattr(cpu_path, "WORKSPACE_BYTES", 60_000)  # K/V of all 4 heads (82 KB) do not fit a quarter
    monkeypatch.setattr(cpu_path, "MIN_ROWS", 9)
    made = []
    real = cpu_path._KV._copies
    monkeypatch.setattr(cpu_path._KV, "_copies", lambda self, *block: made.append(block) or real(self, *block))
    q, k, v = (torch.randn(1, 4, 64, 40).to(dtype) for _ in range(3))
    request = MapRequest(heads="mean", query_grid=(8, 8), query_pool=2, key_grid=(8, 8), key_pool=2,
                         stats=("colsum",))
    _, got = attncap.attention(q, k, v, request=request, backend="torch")
    assert sorted(made) == [(0, 1, h, h + 1) for h in range(4)]
    _, ref = attention_reference(q, k, v, request=request)
    _check(got, ref)  # bf16 inputs: the reference sees the same rounded values, the path adds in fp32


def test_retained_tile_buffers_serve_calls_in_and_out_of_inference_mode():
    """The CPU tile buffers kept between calls (cpu_path._buffers) are first made inside
    torch.inference_mode here; a later plain call still writes them (an inference tensor could not
    be updated in place outside inference mode)."""
    cpu_path._RETAINED.block = None
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    request = MapRequest(heads="mean", stats=("entropy",))
    with torch.inference_mode():
        attncap.attention(q, k, v, request=request, backend="torch")
    out, got = attncap.attention(q, k, v, request=request, backend="torch")
    ref_out, ref = attention_reference(q, k, v, request=request)
    _check(got, ref)


def _record_passes(monkeypatch) -> list[tuple[int | None, int]]:
    """(workspace_bytes, tiles) of every pass the torch path makes from now on."""
    seen, real = [], cpu_path._pass
    def spy(*args):
        size, tiles, whole = real(*args)
        seen.append((args[6], len(tiles)))
        return size, tiles, whole
    monkeypatch.setattr(cpu_path, "_pass", spy)
    return seen


def test_workspace_bytes_bounds_the_tiles_of_attention_and_maps_from_lse(monkeypatch, poison_outputs):
    """The public workspace_bytes reaches the torch path: a 60 kB bound cuts a call that one tile
    holds by default into many (K/V copies per key head: all of them would not fit a quarter of it),
    and the products still match the float64 reference, from attncap.attention and maps_from_lse."""
    seen = _record_passes(monkeypatch)
    q, k, v = (torch.randn(1, 2, 111, 40) for _ in range(3))
    request = MapRequest(heads="mean", query_grid=(3, 37), key_grid=(3, 37), query_pool=2, key_pool=3,
                         stats=("colsum", "entropy"))
    attncap.attention(q, k, v, request=request, backend="torch")
    out, got = attncap.attention(q, k, v, request=request, backend="torch", workspace_bytes=60_000)
    (default, one), (bounded, many) = seen
    assert default is None and one == 1 and bounded == 60_000 and many >= 8, seen
    ref_out, ref = attention_reference(q, k, v, request=request)
    _check(got, ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    lse = cpu_path.sdpa_with_lse(q, k, v)[1]
    maps_only = MapRequest(heads="mean", query_grid=(3, 37), key_grid=(3, 37), query_pool=2, key_pool=3,
                           stats=("colsum",))
    got = attncap.maps_from_lse(q, k, lse, request=maps_only, backend="torch", workspace_bytes=60_000)
    assert seen[-1][0] == 60_000 and seen[-1][1] >= 8
    _check(got, attention_reference(q, k, v, request=maps_only)[1])


@pytest.mark.parametrize("workspace, exc, words", [
    ("64MiB", TypeError, r"workspace_bytes must be a number of bytes \(an int"),
    (True, TypeError, r"workspace_bytes must be a number of bytes"),
    (-1, ValueError, r"workspace_bytes must be positive"),
    (1000, ValueError, rf"workspace_bytes=1000 is too small for this call: .* take {3 * 111 * 4 + 2 * 111 * 40 * 4} bytes; "
                       "pass at least that"),
])
def test_a_workspace_that_cannot_work_is_refused_before_any_work(monkeypatch, workspace, exc, words):
    """Wrong types and values name the argument; a bound below the smallest tile (one query row of one
    key head: 3 buffers of 111 fp32 scores, its permuted K and V, 2 x 111 x 40 x 4 bytes) names the
    least that works. No score is computed first."""
    def no_scores(*args, **kwargs):
        raise AssertionError("a score tile was computed before the error")
    monkeypatch.setattr(cpu_path, "_scores", no_scores)
    q, k, v = (torch.randn(1, 2, 111, 40) for _ in range(3))
    request = MapRequest(heads="mean", query_grid=(3, 37), key_grid=(3, 37), query_pool=2, key_pool=3)
    with pytest.raises(exc, match=words):
        attncap.attention(q, k, v, request=request, backend="torch", workspace_bytes=workspace)


def test_capture_hands_workspace_bytes_to_every_captured_call(monkeypatch):
    """attncap.capture(..., workspace_bytes=) is the bound of each call it captures."""
    seen = _record_passes(monkeypatch)

    class Attn(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    model = Attn()
    with attncap.capture(model, layout=[("image", 64, (8, 8))], relations="image->image", pool=2,
                         workspace_bytes=3 * 2**20) as store:
        model(torch.randn(1, 2, 64, 16))
    assert [r.kind for r in store] == ["map"]
    assert seen and all(w == 3 * 2**20 for w, _ in seen), seen
