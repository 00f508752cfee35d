"""HunyuanVideo, FramePack and HunyuanVideo 1.5 adapters on tiny random transformers (CPU).

Layouts from the diffusers processors: HunyuanVideoAttnProcessor2_0 and HunyuanVideo15AttnProcessor2_0
concatenate [video, context]; the text refiner is self-attention over the prompt; FramePack packs
[history 4x, 2x, clean, video] and puts its image tokens before the text; HunyuanVideo 1.5 reorders
each sample's context as [valid image, valid ByT5, valid MLLM, invalid ...].
"""
from __future__ import annotations

import math

import pytest
import torch

import attncap
from family_harness import check_family, default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, TEXT = (2, 3, 5), 7          # latent 2x3x5, patch 1: 30 video tokens
NV = math.prod(GRID)


def _gen():
    return torch.Generator().manual_seed(1)


def tiny_hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 4, 4)).eval()


def hv_call(model, valid: int = TEXT):
    g = _gen()
    inputs = dict(hidden_states=torch.randn(1, 4, *GRID, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g),
                  encoder_attention_mask=(torch.arange(TEXT) < valid).long()[None],
                  pooled_projections=torch.randn(1, 8, generator=g), guidance=torch.tensor([3000.0]))
    return lambda: model(**inputs)


def test_hunyuan_video_maps_equal_softmax():
    model = tiny_hunyuan_video()
    text = {"text": (0, TEXT, None)}
    joint = {"video": (0, NV, GRID), "text": (NV, NV + TEXT, None)}
    store = check_family(model, hv_call(model), {"*token_refiner*": [(text, text)], "*": [(joint, joint)]},
                         pool=(2, 2, 3))
    assert {r.layer for r in store.records} == {"transformer.context_embedder.token_refiner.refiner_blocks.0.attn",
                                                "transformer.transformer_blocks.0.attn",
                                                "transformer.single_transformer_blocks.0.attn"}
    assert default_relations(model, hv_call(model)) == {("video->text", GRID)}


def test_hunyuan_video_padded_prompt_is_masked():
    """A prompt of 4 valid tokens of 7: the padded keys are masked in every call (probability 0)."""
    model = tiny_hunyuan_video()
    call = hv_call(model, valid=4)
    truth, _ = record_calls(model, "transformer", call)
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        call()
    joint = {"video": (0, NV, GRID), "text": (NV, NV + TEXT, None)}
    text = {"text": (0, TEXT, None)}
    segs = lambda layer, i: (text, text) if "refiner" in layer else (joint, joint)  # noqa: E731
    assert check_masked_maps(store, truth, segs) == 2 * 4 + 1   # two joint layers x 4 relations, the refiner
    (r,) = store.get(layer="*single*", relation="video->text", kind="map")
    assert float(r.data[..., 4:].abs().max()) == 0.0


# ------------------------------------------------------------------------------ FramePack
def tiny_framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=16,
        has_clean_x_embedder=True).eval()


def framepack_call(model, frames: int = 2, hw: tuple = (8, 12)):
    g = _gen()
    inputs = dict(hidden_states=torch.randn(1, 4, frames, *hw, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g),
                  encoder_attention_mask=(torch.arange(TEXT) < 5).long()[None],
                  pooled_projections=torch.randn(1, 8, generator=g), guidance=torch.tensor([3000.0]),
                  image_embeds=torch.randn(1, 3, 16, generator=g), indices_latents=torch.arange(frames),
                  latents_clean=torch.randn(1, 4, 1, *hw, generator=g), indices_latents_clean=torch.tensor([0]),
                  latents_history_2x=torch.randn(1, 4, 2, *hw, generator=g),
                  indices_latents_history_2x=torch.tensor([0, 1]),
                  latents_history_4x=torch.randn(1, 4, 4, *hw, generator=g),
                  indices_latents_history_4x=torch.arange(4))
    return lambda: model(**inputs)


def test_framepack_history_video_image_ctx_text():
    model = tiny_framepack()
    grid = (2, 4, 6)                                   # 2 frames 8x12, patch (1, 2, 2)
    nv = math.prod(grid)
    # history: clean 1x4x6 (24), 2x: 2 frames / (2, 4, 4) -> 1x2x3 (6), 4x: 4 frames / (4, 8, 8) -> 1x1x2 (2)
    nh = 24 + 6 + 2
    # one sample: the context is trimmed to its 3 image + 5 valid text tokens and the mask dropped
    joint = {"history": (0, nh, None), "video": (nh, nh + nv, grid), "image_ctx": (nh + nv, nh + nv + 3, None),
             "text": (nh + nv + 3, nh + nv + 8, None)}
    text = {"text": (0, TEXT, None)}
    call = framepack_call(model)
    truth, _ = record_calls(model, "transformer", call)
    assert truth[("transformer.transformer_blocks.0.attn", 0)][1].shape[-2] == nh + nv + 8
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        call()
    segs = lambda layer, i: (text, text) if "refiner" in layer else (joint, joint)  # noqa: E731
    assert check_masked_maps(store, truth, segs) == 2 * 16 + 1
    assert default_relations(model, call) == {("video->text", grid)}


# ------------------------------------------------------------------------------ HunyuanVideo 1.5
def tiny_hunyuan_video15():
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                            num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                            patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
                                            image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16,
                                            task_type="t2v").eval()


def hv15_call(model, valid=(TEXT, 4), image: bool = True, batch: int = 1):
    g = _gen()
    mask = torch.stack([(torch.arange(TEXT) < valid[0]), (torch.arange(TEXT) < valid[-1])])[:batch].long()
    inputs = dict(hidden_states=torch.randn(batch, 4, *GRID, generator=g), timestep=torch.tensor([500.0] * batch),
                  encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g), encoder_attention_mask=mask,
                  encoder_hidden_states_2=torch.randn(batch, 4, 8, generator=g),
                  encoder_attention_mask_2=torch.tensor([[1, 1, 0, 0]] * batch),
                  image_embeds=torch.randn(batch, 3, 12, generator=g) if image else torch.zeros(batch, 3, 12))
    return lambda: model(**inputs)


def test_hunyuan_video15_two_text_encoders_and_image_ctx():
    """I2V, every token valid but two ByT5 ones: [video, image_ctx 3, text_2 2, text 7, padding 2]."""
    model = tiny_hunyuan_video15()
    call = hv15_call(model)
    o = NV
    joint = {"video": (0, o, GRID), "image_ctx": (o, o + 3, None), "text_2": (o + 3, o + 5, None),
             "text": (o + 5, o + 12, None), "padding": (o + 12, o + 14, None)}
    text = {"text": (0, TEXT, None)}
    truth, _ = record_calls(model, "transformer", call)
    with attncap.capture(model, relations="all", pool=(1, 2, 2)) as store, torch.no_grad():
        call()
    segs = lambda layer, i: (text, text) if "refiner" in layer else (joint, joint)  # noqa: E731
    assert check_masked_maps(store, truth, segs, pool=(1, 2, 2)) == 2 * 25 + 1
    (r,) = store.get(layer="transformer.transformer_blocks.1.attn", relation="video->padding")
    assert float(r.data.abs().max()) == 0.0             # padded keys: probability 0
    assert default_relations(model, call) == {("video->text", GRID)}


def test_hunyuan_video15_t2v_and_uneven_batch():
    """T2V (zero image embeds: the image tokens are invalid, i.e. padding); a batch whose prompts have
    different valid lengths has no common layout: its context is one segment."""
    model = tiny_hunyuan_video15()
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        hv15_call(model, valid=(5,), image=False)()
    joint_rel = {r.relation for r in store.records if "refiner" not in r.layer}
    assert joint_rel == {f"{a}->{b}" for a in ("video", "text_2", "text", "padding")
                         for b in ("video", "text_2", "text", "padding")}
    (r,) = store.get(layer="transformer.transformer_blocks.0.attn", relation="video->text", kind="map")
    assert r.meta["key_segment"] == [NV + 2, NV + 7]
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        hv15_call(model, valid=(TEXT, 3), batch=2)()
    assert {r.relation for r in store.records if "refiner" not in r.layer} == {
        "video->video", "video->context", "context->video", "context->context"}


def test_hunyuan_video_pipeline_true_cfg_branches_and_timesteps():
    """HunyuanVideoPipeline with true_cfg_scale > 1: a cond call, then an uncond call, per step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tiny_hunyuan_video(), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    embeds = lambda n: dict(embeds=torch.randn(1, TEXT, 16, generator=g), pooled=torch.randn(1, 8, generator=g),  # noqa: E731
                            mask=(torch.arange(TEXT) < n).long()[None])
    cond, uncond = embeds(TEXT), embeds(3)
    with attncap.capture(pipe) as store:
        pipe(prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"], prompt_attention_mask=cond["mask"],
             negative_prompt_embeds=uncond["embeds"], negative_pooled_prompt_embeds=uncond["pooled"],
             negative_prompt_attention_mask=uncond["mask"], true_cfg_scale=4.0, height=32, width=48, num_frames=5,
             num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    # 32x48, 5 frames -> latent 2x4x6 (VAE 8x spatial, 4x temporal), patch 1
    assert sorted((r.layer, r.step, r.branch) for r in store.records) == sorted(
        (layer, s, b) for layer in ("transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0.attn")
        for s in (0, 1) for b in ("cond", "uncond"))
    assert all(r.relation == "video->text" and r.query_grid == (2, 4, 6) for r in store.records)
    assert all(float(r.data[..., 3:].abs().max()) == 0.0 for r in store.get(branch="uncond"))
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-3 for r in store.records)
