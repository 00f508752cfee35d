"""Allegro: video self-attention (attn1) and video -> text cross-attention (attn2).

The patch embedding runs per frame (2D patches), so the video grid is (frames, h / p, w / p).
The pipeline batches [uncond, cond] in one call.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")          # [B, C, F, H, W]
    grid = (latent.shape[2], *patched_grid(latent.shape[-2:], model.config.patch_size))
    return {"video": (math.prod(grid), grid), "text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None)}


ALLEGRO = Family(
    name="allegro",
    denoisers=("AllegroTransformer3DModel",),
    observe=_observe,
    attention=(("*attn1", ("video",)), ("*attn2", ("video -> text",))),
    default_relations=("video->text",),
    timestep=Timestep(2, "timestep"),
)
