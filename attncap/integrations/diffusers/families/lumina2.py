"""Lumina-Image 2.0: refiners on each stream, then joint attention over [text, image].

    context_refiner.*:  text -> text     over the padded prompt, padding masked
    noise_refiner.*:    image -> image
    layers.*:           text+image       per sample [valid prompt tokens, image tokens], batch padding
                                         masked (Lumina2Transformer2DModel.forward)

The image starts after each sample's own valid prompt tokens, so samples with different valid
lengths share no layout: their joint calls are filed as joint -> joint. The pipeline calls the
denoiser once with the prompt, then with the negative prompt, passing 1 - t / 1000.
"""
from __future__ import annotations

import math

from .base import Family, arg, length, patched_grid
from .timesteps import FlippedTimestep


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-2:], model.config.patch_size)
    text = arg(args, kwargs, 2, "encoder_hidden_states")
    mask = arg(args, kwargs, 3, "encoder_attention_mask")
    valid = {int(v) for v in mask.bool().sum(1)} if mask is not None else {length(text)}
    common = len(valid) == 1
    return {"image": (math.prod(grid), grid), "text": (valid.pop() if common else 0, None),
            "joint": (0 if common else None, None), "refiner_text": length(text)}


def _sizes(layer: str, seen):
    """The context refiner attends over the prompt's padded length (its padding masked)."""
    return {**seen, "text": (seen["refiner_text"], None)} if "context_refiner" in layer else seen


LUMINA2 = Family(
    name="lumina2",
    denoisers=("Lumina2Transformer2DModel",),
    observe=_observe,
    attention=(("*context_refiner*", ("text",)), ("*noise_refiner*", ("image",)),
               ("*", (("text+image", "joint"),))),
    timestep=FlippedTimestep(1, "timestep"),
    separate_cfg_calls=True,
    sizes=_sizes,
)
