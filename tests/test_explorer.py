"""The explorer page (attncap.explore / attncap explore) in a real headless Chromium.

A planted store (known hot spots, two heads that differ, CFG branches, awkward grids 12x18 and 5x7,
a repeated word and a word of two tokens) is written as a page; the page's test API must give back
the store's values (probe = the stored row, each word the mean of its tokens, within the uint8
quantisation step), its canvases must show the hot spots where they were planted and change with
the word and the step, and it must load without console errors or any request. Video grids, a
language model's generated tokens and a real run of the embedded demo model get a page each.
Python-side pieces (pooling, quantisation, words, size limit, errors) are tested without a browser.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import attncap
from attncap import Record, Store
from attncap import analysis as A
from attncap.cli import main
from attncap.viz.core import short_layer
from attncap.viz.explorer import ALL_LAYERS, ExplorerTooLarge, page_words, pool_axis, quantise

import browser

TOKENS = ["<|startoftext|>", "a</w>", "gir", "affe</w>", "on</w>", "a</w>", "red</w>", "sofa</w>", "<|endoftext|>"]
PROMPT = "a giraffe on a red sofa"
WORDS = ["a", "giraffe", "on", "a#2", "red", "sofa"]
KEYS = {"a": [1], "giraffe": [2, 3], "on": [4], "a#2": [5], "red": [6], "sofa": [7]}
GIRAFFE, SOFA = (0.3, 0.7), (0.75, 0.3)
L1, L2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2", "unet.mid_block.attentions.0.transformer_blocks.0.attn2"
GRIDS = {L1: (12, 18), L2: (5, 7)}
SELF = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1", (12, 18))
POINTS = [GIRAFFE, SOFA, (0.0, 0.0), (0.999, 0.999), (0.41, 0.13)]

pytestmark = pytest.mark.usefixtures("one_thread")


def blob(grid, centre, sigma=0.1):
    h, w = grid
    yy, xx = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    return torch.exp(-((yy[:, None] - centre[0]) ** 2 + (xx[None] - centre[1]) ** 2) / (2 * sigma**2)).reshape(-1)


def text_map(grid, step: int, centre_shift: float = 0.0) -> torch.Tensor:
    """[1, 2, h*w, 9]: random rows (softmax) with "giraffe" hot at GIRAFFE and "sofa" at SOFA, sharper
    with the step; head 1 sees the giraffe shifted by centre_shift (so heads differ)."""
    n = grid[0] * grid[1]
    heads = []
    for h in range(2):
        s = torch.randn(n, 9) * 0.3
        s[:, 0] += 2.0  # the start token: a sink
        g = blob(grid, (GIRAFFE[0], GIRAFFE[1] - h * centre_shift)) * (2 + 2 * step)
        s[:, 2] += g
        s[:, 3] += 0.8 * g
        s[:, 7] += blob(grid, SOFA) * (2 + 2 * step)
        heads.append(s.softmax(-1))
    return torch.stack(heads)[None]


def self_map(grid) -> torch.Tensor:
    h, w = grid
    y = ((torch.arange(h) + 0.5) / h).repeat_interleave(w)
    x = ((torch.arange(w) + 0.5) / w).repeat(h)
    s = -((y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2) / (2 * 0.12**2) + torch.randn(h * w, h * w) * 0.1
    return s.softmax(-1)[None, None]


def planted_store() -> Store:
    store = Store(tokens={"text": list(TOKENS), "prompt": PROMPT})
    for step in range(3):
        t = 999.0 - 400 * step
        for layer, grid in GRIDS.items():
            store.add(Record(layer, step, t, "image->text", "map", "cond", text_map(grid, step, 0.4), grid, None,
                             heads=(0, 1)))
            store.add(Record(layer, step, t, "image->text", "map", "uncond", text_map(grid, 0) * 0 + 1 / 9, grid,
                             None, heads=(0, 1)))
        store.add(Record(SELF[0], step, t, "image->image", "map", "cond", self_map(SELF[1]), SELF[1], SELF[1]))
    return store


def expected_row(store: Store, layer: str, step: int, branch: str, point, head=None) -> dict[str, float]:
    """The store's {word: weight} at a point: the record's row (a head, or their mean), each word the
    mean of its keys; for "all layers" the row of analysis.aggregate (head mean, largest grid)."""
    if layer == ALL_LAYERS:
        agg = A.aggregate(store, None, step=step, branch=branch)
        row = agg.data.reshape(-1, agg.data.shape[-1])[A.bin_of(point, agg.grid)]
    else:
        (r,) = store.get(layer=layer, step=step, branch=branch)
        x = r.data[0] if head is None else r.data[0, [r.heads.index(head)]]
        row = x.mean(0)[A.bin_of(point, r.query_grid)]
    return {w: float(row[k].mean()) for w, k in KEYS.items()}


def quant_tol(store: Store, layer: str, step: int, branch: str) -> float:
    """Half a uint8 level of the largest column (the page's per-column scale) plus float32 rounding."""
    if layer == ALL_LAYERS:
        return float(A.aggregate(store, None, step=step, branch=branch).data.max()) / 510 + 1e-6
    (r,) = store.get(layer=layer, step=step, branch=branch)
    return float(r.data.max()) / 510 + 1e-6


def hot(px: np.ndarray) -> tuple[float, float]:
    """(y, x) fractions of the centroid of the brightest 2% of a canvas (inferno: bright = high)."""
    lum = px[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    ys, xs = np.nonzero(lum >= np.quantile(lum, 0.98))
    return (ys.mean() + 0.5) / px.shape[0], (xs.mean() + 0.5) / px.shape[1]


@pytest.fixture(scope="module")
def chromium():
    browser.require()
    with browser.browser() as b:
        yield b


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store = planted_store()
    path = attncap.explore(store, tmp_path_factory.mktemp("explorer") / "page.html", meta={"model": "planted"})
    return store, path


# ----------------------------------------------------------------------------------------------
# in the browser
# ----------------------------------------------------------------------------------------------

def test_page_loads_offline_with_the_stores_words_steps_and_layers(chromium, planted):
    store, path = planted
    page = browser.Page(chromium, path)
    assert page.js("attncap.words()") == WORDS  # "giraffe" merges gir|affe; the second "a" is its own chip
    assert page.js("attncap.steps()") == [0, 1, 2]
    assert page.js("attncap.layers()") == [ALL_LAYERS, L1, L2]
    assert page.js("attncap.branches()") == ["cond", "uncond"]
    assert page.js("attncap.heads()") == [] and page.js("(attncap.setLayer(%r), attncap.heads())" % L1) == [0, 1]
    chips = page.js("Array.from(document.querySelectorAll('#chips .chip')).map(c => c.textContent)")
    assert chips == ["a", "giraffegir|affe", "on", "a#2", "red", "sofa"]
    options = page.js("Array.from(document.querySelectorAll('#layer option')).map(o => o.textContent)")
    assert options[1:] == [short_layer(L1), short_layer(L2)] == ["down0.a0.t0.attn2", "mid.a0.t0.attn2"]
    assert not page.errors and not page.requests
    html = path.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    page.close()


def test_probe_is_the_stored_row_for_every_layer_step_branch_and_head(chromium, planted):
    store, path = planted
    page = browser.Page(chromium, path)
    checked = 0
    for branch in ("cond", "uncond"):
        page.js(f"attncap.setBranch({branch!r})")
        for layer in (ALL_LAYERS, L1, L2):
            page.js(f"attncap.setLayer({layer!r})")
            for step in (0, 2):
                page.js(f"attncap.setStep({step})")
                tol = quant_tol(store, layer, step, branch)
                for head in ((None, 1) if layer != ALL_LAYERS else (None,)):
                    page.js(f"attncap.setHead({json.dumps('mean' if head is None else head)})")
                    for y, x in POINTS:
                        got = page.js(f"attncap.probe({y}, {x})")
                        want = expected_row(store, layer, step, branch, (y, x), head)
                        assert list(got) == WORDS
                        for w in WORDS:
                            assert abs(got[w] - want[w]) <= tol, (branch, layer, step, head, (y, x), w, got[w], want[w])
                        checked += 1
    assert checked == 2 * 5 * (1 + 2 + 2) * 2  # points x (all layers + 2 layers x 2 heads) x steps, per branch
    assert not page.errors
    page.close()


def test_canvas_shows_the_planted_hot_spots_and_follows_word_and_step(chromium, planted):
    _, path = planted
    page = browser.Page(chromium, path)
    page.js(f"attncap.setLayer({L1!r}); attncap.setStep(2); attncap.setHead(0); attncap.select('giraffe')")
    giraffe = page.pixels()
    assert max(abs(a - b) for a, b in zip(hot(giraffe), GIRAFFE)) < 0.08, hot(giraffe)
    page.js("attncap.select('sofa')")
    sofa = page.pixels()
    assert max(abs(a - b) for a, b in zip(hot(sofa), SOFA)) < 0.08, hot(sofa)
    page.js("attncap.setStep(0)")
    assert np.abs(page.pixels().astype(int) - sofa).mean() > 1  # another step, other pixels
    page.js("attncap.setHead(1); attncap.setStep(2); attncap.select('giraffe')")
    y, x = hot(page.pixels())
    assert abs(y - GIRAFFE[0]) < 0.08 and abs(x - (GIRAFFE[1] - 0.4)) < 0.08  # head 1's giraffe sits 0.4 left
    caption = page.js("document.getElementById('caption').textContent")
    assert "giraffe" in caption and "step 2" in caption and "head 1" in caption and "cond" in caption
    ticks = page.js("document.getElementById('ticks').textContent")
    assert ticks.startswith("0") and len(ticks) > 3  # the colour bar names its scale
    assert not page.errors
    page.close()


def test_hover_draws_the_words_bars_and_click_shows_self_attention(chromium, planted):
    store, path = planted
    page = browser.Page(chromium, path)
    box = page.page.locator("#main").bounding_box()
    at = lambda y, x: (box["x"] + x * box["width"], box["y"] + y * box["height"])  # noqa: E731
    page.page.mouse.move(*at(*GIRAFFE))
    bars = page.js("Array.from(document.querySelectorAll('#bars .bar .name')).map(n => n.textContent)")
    assert bars == WORDS
    before = page.pixels("self")
    page.page.mouse.click(*at(*SOFA))
    after = page.pixels("self")
    assert np.abs(after.astype(int) - before).mean() > 1
    row = np.array(page.js(f"attncap.selfAt({SOFA[0]}, {SOFA[1]}).values"))
    (r,) = store.get(layer=SELF[0], step=0)
    want = r.data[0, 0, A.bin_of(SOFA, SELF[1])].numpy()
    assert np.abs(row - want).max() <= want.max() / 510 + 1e-7
    # the self-attention canvas is hot around the clicked point
    y, x = hot(after)
    assert abs(y - SOFA[0]) < 0.1 and abs(x - SOFA[1]) < 0.1
    assert not page.errors
    page.close()


def test_video_grids_get_a_frame_scrubber(chromium, tmp_path):
    grid = (3, 6, 8)
    store = Store(tokens={"text": ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"], "prompt": "a cat"})
    data = torch.full((1, 1, math.prod(grid), 4), 0.1)
    spot = torch.zeros(grid)
    spot[2, 1, 6] = 1.0  # the cat only in map frame 2, top right
    data[0, 0, :, 2] += spot.reshape(-1)
    store.add(Record("transformer.blocks.0.attn2", 0, 999.0, "video->text", "map", None, data / data.sum(-1, keepdim=True),
                     grid, None))
    video = np.zeros((6, 24, 32, 3), np.uint8)  # 6 video frames over 3 map frames: frames 4, 5 show map frame 2
    path = attncap.explore(store, tmp_path / "video.html", video=video)
    page = browser.Page(chromium, path)
    assert page.js("document.getElementById('frame-row').hidden") is False
    page.js("attncap.setFrame(1)")
    assert page.js("attncap.probe(0.25, 0.8)")["cat"] == pytest.approx(0.1 / 0.4, abs=1e-3)
    page.js("attncap.setFrame(5)")
    assert page.js("attncap.probe(0.25, 0.8)")["cat"] == pytest.approx(1.1 / 1.4, abs=3e-3)
    assert not page.errors
    page.close()


def test_language_model_page_shows_each_generated_tokens_map(chromium, tmp_path):
    grid = (4, 6)
    store = Store(tokens={"generated": ["A", " cat", " on", " mat"]})
    for s in range(4):
        row = torch.rand(1 if s else 5, 24) * 0.01
        row[-1, s * 6 + 2] = 0.5  # token s looks at row s of the picture
        store.add(Record("model.language_model.layers.0.self_attn", s, None, "text->image", "map", None,
                         row[None, None], None, grid))
    path = attncap.explore(store, tmp_path / "vlm.html", image=np.full((40, 60, 3), 90, np.uint8))
    page = browser.Page(chromium, path)
    assert page.js("attncap.generated()") == ["A", " cat", " on", " mat"]
    assert page.js("document.getElementById('maps-section').hidden") is True
    for s in (0, 3):
        page.js(f"attncap.setToken({s})")
        y, _ = hot(page.pixels("gen"))
        assert abs(y - (s + 0.5) / 4) < 0.1
        assert f"token {s}" in page.js("document.getElementById('gen-caption').textContent")
    assert not page.errors
    page.close()


def test_a_demo_run_page_is_small_and_holds_the_run(chromium, tmp_path):
    assert main(["run", "shapes", "--prompt", "a red circle and a blue square", "--steps", "6", "--relations",
                 "image->text,image->image", "--layers", "*attn2*,unet.down_blocks.1.*attn1*", "--no-render", "--quiet",
                 "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert main(["explore", str(run)]) == 0
    path = run / "explorer.html"
    assert path.stat().st_size < 25 * 2**20
    store = attncap.load(run)
    page = browser.Page(chromium, path, height=1400)
    assert page.js("attncap.words()") == ["a", "red", "circle", "and", "a#2", "blue", "square"]
    page.js("attncap.setStep(5); attncap.select('circle')")
    agg = A.aggregate(store, None, step=5)
    got = page.js("attncap.probe(0.5, 0.5)")
    want = agg.data.reshape(-1, agg.data.shape[-1])[A.bin_of((0.5, 0.5), agg.grid)]
    assert got["circle"] == pytest.approx(float(want[2]), abs=float(agg.data.max()) / 510 + 1e-6)
    img = page.page.screenshot(full_page=True)
    assert len(img) > 20_000 and not page.errors
    page.close()


# ----------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------

def test_pool_axis_averages_uneven_cells_like_the_store():
    x = torch.rand(2, 5 * 7, 3)
    y, grid = pool_axis(x, 1, (5, 7), 2)
    assert grid == (3, 4) and y.shape == (2, 12, 3)
    cells = x.reshape(2, 5, 7, 3)
    assert torch.allclose(y[:, 0], cells[:, :2, :2].mean((1, 2)))
    assert torch.allclose(y[:, 11], cells[:, 4:, 6:].mean((1, 2)))   # the corner cell holds one token
    assert torch.allclose(y[:, 3], cells[:, :2, 6:].mean((1, 2)))
    v, vgrid = pool_axis(torch.rand(3 * 4 * 6), 0, (3, 4, 6), 4)     # video: t kept
    assert vgrid == (3, 1, 2) and v.shape == (6,)


def test_quantise_is_within_half_a_level_of_each_slices_max():
    x = torch.rand(2, 50, 4) ** 3
    x[1, :, 2] = 0
    q, scale = quantise(x, 1)
    assert q.dtype == np.uint8 and scale.shape == (2, 4) and q[1, :, 2].max() == 0
    back = q.astype(np.float64) * scale[:, None, :] / 255
    assert np.all(np.abs(back - x.numpy()) <= scale[:, None, :] / 510 + 1e-7)


def test_words_merge_tokens_and_number_repeats():
    store = planted_store()
    words = page_words(store, store.get(layer=L1))
    assert [w["label"] for w in words] == WORDS
    assert words[1]["keys"] == [2, 3] and words[1]["pieces"] == ["gir", "affe"]
    assert words[3]["text"] == "a" and words[3]["occurrence"] == 2 and words[3]["keys"] == [5]


def test_a_page_over_the_limit_says_what_would_fit(tmp_path, capsys):
    store = planted_store()
    full = attncap.explore(store, tmp_path / "full.html").stat().st_size / 2**20
    limit = round(0.7 * full, 3)
    with pytest.raises(ExplorerTooLarge) as e:
        attncap.explore(store, tmp_path / "p.html", max_mb=limit)
    msg = str(e.value)
    assert f"over the limit of {limit:g} MB" in msg and "pool=2" in msg and "every=2" in msg, msg
    assert "branch='cond'" in msg and "self_attention=False" in msg and "max_mb=" in msg
    (mb,) = [m for o, _, m in e.value.options if o == "pool"]
    small = attncap.explore(store, tmp_path / "p.html", pool=2, max_mb=limit).stat().st_size / 2**20
    assert small < limit and small == pytest.approx(mb, rel=0.5)   # the advice's estimate holds
    store.save(tmp_path / "run")
    assert main(["explore", str(tmp_path / "run"), "--max-mb", str(limit)]) == 2
    err = capsys.readouterr().err
    assert "--pool 2" in err and "--every 2" in err and "--no-self" in err and "--max-mb" in err and "pool=" not in err


@pytest.mark.parametrize("kwargs, says", [
    (dict(pool=0), "pool must be a positive int"),
    (dict(every=1.5), "every must be a positive int"),
    (dict(max_mb=-1), "max_mb must be a positive number"),
    (dict(branch="neg"), "branch='neg': the store's records have branches ['cond', 'uncond']"),
    (dict(layers="*attn9*"), "nothing to explore"),
])
def test_bad_options_are_named(tmp_path, kwargs, says):
    with pytest.raises(ValueError, match="^" + __import__("re").escape(says)):
        attncap.explore(planted_store(), tmp_path / "p.html", **kwargs)


def test_path_must_be_html(tmp_path):
    with pytest.raises(ValueError, match="must end in .html"):
        attncap.explore(planted_store(), tmp_path / "p.png")
