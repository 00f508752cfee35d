"""Allegro adapter: attn1 video -> video, attn2 video -> text (AllegroAttnProcessor2_0), tiny and random.

The patch embedding runs per frame: a [B, C, F, H, W] latent gives a (F, H / p, W / p) token grid.
"""
from __future__ import annotations

import pytest
import torch

from family_harness import check_family, default_relations

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, TEXT = (2, 3, 5), 7


def tiny_allegro():
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(0)
    return AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8,
                                     sample_frames=8, caption_channels=8).eval()


def allegro_call(model):
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 6, 10, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 8, generator=g), timestep=torch.tensor([400]))
    return lambda: model(**inputs)


def test_allegro_maps_equal_softmax():
    model = tiny_allegro()
    video, text = {"video": (0, 30, GRID)}, {"text": (0, TEXT, None)}
    check_family(model, allegro_call(model), {"*attn1": [(video, video)], "*attn2": [(video, text)]}, pool=(1, 2, 2))
    assert default_relations(model, allegro_call(model)) == {("video->text", GRID)}
