"""Qwen2.5-VL's vision window blocks: each window call captured on the window's own patch grid, its
place on the frame in the tag, maps equal to eager attention of the block, outputs unchanged.

An awkward image (6x10 patches: merge units 3x5, windows of 2x2 units, so the last window row and
column are cut to 1 unit) and a two-frame video in one prompt; the expected windows come from the
rotary position ids and window index transformers computes (tests/test_capture_transformers.py).
"""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

import attncap  # noqa: E402
from test_capture_transformers import IMAGE, VEND, VIDEO, VSTART, eager_call_weights, tiny_qwen2_5_vl, \
    window_layouts  # noqa: E402

WINDOW_BLOCK = "model.visual.blocks.0.attn"  # fullatt_block_indexes=[1]: block 0 attends inside windows
IMAGE_GRID, VIDEO_GRID = (1, 6, 10), (2, 4, 6)


def image_and_video(seed: int = 0) -> dict:
    """text, <vs> 15 image tokens <ve>, text, <vs> 12 video tokens <ve>, text (pixel rows as the processor
    writes them: [t * h * w, C * temporal * p * p])."""
    g = torch.Generator().manual_seed(seed)
    n_img, n_vid = 6 * 10 // 4, 2 * 4 * 6 // 4
    ids = torch.tensor([[5, 6, VSTART] + [IMAGE] * n_img + [VEND, 7, VSTART] + [VIDEO] * n_vid + [VEND, 8, 9]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
                pixel_values=torch.randn(60, 24, generator=g), image_grid_thw=torch.tensor([list(IMAGE_GRID)]),
                pixel_values_videos=torch.randn(48, 24, generator=g), video_grid_thw=torch.tensor([list(VIDEO_GRID)]))


def window_records(store) -> list:
    return store.get(layer=WINDOW_BLOCK)  # filed in call order: the image's windows, then the video's


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


def test_window_blocks_equal_eager_on_window_grids(model):
    inputs = image_and_video()
    eager = eager_call_weights(model, inputs)[WINDOW_BLOCK]
    with torch.no_grad():
        plain = model(**inputs).logits
        with attncap.capture(model, relations="all", heads="all", layers=[WINDOW_BLOCK]) as store:
            captured = model(**inputs).logits
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    expected = window_layouts(model, torch.tensor([list(IMAGE_GRID)])) + \
        window_layouts(model, torch.tensor([list(VIDEO_GRID)]))
    recs = window_records(store)
    # image: 2x3 windows, cut to 2 patch rows / 2 patch cols at the bottom / right; video: 2 per frame
    assert [r.query_grid for r in recs] == [(4, 4), (4, 4), (4, 2), (2, 4), (2, 4), (2, 2)] + [(4, 4), (4, 2)] * 2
    assert [g for g, _, _ in expected] == [r.query_grid for r in recs] and len(eager) == len(recs)
    assert [r.relation for r in recs] == ["image->image"] * 6 + ["video->video"] * 4
    assert recs[5].meta["query_tag"] == "window 5 of 6: rows 4:6, cols 8:10 of (6, 10)"
    assert recs[9].meta["query_tag"] == "frame 1 of 2, window 1 of 2: rows 0:4, cols 4:6 of (4, 6)"
    for rec, (grid, order, (r0, c0)), w in zip(recs, expected, eager):
        rows = re.search(r"rows (\d+):(\d+), cols (\d+):(\d+)", rec.meta["query_tag"]).groups()
        assert tuple(map(int, rows)) == (r0, r0 + grid[0], c0, c0 + grid[1])
        # fp32 softmax of the same scores: a few ulp of probabilities <= 1
        torch.testing.assert_close(rec.data.double(), w[:, :, order][:, :, :, order], atol=2e-6, rtol=1e-5)


def _merge_row(r: int, c: int, w: int, m: int = 2) -> int:
    """Row of patch (r, c) of an (h, w) frame in a Qwen processor's pixel rows (merge blocks of m x m)."""
    return ((r // m) * (w // m) + c // m) * m * m + (r % m) * m + c % m


def test_planted_patch_moves_its_window_cell(model):
    """A patch changed in the pixels changes only its own token before block 0, so in the window map
    only its key column moves (the other columns of a row rescale by one factor) and no other window
    changes: it must sit at its cell of the window whose tag covers it."""
    inputs = image_and_video()
    planted = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    # patch (0, 6): window 1 (rows 0:4, cols 4:8), cell (0, 2) = row-major 2; the tower holds it at index 4 (its
    # second merge unit's first patch), so a record left in the tower's order would point elsewhere
    planted["pixel_values"][_merge_row(0, 6, 10)] += 30
    runs = []
    for inp in (inputs, planted):
        with torch.no_grad(), attncap.capture(model, relations="image->image", heads="all",
                                              layers=[WINDOW_BLOCK]) as store:
            model(**inp)
        runs.append([r.data[0].double() for r in window_records(store)])
    moved = [float((a - b).abs().max()) for a, b in zip(*runs)]
    assert max(moved[:1] + moved[2:]) == 0.0 < moved[1]  # only window 1 changed
    assert window_records(store)[1].meta["query_tag"] == "window 1 of 6: rows 0:4, cols 4:8 of (6, 10)"
    before, after = runs[0][1], runs[1][1]
    shift = (after / before).log()  # [heads, 16, 16] over the (4, 4) window
    keep = torch.arange(16) != 2  # the planted token's own query row changes everywhere
    dev = (shift[:, keep] - shift[:, keep].median(-1, keepdim=True).values).abs().amax((0, 1))
    assert int(dev.argmax()) == 0 * 4 + 2 and float(dev[keep].max()) < 1e-6 < float(dev[2])
