"""The kernels on a GPU at model shapes, against the float64 reference (skipped without CUDA).

Checks that fail on moderate bugs:
* products by relative norm, ||got - ref|| / ||ref||, and by the largest error relative to the
  largest value: all-zero or half-written products score 1, far above the bounds;
* peaky scores (q scaled 3.5x: a few keys take most of each row, most probabilities are tiny),
  40-head loops, GQA, masks with fully masked rows, key padding with a fully padded batch element,
  causal, > 32 selected keys, head dims 40 to 256, fp32;
* out by flash-attention's rule: its error <= 2x the error of PyTorch's own SDPA at the same
  precision, both against the float64 reference (fp32: within 1e-5, exact dots).
Bounds by arithmetic: tokens, entropy and peak are fp32 from the final m and l (2e-5); maps pool
2^14 P through fp16 one-hot products for 16-bit inputs (two roundings of 2^-11: 1e-3) and in fp32
for fp32 inputs (2e-5). The reference runs per group of heads so its [B, h, Nq, Nk] float64
probabilities fit in memory at 32,760 tokens.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncap
from attncap import MapRequest
from attncap.reference import attention_reference

from conftest import GPU

pytestmark = pytest.mark.skipif(not GPU, reason="needs CUDA (make gpu-check runs these on a GPU machine)")

EXACT = 2e-5
POOLED = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
REFERENCE_BYTES = 24 * 2**30


def reference(q, k, v, request: MapRequest, **masks):
    """attention_reference in float64, a few heads at a time; head means averaged here."""
    H, group = q.shape[1], q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, 1) for t in (k, v))
    heads = list(range(H)) if request.heads in ("mean", "all") else list(request.heads)
    per_call = max(1, REFERENCE_BYTES // (3 * 8 * q.shape[0] * q.shape[2] * k.shape[2]))
    outs, parts = [], []
    mask = masks.get("attn_mask")
    for i in range(0, len(heads), per_call):
        idx = torch.tensor(heads[i:i + per_call], device=q.device)
        m = mask[:, idx] if mask is not None and mask.dim() == 4 and mask.shape[1] > 1 else mask
        req = MapRequest(**{**request.__dict__, "heads": "all"})
        out, prod = attention_reference(q[:, idx], k[:, idx], v[:, idx], request=req, **{**masks, "attn_mask": m})
        outs.append(out)
        parts.append(prod)
    products = {name: torch.cat([p[name] for p in parts], 1) for name in parts[0]}
    if request.heads == "mean":
        products = {name: t.mean(1, keepdim=True) for name, t in products.items()}
    full_out = torch.cat(outs, 1) if request.heads in ("mean", "all") else None
    return full_out, products


def assert_near(name: str, got: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    assert got.shape == ref.shape and not torch.isnan(got).any(), name
    diff = (got.double() - ref).abs()
    rel_norm = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    rel_max = (diff.max() / ref.abs().max().clamp_min(1e-30)).item()
    assert rel_norm <= bound and rel_max <= 4 * bound, f"{name}: relative norm {rel_norm:.2e}, max {rel_max:.2e} > {bound:.0e}"


def assert_out_by_flash_rule(out, q, k, v, ref_out, masks) -> None:
    """attncap's error <= 2x SDPA's at the same precision (rows that see no key: both zero)."""
    kw = dict(attn_mask=masks.get("attn_mask"), is_causal=masks.get("is_causal", False))
    if masks.get("key_padding_mask") is not None:
        pad = masks["key_padding_mask"][:, None, None, :]
        kw["attn_mask"] = pad if kw["attn_mask"] is None else kw["attn_mask"] & pad
    group = q.shape[1] // k.shape[1]
    torch_out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kw)
    seen = ref_out.abs().amax(-1, keepdim=True) > 0
    ours = ((out.double() - ref_out).abs() * seen).max().item()
    theirs = ((torch_out.double().nan_to_num() - ref_out).abs() * seen).max().item()
    if q.dtype == torch.float32:
        assert ours <= 1e-5, f"fp32 out error {ours:.2e}"
    else:
        assert ours <= 2 * theirs + 1e-6, f"out error {ours:.2e} > 2x SDPA's {theirs:.2e}"


def run_case(B, H, Hk, Nq, Nk, D, dtype, request: MapRequest, q_scale=3.5, **masks):
    q = torch.randn(B, H, Nq, D, device="cuda").mul(q_scale).to(dtype)
    k, v = (torch.randn(B, Hk, Nk, D, device="cuda").to(dtype) for _ in range(2))
    out, got = attncap.attention(q, k, v, request=request, **masks)
    ref_out, ref = reference(q, k, v, request, **masks)
    assert set(got) == set(ref)
    for name in ref:
        bound = POOLED[dtype] if name in ("map", "rows", "colsum") else EXACT
        assert_near(name, got[name], ref[name], bound)
    if ref_out is not None:
        assert_out_by_flash_rule(out, q, k, v, ref_out, masks)
    return out, got


SHAPES = [
    # name, B, H, Hk, Nq, Nk, D, dtype, request
    ("sd15-self-64x64", 1, 8, 8, 4096, 4096, 40, torch.float16,
     MapRequest(query_grid=(64, 64), query_pool=4, key_grid=(64, 64), key_pool=4, stats=("entropy", "peak", "colsum"))),
    ("sdxl-cross-128x128", 1, 10, 10, 16384, 77, 64, torch.float16,
     MapRequest(query_grid=(128, 128), query_pool=2, keys=list(range(1, 41)), stats=("entropy", "colsum"))),
    ("flux-joint-40-text-keys", 1, 24, 24, 4608, 4608, 128, torch.bfloat16,
     MapRequest(query_range=(512, 4608), query_grid=(64, 64), query_pool=4, key_range=(512, 4608), key_grid=(64, 64),
                key_pool=4, keys=list(range(0, 80, 2)), stats=("entropy", "peak", "colsum"))),
    ("wan480-cross-40-heads", 1, 40, 40, 32760, 512, 128, torch.bfloat16,
     MapRequest(query_grid=(21, 30, 52), query_pool=(1, 4, 4), keys=list(range(16)), stats=("entropy",))),
    ("wan-self-40-heads-5-frames", 1, 40, 40, 7800, 7800, 128, torch.bfloat16,
     MapRequest(query_grid=(5, 30, 52), query_pool=(1, 4, 4), key_grid=(5, 30, 52), key_pool=(1, 4, 4),
                stats=("entropy", "colsum"))),
    ("gqa-d80-rows", 2, 8, 2, 1000, 1111, 80, torch.bfloat16,
     MapRequest(heads="all", queries=[0, 500, 999], key_grid=(11, 101), key_pool=(2, 3), keys=[0, 5, 1110])),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_model_shapes_match_reference(shape, poison_outputs):
    name, B, H, Hk, Nq, Nk, D, dtype, request = shape
    run_case(B, H, Hk, Nq, Nk, D, dtype, request)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_masks_padding_and_causal(dtype, poison_outputs):
    B, H, Nq, Nk = 2, 8, 700, 777
    mask = torch.rand(B, 1, Nq, Nk, device="cuda") > 0.2
    mask[0, 0, 11] = False  # a query that sees no key
    kpm = torch.ones(B, Nk, dtype=torch.bool, device="cuda")
    kpm[0, 600:] = False
    kpm[1] = False           # a batch element whose every key is padded
    request = MapRequest(heads="mean", query_grid=(25, 28), query_pool=(3, 3), keys=list(range(0, 777, 20)),
                         queries=[11, 699], stats=("entropy", "peak", "colsum"))
    out, got = run_case(B, H, H, Nq, Nk, 128, dtype, request, attn_mask=mask, key_padding_mask=kpm)
    assert torch.all(out[1] == 0) and all(torch.all(t[1] == 0) for t in got.values())
    assert torch.all(out[0, :, 11] == 0) and torch.all(got["rows"][0, :, 0] == 0)
    causal = MapRequest(heads="all", map=True, keys=[0, 7, 699], stats=("entropy", "peak"))
    run_case(1, 4, 2, 700, 700, 64, dtype, causal, is_causal=True)


@pytest.mark.parametrize("d", [40, 64, 72, 96, 128, 160, 256])
def test_head_dims(d, poison_outputs):
    dtype = torch.float16 if d % 64 else torch.bfloat16
    request = MapRequest(query_grid=(30, 33), query_pool=4, key_grid=(30, 33), key_pool=4,
                         keys=list(range(0, 990, 25)), stats=("entropy", "peak", "colsum"))
    run_case(1, 4, 4, 990, 990, d, dtype, request)


def test_fp32_is_exact(poison_outputs):
    request = MapRequest(query_grid=(48, 48), query_pool=4, key_grid=(48, 48), key_pool=4, keys=list(range(40)),
                         stats=("entropy", "peak", "colsum"))
    run_case(1, 8, 8, 2304, 2304, 128, torch.float32, request)


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_maps_from_the_lse_of_pytorch_kernels(backend, poison_outputs):
    """The hybrid path: PyTorch's flash or cuDNN forward gives out and LSE, attncap the pooled map."""
    H, grid, D = 24, (64, 72), 128
    q = torch.randn(1, H, grid[0] * grid[1], D, device="cuda").mul(3.5).bfloat16()
    k, v = (torch.randn_like(q) for _ in range(2))
    if backend == "flash":
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    else:
        try:
            _, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
            lse = lse.reshape(1, H, -1)  # cuDNN keeps its statistics as [B, H, Nq, 1]
        except RuntimeError as err:
            pytest.skip(f"cuDNN attention unavailable here: {err}")
    request = MapRequest(query_grid=grid, key_grid=grid, query_pool=4, key_pool=4, stats=("colsum",))
    got = attncap.maps_from_lse(q, k, lse.float(), request=request)
    _, ref = reference(q, k, v, request)
    for name in ref:
        assert_near(name, got[name], ref[name], POOLED[torch.bfloat16])


def test_75600_tokens_need_64_bit_offsets(poison_outputs):
    """WAN 720p: 75,600 tokens x 40 heads x 128 dims overflows 32-bit element offsets."""
    H, N, D = 40, 75600, 128
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)  # BSHD, as WAN passes it
    k, v = torch.randn_like(q), torch.randn_like(q)
    rows = [0, N // 2, N - 1]
    out, products = attncap.attention(q, k, v, layout="bshd", request=MapRequest(heads=[0, H - 1], queries=rows))
    probe = torch.tensor(rows, device="cuda")
    for i, h in enumerate((0, H - 1)):
        expected = ((q[0, probe, h].double() @ k[0, :, h].double().T) * D ** -0.5).softmax(-1)
        assert_near(f"rows head {h}", products["rows"][0, i], expected, POOLED[torch.bfloat16])
        assert_near(f"out head {h}", out[0, probe, h], expected @ v[0, :, h].double(), 1e-2)
