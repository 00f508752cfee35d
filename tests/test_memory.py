"""Capture memory is the products plus a bounded workspace, never B x H x Nq x Nk.

Measured, not assumed: a fresh process builds the inputs and warms the matmul and thread pools up
on a tiny call (their one-off buffers are not the call's), then resets the kernel's peak-RSS
counter (VmHWM, via /proc/self/clear_refs, as benchmarks/measure.py does) and reads the peak after
one attncap.attention call: a pooled map with column sums and entropy (small products: the
workspace is what shows), or an unpooled head-mean map of 96 MiB (a large product: any copy of it
on the way out, in attncap.ops or its NaN policy, breaks the bound). At this size the probability
tensor alone is 2.25 GiB; the torch path's workspace bound is the default (attncap.cpu_path.WORKSPACE_BYTES,
64 MiB) or the call's workspace_bytes argument.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

MiB, GiB = 2**20, 2**30

SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, re, sys, torch, attncap
    from attncap import cpu_path

    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\\s+(\\d+) kB", f.read(), re.M).group(1)) * 1024

    workspace = None if sys.argv[1] == "default" else int(sys.argv[1])
    if sys.argv[3] != "default":
        cpu_path.TILE_BYTES = int(sys.argv[3])
    torch.manual_seed(0)
    H, grid, D = 4, (96, 128), 32
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    if sys.argv[2] == "pooled":
        req = attncap.MapRequest(query_grid=grid, key_grid=grid, query_pool=8, key_pool=8, stats=("colsum", "entropy"))
    else:  # the head-mean map of the first 2048 queries over every key, unpooled
        req = attncap.MapRequest(query_range=(0, 2048))
    small = torch.randn(1, H, 64, D)
    attncap.attention(small, small, small, backend="torch", request=attncap.MapRequest(
        query_grid=(8, 8), key_grid=(8, 8), key_pool=8, stats=("colsum", "entropy")))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    out, products = attncap.attention(q, k, v, request=req, backend="torch", workspace_bytes=workspace)
    extra = status("VmHWM") - before
    kept = out.numel() * out.element_size() + sum(p.numel() * 4 for p in products.values())
    per_head = 3 * H * N * 4  # the forward's per-head LSE, entropy and peak rows (validate.product_bytes)
    print(json.dumps({"extra": extra, "kept": kept + per_head, "naive": H * N * N * 4}))
""")


def _measure(workspace: int | None, request: str = "pooled", tile_bytes: int | None = None) -> dict:
    """One call in a fresh process; ``workspace``: its workspace_bytes (None: the default)."""
    # A fixed mmap threshold: glibc otherwise raises it each time a large block is freed, later blocks of
    # that size come from the heap and stay resident after free, and the same call peaked anywhere from
    # 21 to 37 MiB over five runs (16 MiB workspace); with it, large blocks return to the system on free
    # and the peak is the live memory (21.7-23.1 MiB).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(workspace or "default"), request,
                             str(tile_bytes or "default")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_peak_extra_memory_is_products_plus_the_workspace():
    # Tiles as large as the bound allows (cpu_path.TILE_BYTES, 4 MiB, would stop them first), so
    # the bound is what sets the working memory.
    default, small = _measure(None, tile_bytes=2**40), _measure(16 * MiB, tile_bytes=2**40)
    assert default["naive"] > 2 * GiB
    # 4 MiB of slack: the plan tables, the layout's index arrays and allocator rounding.
    for m, workspace in ((default, 64 * MiB), (small, 16 * MiB)):
        assert m["extra"] <= m["kept"] + workspace + 4 * MiB, (m, workspace)
    assert small["extra"] < default["extra"] - 8 * MiB, (small, default)  # the bound is what sets it
    print(f"peak extra {default['extra'] / MiB:.1f} MiB (workspace 64 MiB), {small['extra'] / MiB:.1f} MiB "
          f"(16 MiB) vs naive probabilities {default['naive'] / GiB:.2f} GiB")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_a_large_product_is_not_copied_on_the_way_out():
    """The default configuration (4 MiB tiles, 64 MiB bound) with a 96 MiB product."""
    m = _measure(None, "map")
    assert m["naive"] > 2 * GiB and m["kept"] > 96 * MiB
    assert m["extra"] <= m["kept"] + 64 * MiB + 4 * MiB, m  # a second copy of the map would add 96 MiB
    print(f"peak extra {m['extra'] / MiB:.1f} MiB for {m['kept'] / MiB:.1f} MiB of results (workspace 64 MiB)")
