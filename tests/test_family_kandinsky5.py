"""Kandinsky 5 adapter on a tiny random transformer (CPU): text blocks' self-attention (text -> text),
visual blocks' self-attention (video -> video) and cross-attention (video -> text).

Kandinsky5AttnProcessor: self-attention over one stream, cross-attention with keys from the text
stream; the latent is channels-last [B, T, H, W, C], tokens row-major over (T, H, W) / patch.
"""
from __future__ import annotations

import pytest
import torch

from family_harness import check_family, default_relations

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, TEXT = (2, 3, 5), 7      # latent 2x6x10, patch (1, 2, 2)


def tiny_kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    return Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                        out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
                                        num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)).eval()


def k5_call(model):
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 2, 6, 10, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), timestep=torch.tensor([800.0]),
                  pooled_projections=torch.randn(1, 8, generator=g),
                  visual_rope_pos=[torch.arange(2), torch.arange(3), torch.arange(5)], text_rope_pos=torch.arange(TEXT))
    return lambda: model(**inputs)


def test_kandinsky5_maps_equal_softmax():
    model = tiny_kandinsky5()
    video, text = {"video": (0, 30, GRID)}, {"text": (0, TEXT, None)}
    store = check_family(model, k5_call(model), {"*text_transformer_blocks*": [(text, text)],
                                                 "*self_attention": [(video, video)],
                                                 "*cross_attention": [(video, text)]}, pool=(2, 2, 2))
    assert {r.layer for r in store.get(relation="text->text")} == {
        "transformer.text_transformer_blocks.0.self_attention"}
    assert default_relations(model, k5_call(model)) == {("video->text", GRID)}
