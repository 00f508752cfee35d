"""Wan-family checks beyond test_capture_families: SkyReels-V2 (Wan's attention under another class)
and Wan 2.1 I2V with a text context shorter than 512 tokens (CPU, tiny random transformers).

WanAttnProcessor splits an I2V context as "all but the last 512 tokens are image context". With
17 image tokens and 6 text tokens (23 <= 256) the image call gets no keys at all and the text call
gets every context token: [video] -> [image_ctx 17, text 6] through to_k, i.e. "video -> image_ctx+text".
"""
from __future__ import annotations

import pytest
import torch

from family_harness import check_family, default_relations, record_calls
from tiny_transformers import tiny_wan_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, NV = (2, 3, 5), 30      # latent 2x6x10, patch (1, 2, 2)


def _latent(g, channels):
    return torch.randn(1, channels, 2, 6, 10, generator=g)


def test_skyreels_v2_maps_equal_softmax():
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                         in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                                         num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                         rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=_latent(g, 4), timestep=torch.tensor([900]),
                  encoder_hidden_states=torch.randn(1, 9, 16, generator=g))
    call = lambda: model(**inputs)  # noqa: E731
    video, text = {"video": (0, NV, GRID)}, {"text": (0, 9, None)}
    check_family(model, call, {"*attn1": [(video, video)], "*attn2": [(video, text)]}, pool=(2, 2, 3))
    assert default_relations(model, call) == {("video->text", GRID)}


def test_wan_i2v_short_text_context():
    torch.manual_seed(0)
    model = tiny_wan_transformer(in_channels=36, image_dim=4).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=_latent(g, 36), timestep=torch.tensor([900]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 17, 4, generator=g))
    call = lambda: model(**inputs)  # noqa: E731
    truth, _ = record_calls(model, "transformer", call)
    # diffusers' own split: the image call has 0 keys, the text call all 23 context tokens
    assert truth[("transformer.blocks.0.attn2", 0)][1].shape[-2] == 0
    assert truth[("transformer.blocks.0.attn2", 1)][1].shape[-2] == 23
    video, ctx = {"video": (0, NV, GRID)}, {"image_ctx": (0, 17, None), "text": (17, 23, None)}
    # the empty image call is call 0 of each attn2: no records; the text call gives both relations
    store = check_family(model, call, {"*attn1": [(video, video)], "*attn2": [({}, {}), (video, ctx)]},
                         stats=("entropy",))
    assert {r.relation for r in store.get(layer="*attn2")} == {"video->image_ctx", "video->text"}
    assert default_relations(model, call) == {("video->text", GRID)}


@pytest.mark.parametrize("text,call0,call1", [
    # 257 CLIP tokens + 226 text tokens: diffusers slices at 483 - 512 = -29, so the "image" call gets the
    # image and text 0:197, the "text" call text 197:226
    (226, {"image_ctx": (0, 257, None), "text": (257, 454, None)}, {"text": (0, 29, None)}),
    # + 300 text tokens: the image call gets image 0:45, the text call image 45:257 and all the text
    (300, {"image_ctx": (0, 45, None)}, {"image_ctx": (0, 212, None), "text": (212, 512, None)}),
], ids=["text226", "text300"])
def test_wan_i2v_257_image_tokens_and_text_not_512(text, call0, call1):
    torch.manual_seed(0)
    model = tiny_wan_transformer(in_channels=36, image_dim=4).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=_latent(g, 36), timestep=torch.tensor([900]),
                  encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 257, 4, generator=g))
    call = lambda: model(**inputs)  # noqa: E731
    video = {"video": (0, NV, GRID)}
    store = check_family(model, call, {"*attn1": [(video, video)], "*attn2": [(video, call0), (video, call1)]},
                         stats=("entropy",))
    tags = {r.meta.get("key_tag") for r in store.get(layer="*attn2", relation="video->text")}
    assert all(t and t.startswith("tokens ") for t in tags)
