"""Wan 2.1 / 2.2 (T2V, I2V, TI2V) and SkyReels-V2, which shares Wan's attention.

    attn1:  video -> video
    attn2:  video -> text; I2V first video -> image_ctx (CLIP image tokens). diffusers splits the
            context as "everything but the last 512 tokens is image context", so a text that is
            not 512 tokens long reaches the text call as image_ctx+text (the first call gets no keys).
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-3:], model.config.patch_size)
    return {"video": (math.prod(grid), grid), "text": (length(arg(args, kwargs, 2, "encoder_hidden_states")), None),
            "image_ctx": (length(arg(args, kwargs, 3, "encoder_hidden_states_image")), None)}


WAN = Family(
    name="wan",
    denoisers=("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"),
    observe=_observe,
    attention=(("*attn1", ("video",)),
               ("*attn2", ("video -> image_ctx", ("video -> text", "video -> image_ctx+text")))),
    default_relations=("video->text",),
    # Wan 2.2 TI2V passes per-token timesteps [B, N], 0 on the conditioning frame's tokens.
    timestep=Timestep(1, "timestep", reduce="max"),
    separate_cfg_calls=True,
)
