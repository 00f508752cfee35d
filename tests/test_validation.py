"""Bad input fails before any work, with an error that names the argument and what would work."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import attncap
from attncap import MapRequest
from attncap.layouts import plan_range


def qkv(B=1, H=2, N=16, D=32, Hk=None, Nk=None, dtype=torch.float32):
    Hk = Hk or H
    Nk = Nk or N
    return torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, Hk, Nk, D, dtype=dtype), torch.randn(B, Hk, Nk, D, dtype=dtype)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any computation starts: validation must come first."""
    from attncap import cpu_path

    def boom(*a, **k):
        raise AssertionError("work started before validation finished")

    monkeypatch.setattr(cpu_path, "forward", boom)


@pytest.mark.parametrize("make, kwargs, exc, words", [
    (lambda: (torch.randn(2, 16, 32),) + qkv()[1:], {}, ValueError, ["q must be 4-D", "(2, 16, 32)"]),
    (lambda: qkv(dtype=torch.float64), {}, TypeError, ["q has dtype torch.float64", "bfloat16"]),
    (lambda: (qkv()[0], qkv()[1].half(), qkv()[2]), {}, TypeError, ["k has dtype", "share a dtype"]),
    (lambda: qkv(H=3, Hk=2), {}, ValueError, ["multiple of the key heads"]),
    (lambda: (torch.randn(2, 2, 16, 32),) + qkv()[1:], {}, ValueError, ["batch sizes differ"]),
    (lambda: (qkv()[0], torch.randn(1, 2, 16, 40), torch.randn(1, 2, 16, 40)), {}, ValueError, ["head dims differ"]),
    (lambda: qkv(D=300), {}, ValueError, ["head dim must be 1 to 256"]),
    (lambda: qkv(), {"attn_mask": torch.ones(3, 16, 16, dtype=torch.bool)}, ValueError, ["attn_mask", "broadcast"]),
    (lambda: qkv(), {"attn_mask": torch.ones(16, 16, dtype=torch.int32)}, TypeError, ["attn_mask must be bool"]),
    (lambda: qkv(), {"key_padding_mask": torch.ones(1, 15, dtype=torch.bool)}, ValueError, ["key_padding_mask", "(1, 16)"]),
    (lambda: qkv(), {"scale": -1.0}, ValueError, ["scale must be a positive"]),
    (lambda: qkv(), {"layout": "bnhd"}, ValueError, ["layout must be"]),
    (lambda: qkv(), {"backend": "cuda"}, ValueError, ["backend must be one of"]),
    (lambda: qkv(), {"request": "mean"}, TypeError, ["request must be an attncap.MapRequest"]),
    (lambda: qkv(), {"request": MapRequest(heads=[0, 5])}, ValueError, ["heads must lie in [0, 2)"]),
    (lambda: qkv(), {"request": MapRequest(heads="max")}, ValueError, ["heads must be 'mean', 'all'"]),
    (lambda: qkv(), {"request": MapRequest(query_range=(4, 40))}, ValueError, ["query_range=(4, 40)", "<= 16"]),
    (lambda: qkv(), {"request": MapRequest(query_grid=(5, 5))}, ValueError, ["query_grid=(5, 5) holds 25", "16"]),
    (lambda: qkv(), {"request": MapRequest(key_pool=2)}, ValueError, ["key_pool needs a grid"]),
    (lambda: qkv(), {"request": MapRequest(key_grid=(4, 4), key_pool=(2, 2, 2))}, ValueError, ["key_pool", "2 positive factors"]),
    (lambda: qkv(), {"request": MapRequest(keys=[3, 16])}, ValueError, ["keys must lie in [0, 16)"]),
    (lambda: qkv(N=200), {"request": MapRequest(keys=list(range(129)))}, ValueError, ["at most 128"]),
    (lambda: qkv(), {"request": MapRequest(queries=[])}, ValueError, ["queries is empty"]),
    (lambda: qkv(), {"request": MapRequest(stats=("entropy", "kurtosis"))}, ValueError, ["kurtosis", "colsum"]),
])
def test_bad_input_names_the_argument(make, kwargs, exc, words, no_work):
    q, k, v = make()
    with pytest.raises(exc) as info:
        attncap.attention(q, k, v, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_over_budget_request_names_bytes_and_options(no_work):
    q, k, v = qkv(H=4, N=64 * 64, D=16)
    req = MapRequest(heads="all", query_grid=(64, 64), key_grid=(64, 64), max_bytes=64 * 2**20)
    with pytest.raises(ValueError) as info:
        attncap.attention(q, k, v, request=req)
    msg = str(info.value)
    assert "256.0 MiB" in msg and "max_bytes is 64.0 MiB" in msg  # 4 heads x 4096 x 4096 x 4 bytes
    assert "heads='mean' would make it 64.0 MiB" in msg
    assert "query_pool=4 would make it 16.0 MiB" in msg


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attncap.attention(*qkv(), backend="triton")


@pytest.mark.parametrize("grid, pool, bins", [((5, 7), 2, (3, 4)), ((3, 10, 9), 4, (3, 3, 3)), ((3, 4, 5), (2, 3, 2), (2, 2, 3))])
def test_plan_covers_every_token_once_in_contiguous_bins(grid, pool, bins):
    from attncap.layouts import normalize_pool

    n = torch.tensor(grid).prod().item()
    plan = plan_range(10, 10 + n, grid, normalize_pool(grid, pool, "pool"))
    assert plan.grid == bins and plan.nbins == torch.tensor(bins).prod().item()
    assert sorted(plan.perm.tolist()) == list(range(10, 10 + n))
    assert torch.all(plan.bin_of_slot[1:] >= plan.bin_of_slot[:-1])
    assert plan.counts.sum().item() == n
    for b in range(plan.nbins):
        lo, hi = plan.bin_start[b].item(), plan.bin_start[b + 1].item()
        assert hi - lo == plan.counts[b].item() and torch.all(plan.bin_of_slot[lo:hi] == b)


def test_no_top_level_kernels_package_is_installed():
    """transformers and diffusers import Hugging Face's `kernels` by that name (transformers 5 depends
    on it): ours is only attncap.kernels. Outside the checkout, a `kernels` found is never our folder;
    inside it (its root first on sys.path), `import kernels` gives Hugging Face's package where it is
    installed, else an error saying why the name resolved to our folder; diffusers imports there."""
    ours = importlib.util.find_spec("attncap.kernels")
    assert ours is not None
    code = ("import importlib.util, sys; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s else '')")
    found = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() != ours.origin, found
    root = os.path.dirname(os.path.dirname(ours.origin))
    if not os.path.exists(os.path.join(root, "setup.py")):  # not an editable install of a checkout
        return
    inside = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=root,
                            capture_output=True, text=True)
    if found.stdout.strip():  # Hugging Face's kernels is installed
        assert inside.returncode == 0 and inside.stdout.strip() == found.stdout.strip(), inside
        code = "import diffusers; from diffusers import StableDiffusionPipeline"
        assert subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True).returncode == 0
    else:
        assert inside.returncode != 0 and "Hugging Face's kernels package, which owns that name" in inside.stderr
