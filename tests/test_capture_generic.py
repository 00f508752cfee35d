"""attncap.capture on plain torch modules that call scaled_dot_product_attention themselves.

Two toy part-based DiTs: one imports the function by name (``from torch.nn.functional import
scaled_dot_product_attention``, as PartCrafter and the original Wan code do), one calls
F.scaled_dot_product_attention and also has a parts -> text cross-attention. Maps are checked
against an explicit float64 softmax of the very q and k the modules compute.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

import attncap
from attncap.session import CallLayout, Segment

PARTS, GRID, TEXT = 3, (4, 4, 4), 5
NPART = math.prod(GRID)
LAYOUT = [(f"part{i}", NPART, GRID) for i in range(PARTS)] + [("text", TEXT, None)]
N = PARTS * NPART + TEXT


class Attention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None, by_name: bool = True):
        super().__init__()
        self.heads, self.kv_heads, self.by_name = heads, kv_heads or heads, by_name
        self.d = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.d)
        self.out = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor, context: torch.Tensor | None = None):
        ctx = x if context is None else context
        b = x.shape[0]
        q = self.q(x).reshape(b, -1, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, -1, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, context=None, mask=None):
        q, k, v = self.qkv(x, context)
        gqa = self.kv_heads != self.heads
        if self.by_name:
            o = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class Block(nn.Module):
    def __init__(self, dim: int, by_name: bool, cross: bool, kv_heads: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, kv_heads=kv_heads, by_name=by_name)
        self.cross = Attention(dim, by_name=by_name) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm(x), mask=mask)
        if self.cross is not None:  # parts -> text
            parts, text = x[:, :-TEXT], x[:, -TEXT:]
            x = torch.cat([parts + self.cross(parts, text), text], 1)
        return x + self.mlp(x)


class PartDiT(nn.Module):
    """Joint self-attention over [part0, part1, part2, text] tokens; each forward call = one step."""

    def __init__(self, by_name: bool = True, cross: bool = False, depth: int = 2, dim: int = 32,
                 kv_heads: int | None = None):
        super().__init__()
        self.t_embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([Block(dim, by_name, cross, kv_heads) for _ in range(depth)])

    def forward(self, x, t: float, mask=None):
        x = x + self.t_embed(torch.full((x.shape[0], 1, 1), float(t)))
        for blk in self.blocks:
            x = blk(x, mask)
        return x


def record_inputs(model: PartDiT, x: torch.Tensor, t: float, mask=None) -> dict[str, tuple]:
    """Layer name -> (x, context) as the attention modules see them, from a plain run."""
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, n=n: seen.__setitem__(
        n, (args[0], args[1] if len(args) > 1 else kwargs.get("context"))), with_kwargs=True)
        for n, m in model.named_modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            model(x, t, mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def explicit_probs(q, k, mask=None) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return s.softmax(-1)


@pytest.fixture(params=["by_name", "F"])
def model(request):
    torch.manual_seed(0)
    return PartDiT(by_name=request.param == "by_name", cross=request.param == "F").eval()


def test_maps_equal_explicit_softmax_and_outputs_unchanged(model):
    x = torch.randn(2, N, 32)
    with torch.no_grad():
        plain = [model(x, t) for t in (1.0, 0.5)]
    seen = [record_inputs(model, x, t) for t in (1.0, 0.5)]
    with torch.no_grad(), attncap.capture(model, layout=LAYOUT, relations="all", heads="all") as store:
        captured = [model(x, t) for t in (1.0, 0.5)]
    for a, b in zip(plain, captured):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    layers = sorted({r.layer for r in store.records})
    expect = ["blocks.0.attn", "blocks.1.attn"]
    expect += ["blocks.0.cross", "blocks.1.cross"] if model.blocks[0].cross else []
    assert layers == sorted(expect)
    for step in (0, 1):
        for layer in layers:
            xin, ctx = seen[step][layer]
            q, k, _ = model.get_submodule(layer).qkv(xin, ctx)
            p = explicit_probs(q, k)
            recs = store.get(layer=layer, step=step)
            if layer.endswith("cross"):  # queries: the three parts (a run of the layout), keys: the text
                assert sorted(r.relation for r in recs) == [f"part{i}->text" for i in range(PARTS)]
            else:
                assert len(recs) == (PARTS + 1) ** 2
            for r in recs:
                (q0, q1), (k0, k1) = r.meta["query_segment"], r.meta["key_segment"]
                torch.testing.assert_close(r.data.double(), p[:, :, q0:q1, k0:k1], atol=2e-6, rtol=1e-5)
                qname = r.relation.split("->")[0]
                assert r.query_grid == (GRID if qname.startswith("part") else None)
                assert r.step == step and r.timestep is None


def test_auto_relations_are_all_pairs_and_default_layout_is_one_segment():
    torch.manual_seed(0)
    model = PartDiT(depth=1).eval()
    x = torch.randn(1, N, 32)
    with torch.no_grad(), attncap.capture(model, layout=LAYOUT) as store:
        model(x, 1.0)
    assert len(store.get(layer="blocks.0.attn")) == (PARTS + 1) ** 2
    with torch.no_grad(), attncap.capture(model) as store:
        model(x, 1.0)
    (rec,) = store.records
    assert rec.relation == "tokens->tokens" and rec.data.shape == (1, 1, N, N)


def test_part_relations_and_pooling_on_part_grids():
    torch.manual_seed(0)
    model = PartDiT(depth=1).eval()
    x = torch.randn(2, N, 32)
    rels = ["part0->part1", "part2->text"]
    with torch.no_grad(), attncap.capture(model, layout=LAYOUT, relations=rels, heads="all") as full:
        model(x, 1.0)
    with torch.no_grad(), attncap.capture(model, layout=LAYOUT, relations=rels, heads="all", pool=2) as pooled:
        model(x, 1.0)
    assert sorted(r.relation for r in full.records) == rels
    f = full.get(relation="part0->part1")[0]
    p = pooled.get(relation="part0->part1")[0]
    # an int pool folds (h, w) and keeps t, on both axes of a part->part map
    assert p.query_grid == (4, 2, 2) == p.key_grid and p.data.shape == (2, 4, 16, 16)
    want = f.data.reshape(2, 4, 4, 2, 2, 2, 2, 4, 2, 2, 2, 2).mean((4, 6, 9, 11)).reshape(2, 4, 16, 16)
    torch.testing.assert_close(p.data, want)
    t = pooled.get(relation="part2->text")[0]
    assert t.query_grid == (4, 2, 2) and t.key_grid is None and t.data.shape == (2, 4, 16, TEXT)
    with torch.no_grad(), attncap.capture(model, layout=LAYOUT, relations="part1->part1",
                                          pool=(2, 2, 2), stats=("entropy",)) as cube:
        model(x, 1.0)
    m = cube.get(kind="map")[0]
    assert m.query_grid == (2, 2, 2) and m.data.shape == (2, 1, 8, 8)
    assert cube.get(kind="entropy")[0].data.shape == (2, 1, 8)


def test_dict_and_callable_layouts_layers_steps_masks_and_gqa():
    torch.manual_seed(0)
    model = PartDiT(depth=2, kv_heads=2).eval()
    x = torch.randn(2, N, 32)
    mask = torch.ones(2, 1, N, N, dtype=torch.bool)
    mask[1, :, :, -2:] = False  # the second sample's last two text tokens are padding
    with torch.no_grad():
        plain = model(x, 1.0, mask)
    seen = record_inputs(model, x, 1.0, mask)
    dict_layout = {"queries": LAYOUT[:PARTS] + [("text", TEXT, None)], "keys": [("all", N, None)]}
    with torch.no_grad(), attncap.capture(model, layout=dict_layout, layers="blocks.1.*", relations="all",
                                          heads="all", steps=[1]) as store:
        captured = model(x, 1.0, mask)  # step 0: not captured
        model(x, 1.0, mask)
    torch.testing.assert_close(plain, captured, atol=1e-5, rtol=1e-5)
    assert {(r.layer, r.step) for r in store.records} == {("blocks.1.attn", 1)}
    q, k, _ = model.blocks[1].attn.qkv(seen["blocks.1.attn"][0])
    p = explicit_probs(q, k, mask)
    for r in store.records:
        (q0, q1) = r.meta["query_segment"]
        assert r.relation.endswith("->all")
        torch.testing.assert_close(r.data.double(), p[:, :, q0:q1], atol=2e-6, rtol=1e-5)
    assert float(store.get(relation="part0->all")[0].data[1, ..., -2:].abs().max()) == 0.0

    calls = []

    def layout(layer, q, k):
        calls.append((layer, q.shape[-2], k.shape[-2]))
        if layer != "blocks.0.attn":
            return None  # left to SDPA
        return CallLayout((Segment("early", 0, 8), Segment("late", 8, q.shape[-2])), (Segment("text", N - TEXT, N),))

    with torch.no_grad(), attncap.capture(model, layout=layout, heads="all") as store:
        model(x, 1.0)
    assert calls == [("blocks.0.attn", N, N), ("blocks.1.attn", N, N)]
    assert sorted(r.relation for r in store.records) == ["early->text", "late->text"]
    q, k, _ = model.blocks[0].attn.qkv(record_inputs(model, x, 1.0)["blocks.0.attn"][0])
    torch.testing.assert_close(store.get(relation="early->text")[0].data.double(),
                               explicit_probs(q, k)[:, :, :8, N - TEXT:], atol=2e-6, rtol=1e-5)


def test_restores_everything_after_an_exception_and_leaves_other_sdpa_calls_alone(model):
    x = torch.randn(1, N, 32)

    def boom(module, args):
        raise RuntimeError("boom")

    hook = model.blocks[1].mlp.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), attncap.capture(model, layout=LAYOUT) as store:
            q = torch.randn(1, 2, 7, 8)
            outside = F.scaled_dot_product_attention(q, q, q)  # not inside the module: untouched, not captured
            torch.testing.assert_close(outside, torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, -1) @ q)
            model(x, 1.0)
    finally:
        hook.remove()
    # block 1 died in its MLP, after its attention calls
    crosses = {"blocks.0.cross", "blocks.1.cross"} if model.blocks[0].cross else set()
    assert {r.layer for r in store.records} == {"blocks.0.attn", "blocks.1.attn"} | crosses
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    from torch.overrides import _get_current_function_mode_stack
    assert _get_current_function_mode_stack() == []
    with torch.no_grad():
        model(x, 1.0)  # runs plainly again


def test_bad_layouts_fail_before_installing():
    model = PartDiT(depth=1)
    for bad, match in [([("part0", 64, (4, 4, 5))], "grid"), ([("a", 3), ("a", 4)], "distinct"),
                       ({"rows": [("a", 3)]}, "queries"), ([("a->b", 3)], "names"), ("parts", "list")]:
        with pytest.raises(ValueError, match=match):
            with attncap.capture(model, layout=bad):
                pass
        assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="steps='last'"):
        with attncap.capture(model, steps="last"):
            pass
    with pytest.raises(TypeError, match="does not know how to capture"):
        with attncap.capture(object()):
            pass


def test_part_dit_example_runs_and_each_parts_attention_sums_to_one(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "part_dit.py"
    spec = importlib.util.spec_from_file_location("example_part_dit", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.main(["--parts", "2", "--steps", "2", "--batch", "1", "--out", str(tmp_path / "parts.json")])
    assert set(table) == {0, 1} and set(table[0]) == {"part0", "part1"}
    for row in table[1].values():
        assert abs(row["part0"] + row["part1"] + row["text"] - 1.0) < 1e-4 and row["entropy"] > 0
    diff = float(re.search(r"with capture off: ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert diff < 1e-5  # fp32: attncap's CPU path and SDPA sum in different orders
