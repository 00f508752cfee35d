"""CogVideoX 1.0 / 1.5 (T2V, I2V): joint attention over [text, video].

CogVideoXAttnProcessor2_0 concatenates [encoder_hidden_states, hidden_states]: the text first
(CogVideoXPatchEmbed concatenates in the same order). The video grid is (frames, h, w) after the
patch embedding: per-frame 2D patches (patch_size_t None, CogVideoX 1.0) or 3D patches (1.5).
The pipelines batch [uncond, cond] in one call.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")          # [B, F, C, H, W]
    c = model.config
    frames = latent.shape[1] if c.patch_size_t is None else latent.shape[1] // c.patch_size_t
    grid = (frames, *patched_grid(latent.shape[-2:], c.patch_size))
    return {"text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None), "video": (math.prod(grid), grid)}


COGVIDEOX = Family(
    name="cogvideox",
    denoisers=("CogVideoXTransformer3DModel",),
    observe=_observe,
    attention=(("*", ("text+video",)),),
    default_relations=("video->text",),
    timestep=Timestep(2, "timestep"),
)
