"""HunyuanVideo 1.5: joint attention over [video, context], its two text encoders as two segments.

The transformer reorders each sample's context as [valid image, valid ByT5, valid MLLM, invalid
image, invalid ByT5, invalid MLLM] (HunyuanVideo15Transformer3DModel.forward) and the processor
concatenates [video, context]; so a call's tokens are

    video | image_ctx | text_2 | text | padding

    image_ctx  SigLIP image tokens (I2V; T2V passes zeros, all invalid, so they are padding)
    text_2     the ByT5 glyph encoder's valid tokens (the quoted text of the prompt; often none)
    text       the MLLM (Qwen2.5-VL) prompt encoder's valid tokens
    padding    every invalid token, masked on both axes (its query rows are zeros)

    context_embedder.token_refiner.*.attn:  text -> text over the MLLM encoder's padded length

Samples of one batch with different valid counts have no common layout: their context is then one
segment, "context". The pipeline's guider calls the denoiser once per guidance branch.
"""
from __future__ import annotations

import itertools
import math

import torch

from .base import Family, Timestep, arg, length, patched_grid

_CONTEXT = ("image_ctx", "text_2", "text", "padding")


def _valid(mask, n: int, batch: int) -> list[int]:
    """Valid tokens per sample of a [B, n] mask (all n without one)."""
    if mask is None:
        return [n] * batch
    return [int(c) for c in mask.bool().sum(1)]


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    c = model.config
    grid = patched_grid(latent.shape[-3:], (c.patch_size_t, c.patch_size, c.patch_size))
    batch = latent.shape[0]
    text, text_2 = arg(args, kwargs, 2, "encoder_hidden_states"), kwargs.get("encoder_hidden_states_2")
    image = kwargs.get("image_embeds")
    n_text, n_text_2, n_image = length(text), length(text_2), length(image)
    valid_image = [0] * batch if image is None or bool(torch.all(image == 0)) else [n_image] * batch
    per_sample = list(zip(valid_image, _valid(kwargs.get("encoder_attention_mask_2"), n_text_2, batch),
                          _valid(arg(args, kwargs, 3, "encoder_attention_mask"), n_text, batch)))
    total = n_image + n_text_2 + n_text
    seen = {"video": (math.prod(grid), grid), "refiner_text": n_text}
    if len(set(per_sample)) == 1:
        lengths = per_sample[0]
        seen.update(zip(_CONTEXT, ((n, None) for n in (*lengths, total - sum(lengths)))))
        seen["context"] = (0, None)
    else:
        seen.update({name: (0, None) for name in _CONTEXT})
        seen["context"] = (total, None)
    return seen


def _refiner_sizes(layer: str, seen):
    """The MLLM text refiner attends over the encoder's full padded sequence."""
    return {**seen, "text": (seen["refiner_text"], None)} if "token_refiner" in layer else seen


# every subset of the context segments, in sequence order, longest first: the absent ones (length 0)
# are dropped by the family table
_JOINT = tuple("+".join(("video",) + kept) for r in range(len(_CONTEXT), -1, -1)
               for kept in itertools.combinations(_CONTEXT, r)) + ("video+context",)

HUNYUAN_VIDEO15 = Family(
    name="hunyuan_video15",
    denoisers=("HunyuanVideo15Transformer3DModel",),
    observe=_observe,
    attention=(("*token_refiner*", ("text",)), ("*", (_JOINT,))),
    default_relations=("video->text",),
    timestep=Timestep(1, "timestep"),
    separate_cfg_calls=True,
    sizes=_refiner_sizes,
)
