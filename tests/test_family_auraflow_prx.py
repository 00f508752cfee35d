"""AuraFlow and PRX adapters on tiny random transformers.

Layouts from diffusers: AuraFlow prepends 8 learned register tokens to the prompt and puts the context
before the image in its joint and single blocks; PRXAttnProcessor2_0 takes image queries over
[text, image] keys (torch.cat((txt_k, img_k))), the prompt padding as a boolean key mask.
"""
from __future__ import annotations

import pytest
import torch

import attncap
from family_harness import check_family, default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, GRID, REGISTER = 5, (3, 5), 8      # latent 6x10, patch 2
NI = GRID[0] * GRID[1]


def tiny_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    return AuraFlowTransformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                      num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                      caption_projection_dim=16, joint_attention_dim=16, out_channels=4,
                                      pos_embed_max_size=256).eval()


def test_auraflow_register_text_image():
    model = tiny_auraflow()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 6, 10, generator=g), timestep=torch.tensor([0.8]),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g))
    segs = {"register": (0, REGISTER, None), "text": (REGISTER, REGISTER + TEXT, None),
            "image": (REGISTER + TEXT, REGISTER + TEXT + NI, GRID)}
    store = check_family(model, lambda: model(**inputs), {"*": [(segs, segs)]}, pool=2)
    assert {r.layer for r in store.records} == {"transformer.joint_transformer_blocks.0.attn",
                                                "transformer.single_transformer_blocks.0.attn"}
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


# ------------------------------------------------------------------------------------------ PRX
def tiny_prx():
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(0)
    return PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=16, mlp_ratio=2.0,
                                 num_heads=2, depth=2, axes_dim=[4, 4], theta=10_000).eval()


def prx_inputs(valid: int | None = None) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = None if valid is None else (torch.arange(TEXT) < valid)[None]
    return dict(hidden_states=torch.randn(1, 4, 6, 10, generator=g), timestep=torch.tensor([0.6]),
                encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), attention_mask=mask)


KEYS = {"text": (0, TEXT, None), "image": (TEXT, TEXT + NI, GRID)}


def test_prx_image_queries_over_text_and_image():
    model = tiny_prx()
    inputs = prx_inputs()
    check_family(model, lambda: model(**inputs), {"*": [({"image": (0, NI, GRID)}, KEYS)]}, pool=2)
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


def test_prx_padded_prompt_is_masked():
    model = tiny_prx()
    inputs = prx_inputs(valid=3)
    truth, _ = record_calls(model, "transformer", lambda: model(**inputs))
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        model(**inputs)
    assert check_masked_maps(store, truth, lambda layer, i: ({"image": (0, NI, GRID)}, KEYS)) == 2 * 2
    for r in store.get(relation="image->text", kind="map"):
        assert float(r.data[..., 3:].abs().max()) == 0.0
