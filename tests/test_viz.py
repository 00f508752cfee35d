"""Pictures read back: planted hot spots must appear where they were planted in the heatmap PNGs,
the overlays, the GIF/MP4 frames, the video overlay and the generation view; labels must be the
tokens' labels; render_all and the report must hold what they promise.

Panels are found in a picture as solid non-white rectangles (tiles sit on a white canvas); the hot
spot of a panel is the centroid of its brightest pixels (inferno: brightness grows with the value).
"""
from __future__ import annotations

import re

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from attncap import Record, Store, viz
from attncap import analysis as A
from attncap.render import render_all
from attncap.viz.core import grid, text_width
from test_analysis import GIRAFFE, LAYERS, RED, STEPS, blob, close, planted_store, text_map

GREY = np.full((96, 144, 3), 128, np.uint8)

pytestmark = pytest.mark.usefixtures("one_thread")


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def panels(img: np.ndarray, min_side: int = 24) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the solid non-white rectangles, row by row, left to right."""
    solid = (img[..., :3] < 245).any(-1)
    out = []
    for y0, y1 in runs(np.array([max((b - a for a, b in runs(r)), default=0) >= min_side for r in solid])):
        if y1 - y0 < min_side:
            continue
        cols = solid[y0:y1].mean(0) > 0.97
        out += [(y0, y1, x0, x1) for x0, x1 in runs(cols) if x1 - x0 >= min_side]
    return out


def hot_spot(img: np.ndarray, box=None) -> tuple[float, float]:
    """(y, x) fractions of the box of the centroid of the brightest 3% of its pixels."""
    if box is not None:
        img = img[box[0]:box[1], box[2]:box[3]]
    lum = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    ys, xs = np.nonzero(lum >= np.quantile(lum, 0.97))
    return (ys.mean() + 0.5) / img.shape[0], (xs.mean() + 0.5) / img.shape[1]


def brightness(img, box) -> float:
    return float(img[box[0]:box[1], box[2]:box[3], :3].astype(np.float32).max(-1).max())


def label_matches(img, box, text, size=13) -> bool:
    """The label drawn under a tile is exactly ``text`` in the grid's font (not cut short: the cell
    may be wider than the tile, with its colour bar beside it)."""
    w = text_width(text, size) + 2
    ref = grid([[np.zeros((4, w, 3), np.uint8)]], [[text]], pad=0)
    ref = ref[4:4 + size + 5, :w]
    got = img[box[1]:box[1] + ref.shape[0], box[2]:box[2] + ref.shape[1]]
    return got.shape == ref.shape and np.array_equal(got, ref)


def read_frames(path) -> np.ndarray:
    """[N, H, W, 3] frames of a GIF (Pillow) or an MP4 (ffmpeg)."""
    if str(path).endswith(".mp4"):
        import imageio.v2 as iio2

        with iio2.get_reader(str(path)) as reader:
            return np.stack([np.asarray(f)[..., :3] for f in reader])
    return iio.imread(path, index=None)[..., :3]



@pytest.fixture(scope="module")
def store():
    return planted_store()


def test_token_heatmaps_png_shows_each_word_where_it_was_planted(store, tmp_path):
    path = tmp_path / "tokens.png"
    viz.token_heatmaps(store, image=GREY, path=path, tile=120)
    img = iio.imread(path)
    words = viz.resolve_words(store)
    assert [lab for lab, _ in words] == ["a", "red", "giraffe (gir|affe)"]
    boxes = panels(img)
    assert len(boxes) == 6  # a heatmap and an overlay per word
    heat, over = boxes[:3], boxes[3:]
    for (lab, _), box in zip(words, heat):
        assert label_matches(img, box, lab), lab
    assert (heat[2][1] - heat[2][0], heat[2][3] - heat[2][2]) == (80, 120)  # the 16x24 aspect ratio
    assert close(hot_spot(img, heat[1]), RED) and close(hot_spot(img, heat[2]), GIRAFFE)
    assert close(hot_spot(img, over[1]), RED) and close(hot_spot(img, over[2]), GIRAFFE)


def test_word_overlay_has_the_image_size_and_the_hot_spot_in_place(store, tmp_path):
    out = viz.word_overlay(store, "giraffe", GREY, path=tmp_path / "o.png")
    back = iio.imread(tmp_path / "o.png")
    assert back.shape == GREY.shape and np.array_equal(back, out)
    assert close(hot_spot(back), GIRAFFE)
    # token indices and labels: index 2 is "red"
    assert close(hot_spot(viz.word_overlay(store, 2, GREY)), RED)


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_evolution_animation_frames_brighten_where_the_word_was_planted(store, tmp_path, ext):
    if ext == "mp4" and not viz.ffmpeg_available():
        pytest.skip("no ffmpeg")
    (path,) = viz.evolution_animation(store, [tmp_path / f"evo.{ext}"], ["giraffe", "red"], fps=2, tile=96)
    frames = read_frames(path)
    assert len(frames) == STEPS
    peaks = []
    for f in frames:
        boxes = panels(f[..., :3])
        assert len(boxes) == 2
        assert close(hot_spot(f, boxes[0]), GIRAFFE, 0.1) and close(hot_spot(f, boxes[1]), RED, 0.1)
        peaks.append(brightness(f, boxes[0]))
    assert peaks[0] < peaks[-1]  # one colour scale over the steps: the word brightens as it sharpens


def test_video_overlay_follows_a_moving_spot(tmp_path):
    t, grid_hw = 4, (6, 8)
    centres = [(0.5, 0.15 + 0.23 * i) for i in range(t)]
    data = torch.stack([blob(grid_hw, c, 0.1) for c in centres])  # [t, h, w] attention to key 1
    m = torch.stack([torch.full_like(data, 0.1), data], -1).reshape(1, 1, -1, 2)
    store = Store()
    store.add(Record("transformer.blocks.0.attn2", 0, 1.0, "video->text", "map", None, m, (t, 6, 8), None))
    video = np.full((8, 48, 64, 3), 100, np.uint8)  # 8 frames, 2 per map frame
    frames = viz.video_overlay(video, A.word_map(store, 1))
    assert len(frames) == 8
    for i, f in enumerate(frames):
        assert close(hot_spot(f), centres[i * t // 8], 0.1)
    paths = viz.video_word_animation(store, 1, video, [tmp_path / "v.gif"], fps=4)
    back = read_frames(paths[0])  # GIF merges identical consecutive frames (their durations add up)
    assert len(back) == 4 and all(close(hot_spot(f), c, 0.1) for f, c in zip(back, centres))
    names = {p.name for p in render_all(store, tmp_path / "r", video=video, tree=False, animations=("gif",),
                                        progress=False)}
    assert {"video_1.gif", "token_heatmaps.png", "report.md"} <= names


def test_head_grid_tiles_show_each_heads_own_spot(tmp_path):
    spots = [(0.25, 0.25), (0.25, 0.75), (0.75, 0.5)]
    grid_hw = (12, 16)
    maps = torch.stack([blob(grid_hw, s) for s in spots]).reshape(1, 3, -1, 1)
    data = torch.cat([torch.full_like(maps, 0.2), maps], -1)
    store = Store(tokens={"text": ["<|startoftext|>", "cat</w>"]})
    store.add(Record("unet.mid_block.attentions.0.transformer_blocks.0.attn2", 0, 1.0, "image->text", "map", "cond",
                     data, grid_hw, None, heads=(0, 3, 5)))
    img = viz.head_grid(store, "cat", path=tmp_path / "h.png", tile=64)
    boxes = panels(img)
    assert len(boxes) == 3
    for box, s, h in zip(boxes, spots, (0, 3, 5)):
        assert close(hot_spot(img, box), s, 0.1) and label_matches(img, box, f"head {h}")


def test_heatmaps_carry_colour_bars_with_their_scale(store):
    from attncap.render import _tree_title
    from attncap.viz.core import colorbar, lut, value_range

    bar = colorbar(0.0, 0.5, 100)
    assert np.array_equal(bar[0, 0], lut()[255]) and np.array_equal(bar[-1, 0], lut()[0])  # top = max
    img = viz.token_heatmaps(store, tile=120)
    words = viz.resolve_words(store)
    for box in panels(img):  # the bar 3 pixels right of each tile spans the map's range
        x = box[3] + 3
        assert np.array_equal(img[box[0], x], lut()[255]) and np.array_equal(img[box[1] - 1, x], lut()[0])
    assert len(panels(img)) == len(words)
    agg = A.aggregate(store)
    lo, hi = value_range(agg.word([3, 4]))
    assert lo < hi and np.isclose(hi, float(agg.word([3, 4]).max()))
    (r,) = store.get(layer=LAYERS[0][0], step=1, branch="cond")
    assert _tree_title(r) == "down0.a0.t0.attn2 · image->text map · step 1 (t = 666) · cond · head mean"


def test_montage_is_layers_by_steps(store, tmp_path):
    img = viz.montage(store, "giraffe", path=tmp_path / "m.png", tile=48)
    boxes = panels(img, 20)
    assert len(boxes) == len(LAYERS) * STEPS
    for box in boxes:
        assert close(hot_spot(img, box), GIRAFFE, 0.12)


def test_self_attention_and_groups_views(store, tmp_path):
    img = viz.self_attention(store, [(0.3, 0.3)], path=tmp_path / "s.png", tile=96)
    (box,) = panels(img)
    assert label_matches(img, box, "query (0.30, 0.30)")
    img = viz.groups_view(store, {"animal": ["giraffe"], "colour": ["red"]}, path=tmp_path / "g.png", tile=96)
    boxes = panels(img)
    seg = img[boxes[2][0]:boxes[2][1], boxes[2][2]:boxes[2][3]]
    h, w = seg.shape[:2]
    from attncap.viz.figures import GROUP_COLOURS

    assert np.array_equal(seg[int(GIRAFFE[0] * h), int(GIRAFFE[1] * w)], GROUP_COLOURS[0])
    assert np.array_equal(seg[int(RED[0] * h), int(RED[1] * w)], GROUP_COLOURS[1])


def test_generation_view_frames_follow_the_generated_tokens(tmp_path):
    steps, grid_hw = 4, (8, 12)
    spots = [(0.5, 0.1 + 0.25 * s) for s in range(steps)]
    store = Store(tokens={"generated": ["A", " cat", " on", " mat"]})
    for s in range(steps):
        nq = 5 if s == 0 else 1  # the prompt's queries at step 0 (prefill), one new token after
        row = 0.3 * blob(grid_hw, spots[s]).reshape(-1) / blob(grid_hw, spots[s]).sum()
        data = row.expand(1, 1, nq, row.numel()).clone()
        store.add(Record("model.layers.3.self_attn", s, None, "text->image", "map", None, data, None, grid_hw))
    st, maps, mass = viz.generation_maps(store)
    assert st == list(range(steps)) and maps.shape == (steps, 8, 12) and torch.allclose(mass, torch.full((4,), 0.3))
    paths = viz.generation_view(store, [tmp_path / "gen.gif"], fps=2)
    frames = read_frames(paths[0])
    assert len(frames) == steps
    for s, f in enumerate(frames):
        left = panels(f[..., :3])[0]
        assert close(hot_spot(f, left), spots[s], 0.1)
    paths = render_all(store, tmp_path / "r", tree=False, animations=("gif",), progress=False)
    assert {"generation.gif", "report.md"} <= {p.name for p in paths}
    assert "generation.gif" in (tmp_path / "r" / "report.md").read_text()


def test_write_animation_pads_frames_and_rejects_unknown_suffixes(tmp_path):
    frames = [np.zeros((10, 12, 3), np.uint8), np.zeros((14, 9, 3), np.uint8)]
    back = read_frames(viz.write_animation(frames, tmp_path / "a.gif"))
    assert back.shape[:3] == (2, 14, 12)
    with pytest.raises(ValueError, match=".gif or .mp4"):
        viz.write_animation(frames, tmp_path / "a.avi")


def test_render_all_writes_every_view_and_the_report_references_them(store, tmp_path):
    paths = render_all(store, tmp_path, image=GREY, groups={"animal": ["giraffe"]}, progress=False)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    for expected in ("token_heatmaps.png", "montage_giraffe.png", "evolution.gif", "masks.png", "masks/giraffe.npy",
                     "words/giraffe.png", "words/giraffe_overlay.png", "self_attention.png", "groups.png",
                     "importance.png", "stats.json", "report.md", "report.html"):
        assert expected in names, expected
    assert all(p.exists() for p in paths)
    tree = [n for n in names if n.startswith("tree/")]
    # per layer and step: cond text maps (+ entropy) of two layers and the self-attention layer
    assert sum(n.endswith(".png") for n in tree) == STEPS * (2 * len(LAYERS) + 1)
    arr = np.load(tmp_path / "tree" / LAYERS[0][0] / "image_to_text-map" / "step_002.npy")
    assert arr.shape == (3, 16, 24)  # one map per word
    mask = np.load(tmp_path / "masks" / "giraffe.npy")
    assert mask.shape == GREY.shape[:2] and mask.dtype == bool
    assert close(hot_spot(iio.imread(tmp_path / "words" / "giraffe_overlay.png")), GIRAFFE)

    md = (tmp_path / "report.md").read_text()
    for ref in re.findall(r"\]\(([^)]+)\)", md):
        assert (tmp_path / ref).exists(), ref
    assert "evolution.gif" in md and "token_heatmaps.png" in md
    table = [l for l in md.splitlines() if l.startswith("| unet.")]
    assert len(table) == len(LAYERS) + 1 and all("affe" in l for l in table if "image->text" in l)
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and "token_heatmaps.png" in html and "Notes" not in md


def test_render_all_without_tokens_or_image_uses_positions(tmp_path):
    store = Store()
    for step in range(2):
        store.add(Record(LAYERS[0][0], step, None, "image->text", "map", None, text_map(LAYERS[0][1], step),
                         LAYERS[0][1], None))
    paths = render_all(store, tmp_path, progress=False, tree=False, animations=("gif",))
    names = {p.name for p in paths}
    assert {"token_heatmaps.png", "evolution.gif", "report.md"} <= names
    assert A.token_importance(store)[0].label == "0"  # positions as labels; nothing is special (the sink wins)


def test_replace_section_keeps_the_other_sections(tmp_path):
    from attncap.report import replace_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n## A\n\na1\n\n## B\n\nb1\n")
    replace_section(path, "## A\n\nnew a\n")
    replace_section(path, "## C\n\nc\n")
    replace_section(path, "## C\n\nc2")
    assert path.read_text() == "# Results\n\nintro\n\n## A\n\nnew a\n\n## B\n\nb1\n\n## C\n\nc2\n"
    with pytest.raises(ValueError, match="heading"):
        replace_section(path, "no heading\n")
