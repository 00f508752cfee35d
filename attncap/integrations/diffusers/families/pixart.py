"""PixArt-Alpha / PixArt-Sigma (and the other PixArtTransformer2DModel pipelines).

    attn1:  image -> image
    attn2:  image -> text      the prompt's padding is an additive -10000 bias

The latent is [B, C, H, W]; tokens are row-major over (H / p, W / p). The pipelines batch
[uncond, cond] in one call and pass t.
"""
from __future__ import annotations

from .base import Family, Timestep, image_and_text


PIXART = Family(
    name="pixart",
    denoisers=("PixArtTransformer2DModel",),
    observe=image_and_text(text_index=1),
    attention=(("*attn1", ("image",)), ("*attn2", ("image -> text",))),
    timestep=Timestep(2, "timestep"),
)
