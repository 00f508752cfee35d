"""Flux.2 and Chroma adapters on tiny random transformers: joint [text, image] attention.

Layouts from the diffusers processors: Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor and Chroma's
FluxAttnProcessor concatenate [text, image]; Flux.2 edit appends the reference image's tokens (img_ids
T index 10) after the generated image's; Klein KV's _flux2_kv_causal_attention makes [text, image]
queries over [text, reference, image] keys, and reference -> reference self-attention.
"""
from __future__ import annotations

import pytest
import torch

import attncap
from family_harness import check_family, default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, GRID, REF_GRID = 6, (3, 5), (2, 3)
NI, NR = GRID[0] * GRID[1], REF_GRID[0] * REF_GRID[1]


def tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4)).eval()


def _ids(t: int, h: int, w: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def flux2_inputs(ref: bool = False, **extra) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = [_ids(0, *GRID)] + ([_ids(10, *REF_GRID)] if ref else [])
    if extra.get("kv_cache_mode") == "extract":
        ids = ids[::-1]                                   # Klein KV puts the reference tokens first
    img_ids = torch.cat(ids)[None]
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT))[None]
    return dict(hidden_states=torch.randn(1, img_ids.shape[1], 4, generator=g),
                encoder_hidden_states=torch.randn(1, TEXT, 32, generator=g), img_ids=img_ids, txt_ids=text_ids,
                timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]), **extra)


@pytest.mark.parametrize("ref", [False, True], ids=["t2i", "edit"])
def test_flux2_maps_equal_softmax(ref):
    model = tiny_flux2()
    segs = {"text": (0, TEXT, None), "image": (TEXT, TEXT + NI, GRID)}
    if ref:
        segs["cond_image"] = (TEXT + NI, TEXT + NI + NR, REF_GRID)
    inputs = flux2_inputs(ref)
    check_family(model, lambda: model(**inputs), {"*": [(segs, segs)]}, pool=(2, 2))
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


def test_flux2_klein_kv_extract_then_cached():
    """Extract: [text, image] queries over [text, ref, image] keys, then ref -> ref; cached: the first call only."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    model = tiny_flux2()
    for block in model.transformer_blocks:          # as Flux2KleinKVPipeline sets them
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    q = {"text": (0, TEXT, None), "image": (TEXT, TEXT + NI, GRID)}
    k = {"text": (0, TEXT, None), "cond_image": (TEXT, TEXT + NR, REF_GRID), "image": (TEXT + NR, TEXT + NR + NI, GRID)}
    ref = {"cond_image": (0, NR, REF_GRID)}
    extract = flux2_inputs(True, kv_cache_mode="extract", num_ref_tokens=NR)
    store = check_family(model, lambda: model(**extract, return_dict=False), {"*": [(q, k), (ref, ref)]})
    assert len(store.get(relation="cond_image->cond_image", kind="map")) == 2    # double + single block
    with torch.no_grad():
        _, cache = model(**extract, return_dict=False)
    cached = flux2_inputs(False, kv_cache_mode="cached", kv_cache=cache)
    k_cached = {**k, "cond_image": (TEXT, TEXT + NR, None)}                       # cached keys: no ids to read
    check_family(model, lambda: model(**cached), {"*": [(q, k_cached)]})


# ------------------------------------------------------------------------------------- Chroma
def tiny_chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                    approximator_hidden_dim=16, approximator_layers=1).eval()


def chroma_inputs(valid: int | None = None) -> dict:
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(NI, 3)
    img_ids[:, 1] = torch.arange(GRID[0]).repeat_interleave(GRID[1])
    img_ids[:, 2] = torch.arange(GRID[1]).repeat(GRID[0])
    out = dict(hidden_states=torch.randn(1, NI, 4, generator=g), img_ids=img_ids, txt_ids=torch.zeros(TEXT, 3),
               encoder_hidden_states=torch.randn(1, TEXT, 32, generator=g), timestep=torch.tensor([0.6]))
    if valid is not None:   # ChromaPipeline: prompt mask (float, one padding token kept) + ones for the image
        prompt = (torch.arange(TEXT) <= valid).float()[None]
        out["attention_mask"] = torch.cat([prompt, torch.ones(1, NI, dtype=torch.bool)], dim=1)
    return out


def test_chroma_uses_flux_processor_and_layout():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_chroma()
    assert {type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == {FluxAttnProcessor}
    segs = {"text": (0, TEXT, None), "image": (TEXT, TEXT + NI, GRID)}
    inputs = chroma_inputs()
    check_family(model, lambda: model(**inputs), {"*": [(segs, segs)]}, pool=(2, 2))
    assert default_relations(model, lambda: model(**inputs)) == {("image->text", GRID)}


def test_chroma_prompt_mask_as_the_model_applies_it():
    """Chroma's [B, 1, N, N] mask is the outer product of a float 0/1 mask, which SDPA adds: attncap adds it too."""
    model = tiny_chroma()
    inputs = chroma_inputs(valid=3)
    truth, _ = record_calls(model, "transformer", lambda: model(**inputs))
    assert all(m is not None and m.dtype != torch.bool for *_, m in truth.values())
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        model(**inputs)
    segs = {"text": (0, TEXT, None), "image": (TEXT, TEXT + NI, GRID)}
    assert check_masked_maps(store, truth, lambda layer, i: (segs, segs)) == 2 * 4


def test_chroma_pipeline_true_cfg_and_timesteps():
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from tiny_transformers import tiny_vae_kl

    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_kl(4), text_encoder=None,
                          tokenizer=None, transformer=tiny_chroma())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    mask = (torch.arange(TEXT) <= 3).float()[None]
    with attncap.capture(pipe, layers="*single*") as store:
        pipe(prompt_embeds=torch.randn(1, TEXT, 32, generator=g), prompt_attention_mask=mask,
             negative_prompt_embeds=torch.randn(1, TEXT, 32, generator=g), negative_prompt_attention_mask=mask,
             height=12, width=20, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    # 12x20 image -> 6x10 latent -> 3x5 packed tokens; a prompt call, then a negative-prompt call per step
    assert sorted((r.step, r.branch) for r in store.records) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.relation == "image->text" and r.query_grid == GRID for r in store.records)
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-2 for r in store.records)
