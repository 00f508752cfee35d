"""PixArt and Sana adapters: image self-attention and image -> text cross-attention on tiny random DiTs.

PixArtTransformer2DModel's BasicTransformerBlock: attn1 over the image, attn2 from the image to the
prompt (padding as an additive -10000 bias). Sana: attn1 is SanaLinearAttnProcessor2_0 (no softmax:
refused with the reason), attn2 SanaAttnProcessor2_0 image -> text with the same bias.
"""
from __future__ import annotations

import pytest
import torch

import attncap
from family_harness import check_family, default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, HW = 5, (6, 10)          # latent 6x10, patch 2 -> 3x5 image tokens
GRID = (3, 5)
NI = GRID[0] * GRID[1]


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                    out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                    num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    norm_elementwise_affine=False, norm_eps=1e-6).eval()


def _mask(valid: int | None):
    """A prompt padding mask (None: no mask, which the unmasked harness needs)."""
    return None if valid is None else (torch.arange(TEXT) < valid).long()[None]


def pixart_inputs(valid: int | None = None) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, *HW, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g),
                encoder_attention_mask=_mask(valid), timestep=torch.tensor([600]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


SELF = {"image": (0, NI, GRID)}
CROSS = ({"image": (0, NI, GRID)}, {"text": (0, TEXT, None)})


def test_pixart_maps_equal_softmax():
    model = tiny_pixart()
    inputs = pixart_inputs()
    check_family(model, lambda: model(**inputs), {"*attn1": [(SELF, SELF)], "*attn2": [CROSS]}, pool=2)
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


def test_pixart_padded_prompt_is_masked():
    model = tiny_pixart()
    inputs = pixart_inputs(valid=3)
    truth, _ = record_calls(model, "transformer", lambda: model(**inputs))
    with attncap.capture(model, layers="*attn2") as store, torch.no_grad():
        model(**inputs)
    assert check_masked_maps(store, truth, lambda layer, i: CROSS) == 1
    (r,) = store.get(kind="map")
    assert float(r.data[..., 3:].abs().max()) < 1e-6      # exp(-10000): the bias diffusers adds


def test_pixart_sigma_pipeline_batched_cfg_and_timesteps():
    """PixArtSigmaPipeline has no guidance property: encode_prompt's do_classifier_free_guidance tells."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline
    from tiny_transformers import tiny_vae_kl

    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae_kl(4), transformer=tiny_pixart(),
                               scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, TEXT, dtype=torch.long)
    kw = dict(prompt_embeds=torch.randn(1, TEXT, 16, generator=g), prompt_attention_mask=mask,
              negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g), negative_prompt_attention_mask=mask,
              negative_prompt=None, height=24, width=40, num_inference_steps=2, use_resolution_binning=False,
              output_type="latent")
    with attncap.capture(pipe) as store:
        pipe(**kw, guidance_scale=4.5, generator=torch.Generator().manual_seed(0))
    # 24x40 image -> 12x20 latent -> 6x10 tokens; the [uncond, cond] batch split into its branches
    assert sorted((r.step, r.branch) for r in store.records) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.relation == "image->text" and r.query_grid == (6, 10) and r.data.shape[0] == 1 for r in store.records)
    timesteps = pipe.scheduler.timesteps
    assert all(r.timestep == float(timesteps[r.step]) for r in store.records)
    with attncap.capture(pipe) as alone:
        pipe(**kw, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert {r.branch for r in alone.records} == {None}


# ----------------------------------------------------------------------------------------- Sana
def tiny_sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return SanaTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4,
                                  num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                  cross_attention_dim=8, caption_channels=8, sample_size=32).eval()


def sana_inputs(valid: int | None = None) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, *HW, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT, 8, generator=g),
                encoder_attention_mask=_mask(valid), timestep=torch.tensor([400]))


def test_sana_cross_attention_and_linear_self_attention_refused():
    model = tiny_sana()
    inputs = sana_inputs()
    check_family(model, lambda: model(**inputs), {"*attn2": [CROSS]}, pool=2)   # attn1 made no SDPA call
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}
    with pytest.raises(ValueError, match="linear attention"):
        with attncap.capture(model, layers="*attn1"):
            pass
    masked = sana_inputs(valid=2)
    truth, _ = record_calls(model, "transformer", lambda: model(**masked))
    with attncap.capture(model) as store, torch.no_grad():
        model(**masked)
    assert check_masked_maps(store, truth, lambda layer, i: CROSS) == 1
