"""QwenImage and QwenImage-Edit: double-stream joint attention over [text, image, cond_image].

img_shapes lists, per sample, the (frames, h, w) token grid of each image in the sequence: the
generated image first, then (Edit, Edit-Plus) the conditioning images, filed as cond_image.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    shapes = kwargs.get("img_shapes")
    first = shapes[0] if shapes else None
    if first and isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        images = [tuple(int(x) for x in s) for s in first]   # [[(1, h, w), (1, h2, w2), ...], ...]
    elif first:
        images = [tuple(int(x) for x in first)]               # [(1, h, w), ...]
    else:
        images = []
    n = latent.shape[1]
    grids = [(h, w) if f == 1 else (f, h, w) for f, h, w in images]
    if not images or sum(math.prod(s) for s in images) != n:
        return {"text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None), "image": (n, None),
                "cond_image": (0, None)}
    generated = math.prod(images[0])
    # one conditioning image keeps its grid; several are one segment in sequence order, without one
    cond_grid = grids[1] if len(grids) == 2 else None
    return {"text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None),
            "image": (generated, grids[0]), "cond_image": (n - generated, cond_grid)}


QWENIMAGE = Family(
    name="qwenimage",
    denoisers=("QwenImageTransformer2DModel",),
    observe=_observe,
    attention=(("*", (("text+image+cond_image", "text+image"),)),),
    timestep=Timestep(3, "timestep", scale=1000.0),   # called with t / 1000
    separate_cfg_calls=True,                            # true CFG: a cond call, then an uncond call
)
