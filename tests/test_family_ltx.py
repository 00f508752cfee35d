"""LTX-Video adapter: attn1 video -> video, attn2 video -> text, on a tiny random transformer (CPU).

LTXVideoAttnProcessor: attn1 is self-attention over the packed video tokens (grid = the num_frames,
height, width the forward is given); attn2 takes keys from the caption projection, with the prompt
mask turned into an additive bias. The LTXPipeline batches [uncond, cond] in one call.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncap
from family_harness import check_family, default_relations, record_calls
from masked_truth import check_masked_maps

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, TEXT = (2, 3, 5), 7
NV = math.prod(GRID)


def tiny_ltx(in_channels: int = 4):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=in_channels, out_channels=in_channels, num_attention_heads=2,
                                      attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                                      caption_channels=16).eval()


def ltx_call(model, valid: int | None = None):
    g = torch.Generator().manual_seed(1)
    mask = None if valid is None else (torch.arange(TEXT) < valid).long()[None]
    inputs = dict(hidden_states=torch.randn(1, NV, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), timestep=torch.tensor([600]),
                  encoder_attention_mask=mask, num_frames=GRID[0], height=GRID[1], width=GRID[2])
    return lambda: model(**inputs)


def _layout():
    video, text = {"video": (0, NV, GRID)}, {"text": (0, TEXT, None)}
    return {"*attn1": [(video, video)], "*attn2": [(video, text)]}


def test_ltx_maps_equal_softmax():
    model = tiny_ltx()
    check_family(model, ltx_call(model), _layout(), pool=(2, 2, 2))
    assert default_relations(model, ltx_call(model)) == {("video->text", GRID)}


def test_ltx_padded_prompt_is_masked():
    model = tiny_ltx()
    call = ltx_call(model, valid=4)
    truth, _ = record_calls(model, "transformer", call)
    with attncap.capture(model, relations="all") as store, torch.no_grad():
        call()
    layout = _layout()
    segs = lambda layer, i: layout["*attn1" if layer.endswith("attn1") else "*attn2"][0]  # noqa: E731
    assert check_masked_maps(store, truth, segs) == 4
    assert all(float(r.data[..., 4:].max()) < 1e-6 for r in store.get(relation="video->text"))


def test_ltx_pipeline_batched_cfg_and_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=tiny_ltx())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, TEXT, dtype=torch.long)
    with attncap.capture(pipe) as store:
        pipe(prompt_embeds=torch.randn(1, TEXT, 16, generator=g), prompt_attention_mask=mask,
             negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g), negative_prompt_attention_mask=mask,
             height=96, width=160, num_frames=9, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    # 96x160, 9 frames -> latent 2x3x5 (VAE 32x spatial, 8x temporal), patch 1
    assert sorted((r.layer, r.step, r.branch) for r in store.records) == sorted(
        (f"transformer.transformer_blocks.{i}.attn2", s, b) for i in range(2) for s in (0, 1) for b in ("cond", "uncond"))
    assert all(r.relation == "video->text" and r.query_grid == GRID for r in store.records)
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-3 for r in store.records)
