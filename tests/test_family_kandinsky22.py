"""Kandinsky 2.2's decoder UNet: added-KV attention of the image over [image embedding tokens, image].

UNet2DConditionModel with encoder_hid_dim_type="image_proj" projects the CLIP image embedding into 32
context tokens (filed as image_ctx); AttnAddedKVProcessor2_0 (SDPA) and the classic AttnAddedKVProcessor
(get_attention_scores) both concatenate [context keys, image keys] (torch.cat(..., dim=2)) with the image's
queries. Every attention of this tiny UNet sits at the 3x5 level of a 6x10 latent.
"""
from __future__ import annotations

import pytest
import torch

import attncap
from family_harness import check_records, default_relations, first_tensor, record_calls

pytestmark = pytest.mark.usefixtures("one_thread")

CTX, GRID = 32, (3, 5)
NI = GRID[0] * GRID[1]
LAYOUT = {"*": [({"image": (0, NI, GRID)}, {"image_ctx": (0, CTX, None), "image": (CTX, CTX + NI, GRID)})]}


def tiny_kandinsky_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=4, out_channels=8, addition_embed_type="image",
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16),
                                layers_per_block=1, encoder_hid_dim=16, encoder_hid_dim_type="image_proj",
                                cross_attention_dim=16, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                                class_embed_type=None, norm_num_groups=4).eval()


def unet_call(model):
    g = torch.Generator().manual_seed(1)
    sample, embeds = torch.randn(1, 4, 6, 10, generator=g), torch.randn(1, 16, generator=g)
    return lambda: model(sample, torch.tensor([500]), encoder_hidden_states=None,
                         added_cond_kwargs={"image_embeds": embeds})


@pytest.mark.parametrize("classic", [False, True], ids=["AttnAddedKVProcessor2_0", "AttnAddedKVProcessor"])
def test_kandinsky22_added_kv_attention(classic):
    """The SDPA processor's q, k are the truth for both: the classic one computes the same from the same weights."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    model = tiny_kandinsky_unet()
    call = unet_call(model)
    truth, plain = record_calls(model, "unet", call)
    assert len(truth) == 4          # down_blocks.1, mid_block, up_blocks.0 (two)
    if classic:
        model.set_attn_processor(AttnAddedKVProcessor())
    with attncap.capture(model, relations="all", pool=2, stats=("entropy", "colsum")) as store, torch.no_grad():
        out = call()
    torch.testing.assert_close(first_tensor(out), first_tensor(plain), atol=1e-5, rtol=1e-5)
    check_records(store, truth, LAYOUT, pool=2)
    assert default_relations(model, call) == {("image->image_ctx", GRID)}


def test_kandinsky22_pipeline_batched_cfg_and_timesteps():
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, VQModel

    torch.manual_seed(0)
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4)
    pipe = KandinskyV22Pipeline(unet=tiny_kandinsky_unet(), scheduler=DDIMScheduler(), movq=movq)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    with attncap.capture(pipe, layers="*mid_block*") as store:
        pipe(image_embeds=torch.randn(1, 16, generator=g), negative_image_embeds=torch.randn(1, 16, generator=g),
             height=12, width=20, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    # 12x20 image -> movq factor 2 -> 6x10 latent -> 3x5 at the mid block; [uncond, cond] split
    assert sorted((r.step, r.branch) for r in store.records) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.relation == "image->image_ctx" and r.query_grid == GRID for r in store.records)
    timesteps = pipe.scheduler.timesteps
    assert all(r.timestep == float(timesteps[r.step]) for r in store.records)
