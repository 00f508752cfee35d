"""Kandinsky 5 (T2V, I2V, T2I, I2I): a text encoder stack, then visual blocks with cross-attention.

    text_transformer_blocks.*.self_attention:     text -> text
    visual_transformer_blocks.*.self_attention:   video -> video
    visual_transformer_blocks.*.cross_attention:  video -> text

The latent is channels-last [B, T, H, W, C]; tokens are row-major over (T, H, W) / patch_size.
With sparse attention (the pipeline's NABLA mode) the visual tokens are reordered into 8x8 blocks
and the self-attention mask is a flex BlockMask: those calls are left to the model (no grid order,
no tensor mask). The pipelines call the denoiser once with the prompt, then with the negative.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[1:4], tuple(model.config.patch_size))
    sparse = kwargs.get("sparse_params")
    fractal = bool(sparse and sparse.get("to_fractal"))
    return {"video": (math.prod(grid), None if fractal else grid),
            "text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None)}


KANDINSKY5 = Family(
    name="kandinsky5",
    denoisers=("Kandinsky5Transformer3DModel",),
    observe=_observe,
    attention=(("*text_transformer_blocks*", ("text",)), ("*self_attention", ("video",)),
               ("*cross_attention", ("video -> text",))),
    default_relations=("video->text",),
    timestep=Timestep(2, "timestep"),
    separate_cfg_calls=True,
)
