"""CogVideoX adapter: joint attention over [text, video] (CogVideoXAttnProcessor2_0 puts the text first).

Tiny random transformers of CogVideoX 1.0 (per-frame 2D patches) and 1.5 (patch_size_t = 2), and
the CogVideoXPipeline, which batches [uncond, cond] in one call and has no
do_classifier_free_guidance property (its guidance_scale > 1 says so).
"""
from __future__ import annotations

import math

import pytest
import torch

import attncap
from family_harness import check_family, default_relations

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = 8   # CogVideoX's joint positional embedding is sized for max_text_seq_length text tokens


def tiny_cogvideox(patch_size_t=None):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8,
                                       sample_height=8, sample_frames=8, patch_size=2, patch_size_t=patch_size_t,
                                       temporal_compression_ratio=4, max_text_seq_length=TEXT,
                                       # 1.5 uses rotary positions (its sinusoidal table ignores patch_size_t)
                                       use_rotary_positional_embeddings=patch_size_t is not None).eval()


def cog_call(model, frames: int):
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, frames, 4, 6, 10, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 8, generator=g), timestep=torch.tensor([700]))
    return lambda: model(**inputs)


@pytest.mark.parametrize("patch_size_t,frames,grid", [(None, 2, (2, 3, 5)), (2, 4, (2, 3, 5))], ids=["1.0", "1.5"])
def test_cogvideox_maps_equal_softmax(patch_size_t, frames, grid):
    model = tiny_cogvideox(patch_size_t)
    nv = math.prod(grid)
    segs = {"text": (0, TEXT, None), "video": (TEXT, TEXT + nv, grid)}
    check_family(model, cog_call(model, frames), {"*": [(segs, segs)]}, pool=(2, 2, 3))
    assert default_relations(model, cog_call(model, frames)) == {("video->text", grid)}


def test_cogvideox_pipeline_batched_cfg():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_cogvideox(),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, TEXT, 8, generator=g), torch.randn(1, TEXT, 8, generator=g)
    kw = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=48, width=80, num_frames=5,
              num_inference_steps=2, guidance_scale=6.0, output_type="latent")
    with attncap.capture(pipe, layers="*blocks.1*") as store:
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    # 48x80, 5 frames -> latent 2x6x10 -> 2x3x5 tokens; one record per step and branch, each of batch 1
    assert sorted((r.step, r.branch) for r in store.records) == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert all(r.relation == "video->text" and r.query_grid == (2, 3, 5) and r.data.shape[0] == 1
               for r in store.records)
    timesteps = pipe.scheduler.timesteps
    assert all(abs(r.timestep - float(timesteps[r.step])) < 1e-3 for r in store.records)
    # the cond half is the prompt's: it equals a capture of a cond-only call (guidance_scale 1 batches one)
    with attncap.capture(pipe, layers="*blocks.1*", steps=[0]) as alone:
        pipe(**{**kw, "guidance_scale": 1.0}, generator=torch.Generator().manual_seed(0))
    (solo,) = alone.records
    (batched,) = store.get(step=0, branch="cond")
    assert solo.branch is None
    torch.testing.assert_close(solo.data, batched.data, atol=1e-5, rtol=1e-4)
