"""AuraFlow: joint and single blocks attend over [register tokens, text, image].

The transformer prepends its 8 learned register tokens to the projected prompt
(torch.cat([register_tokens, encoder_hidden_states])), and AuraFlowAttnProcessor2_0 puts the
context before the image in both block kinds. The pipeline batches [uncond, cond] and passes t / 1000.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-2:], model.config.patch_size)
    return {"register": (int(model.register_tokens.shape[1]), None),
            "text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None), "image": (math.prod(grid), grid)}


AURAFLOW = Family(
    name="auraflow",
    denoisers=("AuraFlowTransformer2DModel",),
    observe=_observe,
    attention=(("*", ("register+text+image",)),),
    timestep=Timestep(2, "timestep", scale=1000.0),   # called with t / 1000
)
