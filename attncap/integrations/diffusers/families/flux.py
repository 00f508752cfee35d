"""Flux.1 and Chroma: double- and single-stream blocks attend over [text, image] jointly.

Flux Kontext appends the conditioning image's tokens after the generated image's: they are
filed as cond_image (img_ids of the reference image carry a first index of 1).
"""
from __future__ import annotations

from .base import Family, Timestep, arg, length


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    ids = kwargs.get("img_ids")
    n_image, n_cond, grid = latent.shape[1], 0, None
    if ids is not None:
        ids = ids[0] if ids.dim() == 3 else ids
        generated = ids[:, 0] == 0
        n_cond = int((~generated).sum()) if bool((~generated).any()) else 0
        gen = ids[generated]
        h, w = int(gen[:, 1].max()) + 1, int(gen[:, 2].max()) + 1
        grid = (h, w) if h * w == n_image - n_cond else None
    return {"text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None),
            "image": (n_image - n_cond, grid), "cond_image": (n_cond, None)}


FLUX = Family(
    name="flux",
    denoisers=("FluxTransformer2DModel", "ChromaTransformer2DModel"),
    observe=_observe,
    attention=(("*", (("text+image+cond_image", "text+image"),)),),
    timestep=Timestep(3, "timestep", scale=1000.0),   # Flux is called with t / 1000
    separate_cfg_calls=True,
)
