"""Flux.2 (dev, Klein, Klein KV): double- and single-stream blocks attend over [text, image] jointly.

Flux2AttnProcessor and Flux2ParallelSelfAttnProcessor put the text first (torch.cat([encoder, hidden])).
Edit pipelines append the reference images' tokens after the generated image's; img_ids carry a
first (T) index of 0 on generated tokens and 10, 20, ... on reference images: filed as cond_image.

Klein KV (kv_cache_mode) splits each layer's attention (_flux2_kv_causal_attention):

    "extract" (first step):  text+image -> text+cond_image+image, then cond_image -> cond_image
    "cached" (later steps):  text+image -> text+cond_image+image (the cached reference keys)

The pipelines call the transformer with t / 1000, once per guidance branch (Klein: prompt, then
negative prompt).
"""
from __future__ import annotations

import torch

from .base import Family, Timestep, arg, length


def _grid(ids: torch.Tensor) -> tuple[int, int] | None:
    """(h, w) of tokens whose (T, H, W, L) ids cover one full grid, else None."""
    if not ids.shape[0] or ids[:, 0].unique().numel() != 1:
        return None
    h, w = (int(ids[:, i].max() - ids[:, i].min()) + 1 for i in (1, 2))
    return (h, w) if h * w == ids.shape[0] else None


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    ids = arg(args, kwargs, 3, "img_ids")
    n = latent.shape[1]
    if ids is None:
        return {"text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None), "image": (n, None),
                "cond_image": (0, None)}
    ids = ids[0] if ids.dim() == 3 else ids
    generated = ids[:, 0] == 0
    n_image = int(generated.sum())
    n_cond, cond_grid = n - n_image, _grid(ids[~generated])
    cache = kwargs.get("kv_cache")
    if kwargs.get("kv_cache_mode") == "cached" and cache is not None:
        n_cond, cond_grid = int(cache.num_ref_tokens), None   # reference keys come from the cache only
    return {"text": (length(arg(args, kwargs, 1, "encoder_hidden_states")), None),
            "image": (n_image, _grid(ids[generated])), "cond_image": (n_cond, cond_grid)}


FLUX2 = Family(
    name="flux2",
    denoisers=("Flux2Transformer2DModel",),
    observe=_observe,
    attention=(("*", (("text+image+cond_image", "text+image", "text+image -> text+cond_image+image"),
                      ("cond_image",))),),
    timestep=Timestep(2, "timestep", scale=1000.0),   # called with t / 1000
    separate_cfg_calls=True,
)
