"""The kernels at real model shapes on a GPU, against the float64 reference (skipped without CUDA).

Shapes are the real per-layer ones (one batch element; the reference materialises P in float64 on
the GPU, so the largest cases here keep one side short: cross-attention, or a few heads).
"""
from __future__ import annotations

import pytest
import torch

import attncap
from attncap import MapRequest
from attncap.reference import attention_reference

from conftest import GPU

pytestmark = pytest.mark.skipif(not GPU, reason="needs CUDA")

# bf16 outputs: 8-bit mantissa after P is cast to bf16 for P@V (as every flash kernel does);
# products: fp32, with P fed to the pooling dots in fp16 (see tests/test_products.py).
OUT_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
PRODUCT_TOL = dict(atol=2e-3, rtol=5e-3)

SHAPES = [
    # name, H, Hk, Nq, Nk, D, query grid, key grid, pool
    ("sd15-self-64x64", 8, 8, 4096, 4096, 40, (64, 64), (64, 64), 4),
    ("sd15-cross", 8, 8, 4096, 77, 40, (64, 64), None, None),
    ("sdxl-cross-128x128", 10, 10, 16384, 77, 64, (128, 128), None, None),
    ("flux-joint-1024", 24, 24, 4608, 4608, 128, None, None, None),
    ("wan480p-cross", 40, 40, 32760, 512, 128, (21, 30, 52), None, None),
    ("wan480p-self-1head", 1, 1, 32760, 32760, 128, (21, 30, 52), (21, 30, 52), (1, 4, 4)),
    ("gqa-80", 8, 2, 1000, 1111, 80, None, None, None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_real_shapes_match_reference(shape, dtype, poison_outputs):
    name, H, Hk, Nq, Nk, D, qgrid, kgrid, pool = shape
    q = torch.randn(1, H, Nq, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, Hk, Nk, D, device="cuda", dtype=dtype) for _ in range(2))
    request = MapRequest(heads="mean", query_grid=qgrid, key_grid=kgrid, query_pool=pool if kgrid else None,
                         key_pool=pool, keys=list(range(0, min(Nk, 64), 4)), stats=("entropy", "peak", "colsum"),
                         map=Nq * Nk <= 4096 * 4608 or pool is not None)
    out, products = attncap.attention(q, k, v, request=request)
    ref_out, ref = attention_reference(q, k, v, request=request)
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for key in ref:
        assert not torch.isnan(products[key]).any(), key
        torch.testing.assert_close(products[key].double(), ref[key], **PRODUCT_TOL, msg=lambda m: f"{key}: {m}")


def test_75600_tokens_need_64_bit_offsets(poison_outputs):
    """WAN 720p: 75,600 tokens x 40 heads x 128 dims overflows 32-bit element offsets."""
    H, N, D = 40, 75600, 128
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)  # BSHD, as WAN passes it
    k, v = torch.randn_like(q), torch.randn_like(q)
    rows = [0, N // 2, N - 1]
    out, products = attncap.attention(q, k, v, layout="bshd", request=MapRequest(heads=[0, H - 1], queries=rows))
    probe = torch.tensor(rows, device="cuda")
    for i, h in enumerate((0, H - 1)):
        s = (q[0, probe, h].double() @ k[0, :, h].double().T) * D ** -0.5
        expected = s.softmax(-1)
        torch.testing.assert_close(products["rows"][0, i].double(), expected, **PRODUCT_TOL)
        ref_out = expected @ v[0, :, h].double()
        torch.testing.assert_close(out[0, probe, h].double(), ref_out, atol=2e-2, rtol=2e-2)


def test_maps_from_the_lse_of_pytorchs_flash_attention(poison_outputs):
    """The hybrid path at a real shape: aten's flash kernel gives out and LSE, attncap the pooled map."""
    H, grid, D = 8, (64, 64), 64
    q, k, v = (torch.randn(1, H, grid[0] * grid[1], D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    request = MapRequest(query_grid=grid, key_grid=grid, query_pool=4, key_pool=4, stats=("colsum",))
    got = attncap.maps_from_lse(q, k, lse, request=request)
    _, ref = attention_reference(q, k, v, request=request)
    for key in ref:
        torch.testing.assert_close(got[key].double(), ref[key], **PRODUCT_TOL, msg=lambda m: f"{key}: {m}")
