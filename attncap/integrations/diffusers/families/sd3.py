"""SD3 / SD3.5: joint attention over [image, text]; SD3.5's dual attention (attn2) over the image."""
from __future__ import annotations

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-2:], model.config.patch_size)
    return {"image": (grid[0] * grid[1], grid), "text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None)}


SD3 = Family(
    name="sd3",
    denoisers=("SD3Transformer2DModel",),
    observe=_observe,
    attention=(("*attn2", ("image",)), ("*", (("image+text", "image"),))),
    timestep=Timestep(3, "timestep"),
)
