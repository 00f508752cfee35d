"""Z-Image and Lumina 2 adapters: per-stream refiners, then joint attention (tiny random transformers).

Layouts from diffusers: Z-Image pads each stream to a multiple of 32 with a learned, attended pad
token and joins [image, caption] per sample (_build_unified_sequence, basic mode), masking batch
padding; Lumina 2 joins [valid prompt tokens, image] per sample (Lumina2Transformer2DModel.forward).
Both pipelines pass a flipped time, (1000 - t) / 1000.
"""
from __future__ import annotations

import pytest
import torch

import attncap
from family_harness import check_family, default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (3, 5)                  # latent 6x10, patch 2
NI = GRID[0] * GRID[1]


def tiny_z_image():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
                                    axes_dims=[4, 2, 2], axes_lens=[256, 32, 32]).eval()


def z_inputs(text=(7,)) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(x=[torch.randn(4, 1, 6, 10, generator=g) for _ in text],
                cap_feats=[torch.randn(n, 16, generator=g) for n in text], t=torch.tensor([0.3] * len(text)))


def test_z_image_streams_padded_to_32_and_joined():
    model = tiny_z_image()
    image = {"image": (0, NI, GRID), "image_padding": (NI, 32, None)}
    text = {"text": (0, 32, None)}                 # 7 prompt tokens + 25 pad tokens
    joint = {**image, "text": (32, 64, None)}
    inputs = z_inputs()
    layout = {"*noise_refiner*": [(image, image)], "*context_refiner*": [(text, text)], "*layers*": [(joint, joint)]}
    check_family(model, lambda: model(**inputs), layout, pool=2)
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


def test_z_image_batch_of_two_caption_lengths_masks_batch_padding():
    """Captions of 7 and 40 tokens (padded 32 and 64): sample 0's last 32 caption slots are masked."""
    model = tiny_z_image()
    call = lambda: model(**z_inputs((7, 40)))                        # noqa: E731
    truth, _ = record_calls(model, "transformer", call)
    with attncap.capture(model, relations="all", layers=["*context_refiner*", "*layers*"]) as store, torch.no_grad():
        call()
    image = {"image": (0, NI, GRID), "image_padding": (NI, 32, None)}
    segs = {"transformer.context_refiner.0.attention": ({"text": (0, 64, None)},) * 2,
            "transformer.layers.0.attention": ({**image, "text": (32, 96, None)},) * 2}
    assert check_masked_maps(store, truth, lambda layer, i: segs[layer]) == 1 + 3 * 3
    (r,) = store.get(layer="*layers*", relation="image->text", kind="map")
    assert float(r.data[0, ..., 32:].abs().max()) == 0.0 and float(r.data[1, ..., 32:].sum()) > 0


def test_z_image_pipeline_cond_first_batch_and_flipped_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from tiny_transformers import tiny_vae_kl

    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_kl(4), text_encoder=None,
                          tokenizer=None, transformer=tiny_z_image())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(7, 16, generator=g), torch.randn(3, 16, generator=g)

    def run(guidance: float):
        with attncap.capture(pipe, layers="*layers*") as store:
            pipe(prompt_embeds=[cond], negative_prompt_embeds=[uncond], height=24, width=40, num_inference_steps=2,
                 guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(0))
        return store

    store = run(4.0)
    # 24x40 -> latent 12x20 -> 6x10 tokens; the pipeline batches [cond, uncond]: the first half is cond
    assert sorted((r.step, r.branch) for r in store.records) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.data.shape[0] == 1 and r.query_grid == (6, 10) for r in store.records)
    alone = run(1.0).get(step=0)[0]   # no guidance: the cond sample alone, from the same first latents
    torch.testing.assert_close(store.get(step=0, branch="cond")[0].data, alone.data)
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-2 for r in store.records)


# -------------------------------------------------------------------------------------- Lumina 2
TEXT = 6


def tiny_lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=1,
                                     num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2,
                                     ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
                                     axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32).eval()


def lumina_inputs(valid=(TEXT,)) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.stack([torch.arange(TEXT) < v for v in valid])
    return dict(hidden_states=torch.randn(len(valid), 4, 6, 10, generator=g), timestep=torch.tensor([0.4] * len(valid)),
                encoder_hidden_states=torch.randn(len(valid), TEXT, 32, generator=g), encoder_attention_mask=mask)


def test_lumina2_refiners_and_joint_text_image():
    model = tiny_lumina2()
    text, image = {"text": (0, TEXT, None)}, {"image": (0, NI, GRID)}
    joint = {"text": (0, TEXT, None), "image": (TEXT, TEXT + NI, GRID)}
    layout = {"*context_refiner*": [(text, text)], "*noise_refiner*": [(image, image)], "*layers*": [(joint, joint)]}
    inputs = lumina_inputs()
    check_family(model, lambda: model(**inputs), layout, pool=2)
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


def test_lumina2_padded_prompt_and_unequal_batch():
    """4 valid of 6: the refiner masks the 2 padded keys, the joint call holds only the 4. Two samples of 4
    and 6 valid tokens put the image at different offsets: the joint call is filed as joint -> joint."""
    model = tiny_lumina2()
    call = lambda: model(**lumina_inputs((4,)))                      # noqa: E731
    truth, _ = record_calls(model, "transformer", call)
    with attncap.capture(model, relations="all", layers=["*context_refiner*", "*layers*"]) as store, torch.no_grad():
        call()
    joint = {"text": (0, 4, None), "image": (4, 4 + NI, GRID)}
    segs = lambda layer, i: (({"text": (0, TEXT, None)},) * 2 if "refiner" in layer else (joint, joint))  # noqa: E731
    assert check_masked_maps(store, truth, segs) == 1 + 4
    with attncap.capture(model, relations="all", layers="*layers*") as store, torch.no_grad():
        model(**lumina_inputs((4, TEXT)))
    assert {(r.relation, r.data.shape[-1]) for r in store.get(kind="map")} == {("joint->joint", TEXT + NI)}


def test_lumina2_pipeline_true_cfg_and_flipped_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    from tiny_transformers import tiny_vae_kl

    pipe = Lumina2Pipeline(transformer=tiny_lumina2(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_kl(4),
                           text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, TEXT, dtype=torch.bool)
    with attncap.capture(pipe, layers="*layers*") as store:
        pipe(prompt_embeds=torch.randn(1, TEXT, 32, generator=g), prompt_attention_mask=mask,
             negative_prompt_embeds=torch.randn(1, TEXT, 32, generator=g), negative_prompt_attention_mask=mask,
             height=32, width=48, num_inference_steps=2, guidance_scale=4.0, cfg_trunc_ratio=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    # 32x48 -> latent 4x6 (Lumina2Pipeline fixes vae_scale_factor at 8) -> 2x3 tokens;
    # a prompt call, then a negative-prompt call per step
    assert sorted((r.step, r.branch) for r in store.records) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.relation == "image->text" and r.query_grid == (2, 3) for r in store.records)
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-2 for r in store.records)
