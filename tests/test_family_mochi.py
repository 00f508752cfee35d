"""Mochi adapter: one attention call per batch sample, [video, that sample's valid text] (CPU, tiny).

MochiAttnProcessor2_0 loops over the batch and drops each sample's masked prompt tokens before its
SDPA call: with a batch of two, a layer makes two calls of different key counts. Each must be its
own record (meta["sample"]; under the pipeline's batched CFG, its branch), equal to the float64
softmax of that call's q and k.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncap
from family_harness import default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (2, 3, 4)             # latent 2 frames 6x8, patch 2 per frame
NV, TEXT = math.prod(GRID), 8


def tiny_mochi(in_channels: int = 4):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                   pooled_projection_dim=16, in_channels=in_channels, out_channels=None,
                                   qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
                                   max_sequence_length=TEXT).eval()


def mochi_call(model, valid=(5, 8)):
    g = torch.Generator().manual_seed(1)
    b = len(valid)
    inputs = dict(hidden_states=torch.randn(b, 4, 2, 6, 8, generator=g),
                  encoder_hidden_states=torch.randn(b, TEXT, 16, generator=g), timestep=torch.tensor([300.0] * b),
                  encoder_attention_mask=torch.stack([torch.arange(TEXT) < n for n in valid]).long())
    return lambda: model(**inputs)


def test_mochi_one_record_per_sample():
    model = tiny_mochi()
    call = mochi_call(model)
    truth, _ = record_calls(model, "transformer", call)
    assert {k.shape[-2] for (_, i), (_, k, _, _) in truth.items()} == {NV + 5, NV + 8}
    with attncap.capture(model, relations="all", pool=(1, 2, 3)) as store, torch.no_grad():
        call()

    def segs(layer, sample):
        n = (5, 8)[sample]
        s = {"video": (0, NV, GRID), "text": (NV, NV + n, None)}
        return s, s

    assert check_masked_maps(store, truth, segs, pool=(1, 2, 3)) == 2 * 2 * 4    # layers x samples x relations
    keys = [(r.layer, r.relation, r.kind, r.branch, r.meta["sample"]) for r in store.records]
    assert len(keys) == len(set(keys))
    (r,) = [x for x in store.get(layer="transformer.transformer_blocks.1.attn1", relation="video->text")
            if x.meta["sample"] == 1]
    assert r.data.shape == (1, 1, math.prod((2, 2, 2)), 8)
    assert default_relations(model, mochi_call(model, valid=(6,))) == {("video->text", GRID)}


def test_mochi_pipeline_batched_cfg_branches_and_timesteps():
    """MochiPipeline batches [uncond, cond]: the negative prompt has 3 valid tokens, the prompt 6."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=tiny_mochi(in_channels=12))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    mask = lambda n: (torch.arange(TEXT) < n).long()[None]  # noqa: E731
    with attncap.capture(pipe, stats=("entropy",)) as store:
        pipe(prompt_embeds=torch.randn(1, TEXT, 16, generator=g), prompt_attention_mask=mask(6),
             negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g), negative_prompt_attention_mask=mask(3),
             height=48, width=64, num_frames=7, num_inference_steps=2, guidance_scale=4.5, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    # 48x64, 7 frames -> latent 2x6x8 -> 2x3x4 tokens
    maps = store.get(kind="map")
    assert sorted((r.step, r.branch) for r in maps if r.layer.endswith("0.attn1")) == [
        (0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.meta["sample"] == 0 and r.relation == "video->text" and r.query_grid == GRID for r in maps)
    assert {(r.branch, r.data.shape[-1]) for r in maps} == {("cond", 6), ("uncond", 3)}
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-3 for r in store.records)
