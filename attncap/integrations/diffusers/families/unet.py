"""UNets: SD 1.5 / 2.x, SDXL, and Kandinsky 2.2's decoder (added-KV attention on image embeddings).

    attn1 (self):         image -> image          one grid per resolution of the UNet
    attn2 (cross):        image -> text
    added-KV attention:   image -> text+image     Kandinsky 2.2: its "text" is the projected CLIP
                                                  image embedding, filed as image_ctx
"""
from __future__ import annotations

import math
import re

from .base import Family, Timestep, arg


def _grid_for(n: int, height: int, width: int) -> tuple[int, int] | None:
    """The (h, w) grid of n tokens of a latent downsampled by a power of two (ceil for odd sizes)."""
    for level in range(8):
        h, w = math.ceil(height / 2**level), math.ceil(width / 2**level)
        if h * w == n:
            return h, w
    return None


def _observe(model, args, kwargs):
    sample = arg(args, kwargs, 0, "sample")
    height, width = sample.shape[-2:]
    context = "image_ctx" if model.config.encoder_hid_dim_type == "image_proj" else "text"
    text = arg(args, kwargs, 2, "encoder_hidden_states")
    if context == "image_ctx":
        n_context = model.encoder_hid_proj.num_image_text_embeds
    else:
        n_context = text.shape[1] if text is not None else 0
    return {"image": (None, lambda n: _grid_for(n, height, width)), context: (n_context, None),
            "hw": (height, width), "levels": len(model.config.block_out_channels)}


def _level_sizes(layer: str, seen):
    """The image segment's length at this layer's resolution (for the estimate before the run)."""
    match = re.search(r"(down_blocks|up_blocks)\.(\d+)|mid_block", layer)
    levels = seen["levels"]
    level = 0 if match is None else (levels - 1 if match.group(0) == "mid_block" else
                                      int(match.group(2)) if match.group(1) == "down_blocks"
                                      else levels - 1 - int(match.group(2)))
    h, w = (math.ceil(s / 2**level) for s in seen["hw"])
    grid = (h, w)
    return {**seen, "image": (h * w, grid)}


UNET = Family(
    name="unet",
    denoisers=("UNet2DConditionModel",),
    observe=_observe,
    attention=(
        ("*attn1", ("image",)),
        ("*attn2", (("image -> text", "image -> image_ctx"),)),
        ("*", (("image -> text+image", "image -> image_ctx+image", "image -> text", "image -> image_ctx",
                "image"),)),
    ),
    default_relations=("image->text", "image->image_ctx"),
    timestep=Timestep(1, "timestep"),
    sizes=_level_sizes,
)
