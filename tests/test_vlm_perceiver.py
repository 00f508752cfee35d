"""Idefics2's perceiver resampler: its calls named (queries "latents", keys the image patches on the
vision tower's grid, then the latents), maps equal to eager attention, a planted patch at its grid
cell, kept at the prefill under generate(); a grid attncap cannot know gives no grid and a warning.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import attncap  # noqa: E402
from test_capture_transformers import eager_call_weights  # noqa: E402
from test_capture_vlm_families import _local_tower  # noqa: E402
from tiny_vlms import IMAGE, PAD, idefics2, tiles_inputs  # noqa: E402

PERCEIVER = "model.connector.perceiver_resampler.layers.0.self_attn"


def inputs_of(model, seed: int = 0) -> dict:
    """Two real 32x32 images (patch 4: 8x8 patches) and a blank padding one, 8 latents each."""
    pixels = tiles_inputs(model, seed=seed)
    ids = torch.tensor([[5, 6] + [IMAGE] * 8 + [7] + [IMAGE] * 8 + [8, 9]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)


@pytest.fixture(scope="module")
def model():
    return idefics2()


@pytest.mark.filterwarnings("ignore:attncap. idefics2. its image tokens have no grid")  # the LM's latents
def test_perceiver_latents_over_image_patches_equal_eager(model):
    inputs = inputs_of(model)
    (want,) = eager_call_weights(model, inputs)[PERCEIVER]  # [2 images, heads, 8 latents, 64 patches + 8]
    with torch.no_grad():
        plain = model(**inputs).logits
        with attncap.capture(model, relations="all", heads="all", layers=[PERCEIVER]) as store:
            captured = model(**inputs).logits
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    recs = sorted(store.records, key=lambda r: r.meta["key_segment"][0])
    assert [(r.relation, r.query_grid, r.key_grid, r.meta["key_segment"]) for r in recs] == [
        ("latents->image", None, (8, 8), [0, 64]), ("latents->latents", None, None, [64, 72])]
    got = torch.cat([r.data.double() for r in recs], -1)
    # fp32 softmax of the same scores: a few ulp of probabilities <= 1
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    with torch.no_grad(), attncap.capture(model, layers=[PERCEIVER]) as store:  # auto: latents->image
        model(**inputs)
    assert [r.relation for r in store.records] == ["latents->image"]


@pytest.mark.filterwarnings("ignore:attncap. idefics2. its image tokens have no grid")
def test_planted_patch_moves_its_perceiver_cell():
    """With the tower's blocks zeroed a patch changes only its own context token, so only its key
    column of the latents' map moves (every other column of a row rescales by one factor)."""
    model = idefics2()
    _local_tower(model)
    inputs = inputs_of(model)
    planted = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    planted["pixel_values"][0, 1, :, 20:24, 8:12] += 30  # second image, patch (5, 2)
    rows = []
    for inp in (inputs, planted):
        with torch.no_grad(), attncap.capture(model, relations=("latents->image", "latents->latents"),
                                              heads="all", layers=[PERCEIVER]) as store:
            model(**inp)
        recs = sorted(store.records, key=lambda r: r.meta["key_segment"][0])
        rows.append(torch.cat([r.data[1].double() for r in recs], -1))  # second image: [heads, 8, 72]
    assert recs[0].key_grid == (8, 8)
    shift = (rows[1] / rows[0]).log()
    dev = (shift - shift.median(-1, keepdim=True).values).abs().amax((0, 1))
    assert int(dev.argmax()) == 5 * 8 + 2
    assert float(dev[torch.arange(72) != 5 * 8 + 2].max()) < 1e-5 < float(dev[5 * 8 + 2])


@pytest.mark.filterwarnings("ignore:attncap. idefics2. its image tokens have no grid")
def test_generate_files_perceiver_at_the_prefill(model):
    inputs = inputs_of(model)
    kw = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        with attncap.capture(model, layers=[PERCEIVER]) as store:
            captured = model.generate(**inputs, **kw)
    assert torch.equal(plain, captured)
    assert [(r.step, r.key_grid) for r in store.records] == [(0, (8, 8))]


@pytest.mark.filterwarnings("ignore:attncap. idefics2. its image tokens have no grid")
def test_unknown_patch_grid_warns_and_has_no_grid(model, monkeypatch):
    """A tower whose grid attncap cannot read: the perceiver's image keys keep their name, lose the grid."""
    from attncap.integrations.vlm_layouts import PatchTower

    real = PatchTower.begin

    def blind(self, owner, args, kwargs):
        real(self, owner, args, kwargs)
        self.grids = None

    monkeypatch.setattr(PatchTower, "begin", blind)
    with pytest.warns(UserWarning, match="the 64 image patches it resamples have no known grid"):
        with torch.no_grad(), attncap.capture(model, layers=[PERCEIVER]) as store:
            model(**inputs_of(model))
    assert [(r.relation, r.key_grid, r.data.shape[-1]) for r in store.records] == [("latents->image", None, 64)]


@pytest.mark.filterwarnings("ignore:attncap. idefics2. its image tokens have no grid")
def test_tokens_select_text_keys_not_latents(model):
    """tokens= indexes words: the latents are not words, so a text index past their count is no error
    there, and no latents->latents record holds token columns."""
    inputs = inputs_of(model)
    with torch.no_grad(), attncap.capture(model, relations="all", tokens=[9], layers=[PERCEIVER]) as store:
        model(**inputs)
    assert store.records and all("keys" not in r.meta for r in store.records)
