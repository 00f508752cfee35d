"""HiDream-I1 and HunyuanDiT adapters: two text encoders each, on tiny random transformers.

Layouts from diffusers: HiDreamAttnProcessor concatenates [image, text] and the transformer builds the
text side of each block as [T5, Llama (last selected layer, carried), this block's Llama layer];
non-square latents are padded to max_resolution with zeroed keys. HunyuanDiT's cross-attention keys are
[BERT text, mT5 text] (torch.cat in HunyuanDiT2DModel.forward).
"""
from __future__ import annotations

import pytest
import torch

from family_harness import check_family, default_relations

pytestmark = pytest.mark.usefixtures("one_thread")

T5, LLAMA = 5, 4


def tiny_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                          num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 4],
                                          text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
                                          axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1),
                                          force_inference_output=True).eval()


def hidream_inputs(hw) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, *hw, generator=g), timesteps=torch.tensor([700]),
                encoder_hidden_states_t5=torch.randn(1, T5, 8, generator=g),
                encoder_hidden_states_llama3=torch.randn(2, 1, LLAMA, 4, generator=g),
                pooled_embeds=torch.randn(1, 8, generator=g))


@pytest.mark.parametrize("hw,grid,total", [((8, 8), (4, 4), 16), ((6, 10), (3, 5), 64)], ids=["square", "padded"])
def test_hidream_image_and_three_text_runs(hw, grid, total):
    """Non-square 6x10 latent: 15 image tokens padded to max_resolution's 64 (zeroed keys, attended)."""
    model = tiny_hidream()
    n = grid[0] * grid[1]
    segs = {"image": (0, n, grid), "text": (total, total + T5, None), "text_2": (total + T5, total + T5 + LLAMA, None),
            "text_2_layer": (total + T5 + LLAMA, total + T5 + 2 * LLAMA, None)}
    if total > n:
        segs["image_padding"] = (n, total, None)
    inputs = hidream_inputs(hw)
    check_family(model, lambda: model(**inputs), {"*": [(segs, segs)]}, pool=2)
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", grid), ("image->text_2", grid)}


# ------------------------------------------------------------------------------------ HunyuanDiT
CLIP = 4


def tiny_hunyuan_dit():
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    return HunyuanDiT2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                             num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8,
                             pooled_projection_dim=4, hidden_size=16, text_len=CLIP, text_len_t5=T5,
                             activation_fn="gelu-approximate").eval()


def hunyuan_dit_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 6, 10, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, CLIP, 8, generator=g), text_embedding_mask=torch.ones(1, CLIP),
                encoder_hidden_states_t5=torch.randn(1, T5, 8, generator=g), text_embedding_mask_t5=torch.ones(1, T5),
                image_meta_size=torch.tensor([[1024.0, 1024, 12, 20, 0, 0]]), style=torch.zeros(1, dtype=torch.long),
                image_rotary_emb=[torch.ones(1, 8), torch.zeros(1, 8)])


def test_hunyuan_dit_self_and_two_encoder_cross_attention():
    model = tiny_hunyuan_dit()
    image = {"image": (0, 15, (3, 5))}
    layout = {"*attn1": [(image, image)],
              "*attn2": [(image, {"text": (0, CLIP, None), "text_2": (CLIP, CLIP + T5, None)})]}
    inputs = hunyuan_dit_inputs()
    check_family(model, lambda: model(**inputs), layout, pool=2)
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", (3, 5)), ("image->text_2", (3, 5))}
