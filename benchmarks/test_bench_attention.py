"""pytest-benchmark suite: providers x capture tasks at a few CPU-scaled shapes.

    pytest benchmarks --benchmark-only                 # the timings (a couple of minutes on 2 cores)
    pytest benchmarks                                  # also checks the providers against attncap.reference

Groups are "<shape>/<task>", so each group compares the six providers on one capture (sdpa and
attncap_plain compute the output only). Every provider's output and products are checked against
attncap_fused's (setup, untimed) before it is timed. Peak memory needs a fresh process per
measurement: benchmarks/run.py does that, this suite only times.
Shape legend: q, k, v [B, H, N, D]; see benchmarks/shapes.py and benchmarks/providers.py.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from attncap.reference import attention_reference
from measure import check, make_inputs
from providers import CAPTURE, PROVIDERS, RUN, unsupported
from shapes import CPU, MAIN, REAL, TASKS, request_for

CASES = [(shape, task, provider)
         for shape, tasks in (("sd15_cross", ("token_maps", MAIN)), ("wan480_self", ("colsum", MAIN)))
         for task in tasks for provider in PROVIDERS]


@functools.lru_cache(maxsize=None)
def inputs(shape_name: str):
    shape = CPU[shape_name]
    return shape, make_inputs(shape, "cpu")


@functools.lru_cache(maxsize=None)
def yardstick(shape_name: str, task: str) -> dict:
    """attncap_fused's output and products, in the form measure.check compares against."""
    shape, (q, k, v) = inputs(shape_name)
    out, products = RUN["attncap_fused"](q, k, v, shape.D ** -0.5, request_for(task, shape))
    return {"out": out.float(), **{f"p.{n}": p for n, p in products.items()}}


@pytest.mark.parametrize("shape_name,task,provider", CASES, ids=["/".join(c) for c in CASES])
def test_attention(benchmark, shape_name, task, provider):
    shape, (q, k, v) = inputs(shape_name)
    request = None if provider in ("sdpa", "attncap_plain") else request_for(task, shape)
    if request is not None and unsupported(provider, request):
        pytest.skip(unsupported(provider, request))
    call = functools.partial(RUN[provider], q, k, v, shape.D ** -0.5, request)
    expected = yardstick(shape_name, task)
    if request is None:  # output-only providers: compare the output
        expected = {"out": expected["out"]}
    problem = check(*call(), expected, "cpu")
    assert problem is None, problem
    benchmark.group = f"{shape_name}/{task}"
    benchmark.extra_info.update(provider=provider, scaled_from=REAL[shape_name].describe(),
                                B=shape.B, H=shape.H, Nq=shape.Nq, Nk=shape.Nk, D=shape.D)
    benchmark.pedantic(call, rounds=7, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("name", list(REAL))
def test_providers_match_reference(name):
    """At a tiny size every capture provider equals attncap.reference in float64, for every task."""
    torch.manual_seed(0)
    real = REAL[name]
    shape = replace(real, H=3, D=8, grid=(3, 5, 6) if len(real.grid) == 3 else (6, 7), text=min(real.text, 20))
    q, k, v = (torch.randn(1, 3, n, 8, dtype=torch.float64) for n in (shape.Nq, shape.Nk, shape.Nk))
    for task in TASKS:
        request = request_for(task, shape)
        if isinstance(request, str):
            continue
        _, expected = attention_reference(q, k, v, request=request)
        for provider in (p for p in CAPTURE if not unsupported(p, request)):
            dtype = torch.float32 if provider in ("attncap_fused", "hybrid") else torch.float64
            _, got = RUN[provider](q.to(dtype), k.to(dtype), v.to(dtype), 8 ** -0.5, request)
            assert set(got) == set(expected), (task, provider)
            for product, want in expected.items():
                torch.testing.assert_close(got[product].double(), want, rtol=1e-4, atol=1e-6,
                                           msg=f"{name} {task} {provider} {product}")
