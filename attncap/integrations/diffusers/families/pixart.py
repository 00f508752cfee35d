"""PixArt-Alpha / PixArt-Sigma (and the other PixArtTransformer2DModel pipelines).

    attn1:  image -> image
    attn2:  image -> text      the prompt's padding is an additive -10000 bias

The latent is [B, C, H, W]; tokens are row-major over (H / p, W / p). The pipelines batch
[uncond, cond] in one call and pass t.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-2:], model.config.patch_size)
    return {"image": (math.prod(grid), grid), "text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None)}


PIXART = Family(
    name="pixart",
    denoisers=("PixArtTransformer2DModel",),
    observe=_observe,
    attention=(("*attn1", ("image",)), ("*attn2", ("image -> text",))),
    timestep=Timestep(2, "timestep"),
)
