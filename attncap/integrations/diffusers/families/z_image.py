"""Z-Image (Turbo, base): refiners on each stream, then joint attention over [image, text].

ZImageTransformer2DModel takes per-sample lists: x[i] a [C, F, H, W] latent, cap_feats[i] the
prompt's valid [L_i, D] embeddings. Each stream is padded to a multiple of 32 tokens with a learned
pad token that the attention attends to like any other (it is not masked):

    noise_refiner.*:    image+image_padding -> image+image_padding
    context_refiner.*:  text -> text
    layers.*:           image+image_padding+text    (_build_unified_sequence: [x, cap] per sample)

"text" is the caption axis in caption-token order, the same indices in every sample: a sample's
valid tokens, then its pad tokens, then (when samples differ in length) batch padding, which the
boolean mask hides (probability 0). Omni mode (nested lists: several images and captions per
sample, [cap, x, siglip]) has no common layout here: its calls are filed as tokens -> tokens.

The pipelines pass (1000 - t) / 1000 and batch classifier-free guidance as [cond, uncond] in one call;
attncap's sessions split batches as [uncond, cond], so these records keep both samples (branch None,
sample 0 the prompt, sample 1 the negative prompt).
"""
from __future__ import annotations

import math

from .base import Family, arg
from .timesteps import FlippedTimestep

_MULTIPLE = 32   # SEQ_MULTI_OF in diffusers' transformer_z_image


def _padded(n: int) -> int:
    return -(-n // _MULTIPLE) * _MULTIPLE


def _observe(model, args, kwargs):
    x, caps = arg(args, kwargs, 0, "x"), arg(args, kwargs, 2, "cap_feats")
    p, fp = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
    tokens = {"image": (0, None), "image_padding": (0, None), "text": (0, None), "tokens": (None, None)}
    if isinstance(x[0], list) or len({tuple(xi.shape) for xi in x}) != 1:
        return tokens
    f, h, w = (int(s) // d for s, d in zip(x[0].shape[1:], (fp, p, p)))
    n_image = f * h * w
    return {"image": (n_image, (h, w) if f == 1 else (f, h, w)), "image_padding": (_padded(n_image) - n_image, None),
            "text": (max(_padded(len(c)) for c in caps), None), "tokens": (0, None)}


Z_IMAGE = Family(
    batched_cfg_order=("cond", "uncond"),   # the pipeline batches [cond, uncond]
    name="z_image",
    denoisers=("ZImageTransformer2DModel",),
    observe=_observe,
    attention=(("*noise_refiner*", (("image+image_padding", "image", "tokens"),)),
               ("*context_refiner*", (("text", "tokens"),)),
               ("*", (("image+image_padding+text", "image+text", "tokens"),))),
    timestep=FlippedTimestep(1, "t"),
)
