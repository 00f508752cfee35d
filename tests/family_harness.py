"""Checks of one family adapter on a tiny random-weight denoiser, against a layout written by hand.

A plain forward records the q and k that reach torch SDPA in every attention call (the layer from
forward pre-hooks; diffusers' default "native" backend ends in SDPA); a second forward of the same
inputs captures with relations="all". Every record must be one the hand-written layout predicts,
every predicted one must exist, and each must equal an explicit float64 softmax of the recorded q
and k, normalised over ALL keys of the call, sliced to the relation's segments, reduced over heads
and pooled over the grid. The output must be unchanged by capture.

A layout is {layer glob: [call, ...]}, each call a pair of dicts (queries, keys) mapping a segment
name to (start, stop, grid or None), written from reading the family's diffusers processor, not
taken from attncap.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch

import attncap
from attncap.intercept import intercept_sdpa
from test_capture_families import expected, factors, pooled_grid

Segs = dict  # name -> (start, stop, grid)
Layout = dict  # layer glob -> list of (Segs, Segs)


def _attention_layers(model: torch.nn.Module, component: str) -> dict[str, torch.nn.Module]:
    return {f"{component}.{n}": m for n, m in model.named_modules() if hasattr(m, "processor")}


def record_calls(model: torch.nn.Module, component: str, call: Callable[[], object]):
    """({(layer, index in layer): (q, k, scale)} float64 BHSD, output) of one plain forward."""
    seen: dict = {}
    cur = {"layer": None, "index": 0}
    hooks = []
    for name, module in _attention_layers(model, component).items():
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: cur.update(layer=n, index=0)))
        hooks.append(module.register_forward_hook(lambda m, a, o: cur.update(layer=None)))

    def handler(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if cur["layer"] is not None:
            assert not is_causal
            if enable_gqa and key.shape[1] != query.shape[1]:
                key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
            seen[(cur["layer"], cur["index"])] = (query.detach().double(), key.detach().double(), scale, attn_mask)
            cur["index"] += 1
        return None

    try:
        with intercept_sdpa(handler), torch.no_grad():
            out = call()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def _calls_of(layout: Layout, layer: str):
    return next((calls for pattern, calls in layout.items() if fnmatch.fnmatchcase(layer, pattern)), None)


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    return first_tensor(out.sample if hasattr(out, "sample") else out[0])


def check_family(model: torch.nn.Module, call: Callable[[], object], layout: Layout, *, component: str = "transformer",
                 pool=None, heads="mean", stats=("entropy", "colsum"), atol: float = 2e-5) -> attncap.Store:
    """Capture one forward with relations="all" and check every record (see the module docstring)."""
    truth, plain = record_calls(model, component, call)
    assert truth, "the plain forward made no SDPA call inside an attention module"
    with attncap.capture(model, relations="all", pool=pool, heads=heads, stats=stats) as store, torch.no_grad():
        out = call()
    torch.testing.assert_close(first_tensor(out), first_tensor(plain), atol=1e-5, rtol=1e-5)
    check_records(store, truth, layout, pool=pool, heads=heads, stats=stats, atol=atol)
    return store


def check_records(store: attncap.Store, truth: dict, layout: Layout, *, pool=None, heads="mean",
                  stats=("entropy", "colsum"), atol: float = 2e-5) -> None:
    """The records of a relations="all" capture against the recorded q, k (see check_family)."""
    # what the layout predicts: (layer, relation, kind) for each call whose segments exist
    want = []
    for (layer, index) in truth:
        calls = _calls_of(layout, layer)
        assert calls is not None, f"the hand-written layout has no entry for {layer}"
        qsegs, ksegs = calls[index]
        want += [(layer, f"{a}->{b}", kind) for a in qsegs for b in ksegs
                 for kind in ("map",) + tuple(s for s in stats if s in ("entropy", "peak", "colsum"))]
    got = sorted((r.layer, r.relation, r.kind) for r in store.records)
    assert got == sorted(want), f"records {sorted(set(got) ^ set(want))[:8]} differ from the layout"
    for r in store.records:
        a, b = r.relation.split("->")
        calls = _calls_of(layout, r.layer)
        # the call whose hand-written segments hold this record's (a relation may come from two calls)
        index = next(i for i, (qs, ks) in enumerate(calls) if a in qs and b in ks and (r.layer, i) in truth
                     and [ks[b][0], ks[b][1]] == r.meta["key_segment"])
        q, k, scale, mask = truth[(r.layer, index)]
        assert mask is None or bool(torch.as_tensor(mask).all()), "the harness compares unmasked calls only"
        qseg, kseg = calls[index][0][a], calls[index][1][b]
        assert r.meta["query_segment"] == [qseg[0], qseg[1]] and r.meta["key_segment"] == [kseg[0], kseg[1]]
        want_data = expected(r.kind, q, k, scale, slice(None), qseg, kseg, pool, heads)
        assert r.query_grid == pooled_grid(qseg[2], factors(qseg[2], pool)), (r.layer, r.relation)
        assert r.key_grid == pooled_grid(kseg[2], factors(kseg[2], pool)), (r.layer, r.relation)
        assert r.data.shape == want_data.shape, (r.layer, r.relation, r.kind, r.data.shape, want_data.shape)
        torch.testing.assert_close(r.data.double(), want_data, atol=atol, rtol=1e-4,
                                   msg=lambda m: f"{r.layer} {r.relation} {r.kind}: {m}")


def default_relations(model: torch.nn.Module, call: Callable[[], object]) -> set[tuple[str, tuple | None]]:
    """(relation, query grid) of the records a capture with default options makes."""
    with attncap.capture(model) as store, torch.no_grad():
        call()
    return {(r.relation, r.query_grid) for r in store.records}
