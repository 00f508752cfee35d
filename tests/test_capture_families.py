"""attncap.capture on tiny random-weight SD3 / SD3.5, Flux, Wan 2.1 (T2V, I2V) and Wan 2.2 pipelines (CPU).

Ground truth: a plain run records the q and k that reach SDPA in every attention layer (the layer
from forward pre-hooks, the tensors from intercept_sdpa with a handler that returns None); a
second run with the same seed captures. Every captured product must equal an explicit float64
softmax of those q and k, normalised over ALL keys of the call, sliced to the relation's
segments, reduced over heads and pooled over the (t,) h, w grid, for each CFG branch. The token
layouts below are written out by hand from the diffusers processors, not taken from attncap.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import attncap
from attncap.intercept import intercept_sdpa
from tiny_transformers import (FLUX_TEXT, SD3_TEXT, WAN_I2V_TEXT, WAN_TEXT, flux_inputs, sd3_inputs, tiny_flux,
                               tiny_sd3, tiny_wan, tiny_wan_i2v, tiny_wan_ti2v, wan_i2v_inputs, wan_inputs,
                               wan_ti2v_inputs)

IMAGE_GRID = (8, 12)      # SD3 and Flux: 32x48 image -> 16x24 latent -> patch 2 / 2x2 packing
VIDEO_GRID = (3, 3, 5)    # Wan: 9 frames 48x80 -> latent 3x6x10 -> patch (1, 2, 2)
NI, NV = math.prod(IMAGE_GRID), math.prod(VIDEO_GRID)
Seg = tuple  # (start, stop, grid or None)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ token layouts
def sd3_layout(layer: str, index: int):
    """Joint attention: [image, text] on both axes; SD3.5's attn2: image only."""
    image = {"image": (0, NI, IMAGE_GRID)}
    segs = image if layer.endswith("attn2") else {**image, "text": (NI, NI + SD3_TEXT, None)}
    return segs, segs


def flux_layout(layer: str, index: int):
    """Double- and single-stream blocks alike: [text, image] on both axes."""
    segs = {"text": (0, FLUX_TEXT, None), "image": (FLUX_TEXT, FLUX_TEXT + NI, IMAGE_GRID)}
    return segs, segs


def wan_layout(text: int, image_ctx: int = 0):
    """attn1 [video] -> [video]; attn2 [video] -> [text], the I2V attn2 first [video] -> [image_ctx]."""
    def layout(layer: str, index: int):
        video = {"video": (0, NV, VIDEO_GRID)}
        if layer.endswith("attn1"):
            return video, video
        if image_ctx and index == 0:
            return video, {"image_ctx": (0, image_ctx, None)}
        return video, {"text": (0, text, None)}
    return layout


@dataclass
class Case:
    build: Callable
    inputs: Callable[..., dict]
    layout: Callable
    layers: dict[str, set[int]]       # layer name -> steps it runs (of a 2-step run)
    batched_cfg: bool                 # SD3: [uncond, cond] halves in one call; else one call per branch
    branches: set = field(default_factory=lambda: {"cond", "uncond"})
    pool: object = 2

    def calls(self, step: int, branch: str | None) -> tuple[int, slice]:
        """Which denoiser call (counted over all denoisers) and which batch rows hold (step, branch)."""
        if self.batched_cfg:
            return step, slice(0, 1) if branch == "uncond" else slice(1, 2)
        per_step = len(self.branches)
        return per_step * step + (branch == "uncond"), slice(None)


def _blocks(prefix: str, n: int, names: tuple[str, ...], steps: set[int]) -> dict[str, set[int]]:
    return {f"{prefix}.{i}.{a}": steps for i in range(n) for a in names}


BOTH = {0, 1}
CASES = {
    # SD3.5-style: dual attention (attn2) in block 0, block 1 context_pre_only; pool 3 does not divide 8.
    "sd3": Case(lambda: tiny_sd3(dual=True), sd3_inputs, sd3_layout,
                {**_blocks("transformer.transformer_blocks", 2, ("attn",), BOTH),
                 "transformer.transformer_blocks.0.attn2": BOTH}, batched_cfg=True, pool=3),
    # Flux with true CFG (cond call, then uncond call); (t, h, w) pool folds to (h, w) = (3, 2) on images.
    "flux": Case(tiny_flux, lambda **kw: flux_inputs(true_cfg=True, **kw), flux_layout,
                 {"transformer.transformer_blocks.0.attn": BOTH, "transformer.single_transformer_blocks.0.attn": BOTH},
                 batched_cfg=False, pool=(2, 3, 2)),
    # Wan 2.1 T2V, pool (2, 2, 2) on a 3x3x5 grid: no axis divides.
    "wan": Case(tiny_wan, wan_inputs, wan_layout(WAN_TEXT), _blocks("transformer.blocks", 2, ("attn1", "attn2"), BOTH),
                batched_cfg=False, pool=(2, 2, 2)),
    # Wan 2.2: transformer for step 0 (t=1000 >= 0.9 * 1000), transformer_2 for step 1; int pool = (1, 2, 2).
    "wan22": Case(lambda: tiny_wan(two=True), wan_inputs, wan_layout(WAN_TEXT),
                  {**_blocks("transformer.blocks", 2, ("attn1", "attn2"), {0}),
                   **_blocks("transformer_2.blocks", 2, ("attn1", "attn2"), {1})}, batched_cfg=False, pool=2),
    # Wan 2.1 I2V: 17 CLIP image tokens and 512 text tokens, two SDPA calls per attn2.
    "wan_i2v": Case(tiny_wan_i2v, wan_i2v_inputs, wan_layout(WAN_I2V_TEXT, image_ctx=17),
                    _blocks("transformer.blocks", 2, ("attn1", "attn2"), BOTH), batched_cfg=False, pool=(3, 2, 2)),
    # Wan 2.2 TI2V: per-token timesteps, 0 on the first (image) frame: steps must still advance.
    "wan_ti2v": Case(tiny_wan_ti2v, wan_ti2v_inputs, wan_layout(WAN_TEXT),
                     _blocks("transformer.blocks", 2, ("attn1", "attn2"), BOTH), batched_cfg=False, pool=(3, 1, 4)),
}



@pytest.fixture(scope="module")
def pipes():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = CASES[name].build()
        return cache[name]

    return get


# ------------------------------------------------------------------------------ ground truth
def denoisers(pipe) -> list[tuple[str, torch.nn.Module]]:
    return [(n, getattr(pipe, n)) for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]


def processors(pipe) -> dict[str, object]:
    return {f"{c}.{n}": m.processor for c, model in denoisers(pipe) for n, m in model.named_modules()
            if hasattr(m, "processor")}


def record_qk(pipe, inputs: dict) -> dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor, float | None]]:
    """(denoiser call, layer, SDPA call within the layer) -> (q, k, scale) from a plain run."""
    seen: dict = {}
    cur = {"call": -1, "layer": None, "index": 0}
    hooks = []
    for component, model in denoisers(pipe):
        hooks.append(model.register_forward_pre_hook(lambda m, a: cur.update(call=cur["call"] + 1)))
        for name, module in model.named_modules():
            if hasattr(module, "processor"):
                hooks.append(module.register_forward_pre_hook(
                    lambda m, a, n=f"{component}.{name}": cur.update(layer=n, index=0)))
                hooks.append(module.register_forward_hook(lambda m, a, o: cur.update(layer=None)))

    def handler(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # diffusers' dispatch passes query=, key=, value= by keyword: the names must be SDPA's.
        if cur["layer"] is not None:  # inside a denoiser's attention module (not the VAE's)
            assert attn_mask is None and not is_causal and not enable_gqa
            seen[(cur["call"], cur["layer"], cur["index"])] = (query.detach().double(), key.detach().double(), scale)
            cur["index"] += 1
        return None

    try:
        with intercept_sdpa(handler):
            pipe(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def factors(grid, pool) -> tuple[int, ...] | None:
    """attncap's pool on a grid: an int pools (h, w); (t, h, w) factors keep their last two on images."""
    if grid is None or pool is None:
        return None
    if isinstance(pool, int):   # (h, w) of 2D/3D grids, the one axis of a 1D (audio) grid
        return (1,) * max(0, len(grid) - 2) + (pool,) * min(2, len(grid))
    return tuple(pool[-len(grid):])


def pooled(x: torch.Tensor, axis: int, grid, f) -> torch.Tensor:
    """Mean over blocks of f tokens per grid axis (edge blocks smaller) of ``axis`` (row-major over grid)."""
    if grid is None or f is None:
        return x
    x = x.movedim(axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(*lead, *grid)
    for d, size in enumerate(f):
        dim = len(lead) + d
        x = torch.stack([chunk.mean(dim) for chunk in x.split(size, dim)], dim)
    return x.reshape(*lead, -1).movedim(-1, axis)


def pooled_grid(grid, f):
    return None if grid is None else grid if f is None else tuple(-(-g // s) for g, s in zip(grid, f))


def expected(kind: str, q, k, scale, rows: slice, qseg: Seg, kseg: Seg, pool, heads, keys=None) -> torch.Tensor:
    """The product from an explicit float64 softmax over ALL keys."""
    d = q.shape[-1]
    p = (q[rows] @ k[rows].transpose(-1, -2) * (d ** -0.5 if scale is None else scale)).softmax(-1)
    p = p[:, :, qseg[0]:qseg[1]]                            # the relation's queries, every key
    qf, kf = factors(qseg[2], pool), factors(kseg[2], pool)
    if kind == "map":
        x = p[..., kseg[0]:kseg[1]]
    elif kind == "tokens":
        x = p[..., [kseg[0] + t for t in keys]]
    elif kind == "entropy":
        x = -(p * p.clamp_min(1e-300).log()).sum(-1)
    elif kind == "peak":
        x = p.amax(-1)
    elif kind == "colsum":
        x = p[..., kseg[0]:kseg[1]].sum(2)
    else:
        raise AssertionError(kind)
    x = x.mean(1, keepdim=True) if heads == "mean" else x if heads == "all" else x[:, list(heads)]
    if kind == "colsum":
        return pooled(x, 2, kseg[2], kf)
    x = pooled(x, 2, qseg[2], qf)
    return pooled(x, 3, kseg[2], kf) if kind == "map" else x


def check_against_truth(case: Case, store, qk, pool, heads="mean", tokens=None) -> int:
    """Every record equals the explicit computation; returns how many were checked."""
    for r in store.records:
        call, rows = case.calls(r.step, r.branch)
        a, b = r.relation.split("->")
        index = 0
        if case.layout(r.layer, 0)[1].get(b) is None:  # the I2V text call comes second
            index = 1
        qsegs, ksegs = case.layout(r.layer, index)
        q, k, scale = qk[(call, r.layer, index)]
        assert q.shape[-2] == max(s[1] for s in qsegs.values()) and k.shape[-2] == max(s[1] for s in ksegs.values())
        qseg, kseg = qsegs[a], ksegs[b]
        want = expected(r.kind, q, k, scale, rows, qseg, kseg, pool, heads,
                        keys=r.meta.get("keys") if r.kind == "tokens" else None)
        assert r.data.dtype == torch.float32 and r.data.shape == want.shape, (r.layer, r.relation, r.kind)
        assert r.query_grid == pooled_grid(qseg[2], factors(qseg[2], pool))
        assert r.key_grid == pooled_grid(kseg[2], factors(kseg[2], pool))
        torch.testing.assert_close(r.data.double(), want, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{r.layer} {r.relation} {r.kind} step {r.step} {r.branch}: {m}")
    return len(store.records)


def latent_inputs(case: Case, **kw) -> dict:
    return {**case.inputs(**kw), "output_type": "latent"}


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(CASES))
def test_every_map_equals_explicit_softmax(pipes, name):
    case, pipe = CASES[name], pipes(name)
    qk = record_qk(pipe, latent_inputs(case))
    with attncap.capture(pipe, relations="all", pool=case.pool, stats=("entropy", "peak", "colsum")) as store:
        pipe(**latent_inputs(case))
    # One record per (layer, relation, kind, step, branch): exactly the layers and relations of the layout.
    got = sorted((r.layer, r.relation, r.kind, r.step, r.branch) for r in store.records)
    want = []
    for layer, steps in case.layers.items():
        for index in range(2 if name == "wan_i2v" and layer.endswith("attn2") else 1):
            qsegs, ksegs = case.layout(layer, index)
            want += [(layer, f"{a}->{b}", kind, s, br) for a in qsegs for b in ksegs
                     for kind in ("map", "entropy", "peak", "colsum") for s in steps for br in case.branches]
    assert got == sorted(want)
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-3 for r in store.records)
    assert check_against_truth(case, store, qk, case.pool) == len(want)


def test_relation_layouts_by_name(pipes):
    """Spot checks of the DESIGN names and shapes: [B, G, Qb, Kb], segments in token order."""
    with attncap.capture(pipes("sd3"), relations=["image->text", "text->image"]) as store:
        pipes("sd3")(**latent_inputs(CASES["sd3"], steps=1))
    (r,) = store.get(layer="transformer.transformer_blocks.1.attn", relation="image->text", branch="cond")
    assert r.data.shape == (1, 1, NI, SD3_TEXT) and r.query_grid == IMAGE_GRID and r.key_grid is None
    assert r.meta["query_segment"] == [0, NI] and r.meta["key_segment"] == [NI, NI + SD3_TEXT]
    (r,) = store.get(layer="transformer.transformer_blocks.0.attn", relation="text->image", branch="uncond")
    assert r.data.shape == (1, 1, SD3_TEXT, NI) and r.key_grid == IMAGE_GRID
    assert not store.get(layer="*attn2")  # SD3.5's image-only attention has no text

    with attncap.capture(pipes("flux"), relations="image->text") as store:
        pipes("flux")(**latent_inputs(CASES["flux"], steps=1))
    (r,) = store.get(layer="transformer.single_transformer_blocks.0.attn", branch="cond")
    assert r.data.shape == (1, 1, NI, FLUX_TEXT) and r.meta["query_segment"] == [FLUX_TEXT, FLUX_TEXT + NI]
    assert r.meta["key_segment"] == [0, FLUX_TEXT]


@pytest.mark.parametrize("name", list(CASES))
def test_output_unchanged_and_processors_restored(pipes, name):
    case, pipe = CASES[name], pipes(name)
    before = processors(pipe)
    hooks_before = [dict(m._forward_pre_hooks) for _, m in denoisers(pipe)]
    out = lambda o: o.images if hasattr(o, "images") else o.frames  # noqa: E731
    plain = out(pipe(**case.inputs()))
    with attncap.capture(pipe, relations="all", heads="all", pool=case.pool, stats=("entropy", "colsum")) as store:
        wrapped = processors(pipe)
        assert all(type(wrapped[n]).__name__ == "Capture" + type(before[n]).__name__ for n in before)
        captured = out(pipe(**case.inputs()))
    assert len(store.records) > 0 and torch.isfinite(plain).all()
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert [dict(m._forward_pre_hooks) for _, m in denoisers(pipe)] == hooks_before


def test_default_relations_are_text_cross_attention(pipes):
    with attncap.capture(pipes("sd3")) as store:
        pipes("sd3")(**latent_inputs(CASES["sd3"], steps=1))
    assert {r.relation for r in store.records} == {"image->text"}
    with attncap.capture(pipes("wan_i2v"), steps=[1]) as store:
        pipes("wan_i2v")(**latent_inputs(CASES["wan_i2v"]))
    assert {(r.relation, r.step) for r in store.records} == {("video->text", 1)}
    assert {r.layer for r in store.records} == {"transformer.blocks.0.attn2", "transformer.blocks.1.attn2"}


@pytest.mark.parametrize("name,tokens,pool,heads", [
    ("wan", [0, 2, 5], (2, 2, 2), "all"),          # video grid 3x3x5 -> 2x2x3 bins
    ("wan_i2v", [1, 300, 511], 2, [1]),            # tokens index the text segment, not image_ctx
    ("sd3", [0, 3, 6], None, "all"),               # text keys start at 96 in the joint sequence
    ("flux", [2, 4], (1, 3, 5), "mean"),
])
def test_tokens_records_and_video_pooling(pipes, name, tokens, pool, heads):
    case, pipe = CASES[name], pipes(name)
    qk = record_qk(pipe, latent_inputs(case))
    with attncap.capture(pipe, relations="all", tokens=tokens, pool=pool, heads=heads, steps="last") as store:
        pipe(**latent_inputs(case))
    assert {r.step for r in store.records} == {1}
    spatial = "video" if name.startswith("wan") else "image"
    text_rel = [f"{spatial}->text", "text->text"]
    toks = store.get(kind="tokens", relation=text_rel)
    assert toks and all(r.meta["keys"] == tokens for r in toks)
    assert not store.get(relation=text_rel, kind="map")  # text keys: token maps only
    g = len(heads) if isinstance(heads, list) else (2 if heads == "all" else 1)
    assert all(r.data.shape[:2] == (1, g) and r.data.shape[-1] == len(tokens) for r in toks)
    if name.startswith("wan"):
        (r,) = store.get(layer="transformer.blocks.0.attn2", relation="video->text", kind="tokens", branch="cond")
        f = factors(VIDEO_GRID, pool)
        assert r.query_grid == pooled_grid(VIDEO_GRID, f) and r.data.shape[2] == math.prod(r.query_grid)
    check_against_truth(case, store, qk, pool, heads=heads, tokens=tokens)
    # token_map of a key index: [*query grid] from the cond branch, the mean of the matching token records
    m = store.token_map(tokens[-1], relation=f"{spatial}->text")
    recs = store.get(kind="tokens", relation=f"{spatial}->text", branch="cond")
    assert m.shape == recs[0].query_grid
    torch.testing.assert_close(m.reshape(-1), torch.stack([r.data[0, :, :, -1].mean(0) for r in recs]).mean(0))


def test_wan22_both_transformers_and_bare_model(pipes):
    pipe = pipes("wan22")
    with attncap.capture(pipe, layers="*blocks.1.attn2", steps="all") as store:
        pipe(**latent_inputs(CASES["wan22"], steps=3))
    # Steps 0 (t=1000) on transformer; 1 and 2 below the 900 boundary on transformer_2; cond + uncond each.
    assert sorted((r.layer.split(".")[0], r.step, r.branch) for r in store.records) == sorted(
        [("transformer", 0, b) for b in ("cond", "uncond")] +
        [("transformer_2", s, b) for s in (1, 2) for b in ("cond", "uncond")])
    # A bare denoiser (no pipeline): layer names still start with "transformer".
    flux = pipes("flux")
    before = processors(flux)
    with attncap.capture(flux.transformer, relations="image->text") as store:
        flux(**latent_inputs(CASES["flux"], steps=1))
    assert {r.layer for r in store.records} == {"transformer.transformer_blocks.0.attn",
                                                "transformer.single_transformer_blocks.0.attn"}
    assert {r.branch for r in store.records} == {"cond", "uncond"}
    assert all(m is before[n] for n, m in processors(flux).items())


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,extra", [("capture_sd", []), ("capture_sd3", ["--relations", "all"]),
                                          ("capture_flux", []), ("capture_wan", ["--tiny", "wan_i2v"])])
def test_examples_run_with_tiny_pipelines(tmp_path, capsys, script, extra):
    spec = importlib.util.spec_from_file_location(f"example_{script}", EXAMPLES / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main((extra if extra[:1] == ["--tiny"] else ["--tiny"] + extra) + ["--steps", "1", "--out", str(tmp_path)])
    store = attncap.load(tmp_path)
    assert len(store.records) > 0 and f"saved {len(store.records)} records" in capsys.readouterr().out
    assert {r.step for r in store.records} == {0}


def test_budget_counts_one_denoiser_per_step_and_both_true_cfg_calls(pipes):
    # Wan 2.2 runs one of its two transformers per step: a budget that holds the real run passes,
    # half of it is refused before the first step.
    wan = pipes("wan22")
    kw = dict(layers="*attn2", stats=("entropy",))
    with attncap.capture(wan, **kw) as store:
        wan(**latent_inputs(CASES["wan22"], steps=3))
    need = store.nbytes
    with attncap.capture(wan, max_bytes=need, **kw) as store:
        wan(**latent_inputs(CASES["wan22"], steps=3))
    assert store.nbytes == need
    with pytest.raises(ValueError, match="max_bytes"):
        with attncap.capture(wan, max_bytes=need // 2, **kw) as store:
            wan(**latent_inputs(CASES["wan22"], steps=3))
    assert len(store) == 0
    # Flux's true CFG (a second transformer call per step) is visible only when that call comes: the
    # budget is checked again there, before anything of the second call is stored.
    flux = pipes("flux")
    kw = dict(stats=("entropy",))
    with attncap.capture(flux, **kw) as store:
        flux(**latent_inputs(CASES["flux"], steps=2))
    assert {r.branch for r in store.records} == {"cond", "uncond"}
    need = store.nbytes
    with pytest.raises(ValueError, match="max_bytes"):
        with attncap.capture(flux, max_bytes=need * 3 // 4, **kw) as store:
            flux(**latent_inputs(CASES["flux"], steps=2))
    assert len(store) and {(r.step, r.branch) for r in store.records} == {(0, "cond")}
