"""HunyuanDiT: image self-attention (attn1) and cross-attention to two text encoders (attn2).

HunyuanDiT2DModel.forward concatenates [CLIP-style BERT text (77), mT5 text (256)] as the context
(torch.cat([encoder_hidden_states, encoder_hidden_states_t5])) and replaces padded positions by a
learned padding embedding (they are attended to, not masked):

    attn1:  image -> image
    attn2:  image -> text+text_2       text the BERT encoder's tokens, text_2 the mT5 encoder's

The pipeline batches [uncond, cond] in one call and passes t.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    grid = patched_grid(latent.shape[-2:], model.config.patch_size)
    return {"image": (math.prod(grid), grid), "text": (length(arg(args, kwargs, 2, "encoder_hidden_states")), None),
            "text_2": (length(kwargs.get("encoder_hidden_states_t5")), None)}


HUNYUAN_DIT = Family(
    name="hunyuan_dit",
    denoisers=("HunyuanDiT2DModel",),
    observe=_observe,
    attention=(("*attn1", ("image",)), ("*attn2", ("image -> text+text_2",))),
    default_relations=("image->text", "image->text_2"),
    timestep=Timestep(1, "timestep"),
)
