"""LTX-Video: video self-attention (attn1) and video -> text cross-attention (attn2).

The transformer takes packed tokens [B, N, C]; num_frames, height and width (forward keywords) are
the token grid its rotary embedding is built on. The image-to-video pipelines give per-token
timesteps, 0 on the conditioning frame's tokens. The pipelines batch [uncond, cond] in one call.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    dims = tuple(kwargs.get(k) for k in ("num_frames", "height", "width"))
    grid = tuple(int(d) for d in dims) if all(d is not None for d in dims) else None
    if grid is not None and math.prod(grid) != latent.shape[1]:
        grid = None
    return {"video": (latent.shape[1], grid), "text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None)}


LTX_VIDEO = Family(
    name="ltx_video",
    denoisers=("LTXVideoTransformer3DModel",),
    observe=_observe,
    attention=(("*attn1", ("video",)), ("*attn2", ("video -> text",))),
    default_relations=("video->text",),
    timestep=Timestep(2, "timestep", reduce="max"),
)
