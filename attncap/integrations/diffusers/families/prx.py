"""PRX (Photoroom): image queries over [text, image] keys in every block.

PRXAttnProcessor2_0 projects keys and values from the text and the image and concatenates them text
first (torch.cat((txt_k, img_k))); the queries are the image tokens only. The prompt's padding is a
boolean key mask. The pipelines batch [uncond, cond] and pass t / num_train_timesteps (1000).
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-2:], model.config.patch_size)
    return {"image": (math.prod(grid), grid), "text": (length(arg(args, kwargs, 2, "encoder_hidden_states")), None)}


PRX = Family(
    name="prx",
    denoisers=("PRXTransformer2DModel",),
    observe=_observe,
    attention=(("*", ("image -> text+image",)),),
    timestep=Timestep(1, "timestep", scale=1000.0),
)
