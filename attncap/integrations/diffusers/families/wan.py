"""Wan 2.1 / 2.2 (T2V, I2V, TI2V) and SkyReels-V2, which shares Wan's attention.

    attn1:  video -> video
    attn2:  video -> text; I2V first video -> image_ctx (CLIP image tokens). diffusers splits the
            [image_ctx, text] context as "all but the last 512 tokens are image context" (slicing
            with total - 512). With a text that is not 512 tokens long the two calls then hold other
            pieces of both: each call's keys are filed as the pieces they are (tag "tokens a:b of text").
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


TEXT_CALL = 512  # diffusers' WanAttnProcessor: the last 512 context tokens are the text


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-3:], model.config.patch_size)
    text = length(arg(args, kwargs, 2, "encoder_hidden_states"))
    image = length(arg(args, kwargs, 3, "encoder_hidden_states_image"))
    seen = {"video": (math.prod(grid), grid)}
    if not image or text == TEXT_CALL or model.config.added_kv_proj_dim is None:
        return {**seen, "text": (text, None), "image_ctx": (image, None)}
    return {**seen, **_split_pieces(image, text)}


def _split_pieces(image: int, text: int) -> dict:
    """The image_ctx and text pieces of the two attn2 calls, as diffusers' slicing makes them."""
    total = image + text
    pieces = {}
    for call, keys in enumerate((range(total)[:total - TEXT_CALL], range(total)[total - TEXT_CALL:])):
        a, b = (keys.start, keys.stop) if len(keys) else (0, 0)
        img = (max(a, 0), min(b, image))
        txt = (max(a, image) - image, min(b, total) - image)
        pieces[f"image_ctx#{call}"] = (max(0, img[1] - img[0]), None, img[0])
        pieces[f"text#{call}"] = (max(0, txt[1] - txt[0]), None, max(txt[0], 0))
    return pieces


WAN = Family(
    name="wan",
    denoisers=("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"),
    observe=_observe,
    attention=(("*attn1", ("video",)),
               ("*attn2", (("video -> image_ctx", "video -> image_ctx#0", "video -> image_ctx#0+text#0",
                            "video -> text#0"),
                           ("video -> text", "video -> text#1", "video -> image_ctx#1+text#1", "video -> image_ctx#1")))),
    default_relations=("video->text",),
    # Wan 2.2 TI2V passes per-token timesteps [B, N], 0 on the conditioning frame's tokens.
    timestep=Timestep(1, "timestep", reduce="max"),
    separate_cfg_calls=True,
)
