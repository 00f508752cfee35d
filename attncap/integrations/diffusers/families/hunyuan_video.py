"""HunyuanVideo (T2V, I2V) and its FramePack variant: joint attention over [video, text].

    transformer_blocks / single_transformer_blocks:  video+text        (HunyuanVideoAttnProcessor2_0
                                                     concatenates the video stream first, then text)
    context_embedder.token_refiner.*.attn:           text -> text      (the text refiner's self-attention)
    FramePack:  history+video+image_ctx+text         the packed history latents (4x, 2x, clean, one run
                                                     of mixed scales, no grid) before the video tokens;
                                                     the SigLIP image tokens before the text

The text segment is the prompt's full padded length; its padded keys are masked (probability 0).
FramePack trims the context to its valid length when the batch holds one sample.
"""
from __future__ import annotations

import math

from .base import Family, Timestep, arg, length, patched_grid


def _video(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    c = model.config
    grid = patched_grid(latent.shape[-3:], (c.patch_size_t, c.patch_size, c.patch_size))
    return math.prod(grid), grid


def _observe(model, args, kwargs):
    return {"video": _video(model, args, kwargs), "text": (length(arg(args, kwargs, 2, "encoder_hidden_states")), None)}


def _observe_framepack(model, args, kwargs):
    text = arg(args, kwargs, 2, "encoder_hidden_states")
    mask = arg(args, kwargs, 3, "encoder_attention_mask")
    # one sample: the transformer keeps only the valid context tokens (and drops the mask)
    n_text = int(mask.sum()) if mask is not None and text.shape[0] == 1 else length(text)
    return {"video": _video(model, args, kwargs), "history": (None, None), "text": (n_text, None),
            "image_ctx": (length(arg(args, kwargs, 5, "image_embeds")), None), "refiner_text": length(text)}


def _refiner_sizes(layer: str, seen):
    """The text refiner runs on the prompt before FramePack trims it to its valid tokens."""
    return {**seen, "text": (seen["refiner_text"], None)} if "token_refiner" in layer and "refiner_text" in seen else seen


_REFINER = ("*token_refiner*", ("text",))

HUNYUAN_VIDEO = Family(
    name="hunyuan_video",
    denoisers=("HunyuanVideoTransformer3DModel",),
    observe=_observe,
    attention=(_REFINER, ("*", ("video+text",))),
    default_relations=("video->text",),
    timestep=Timestep(1, "timestep"),
    separate_cfg_calls=True,   # true CFG (true_cfg_scale > 1): a cond call, then an uncond call
)

HUNYUAN_VIDEO_FRAMEPACK = Family(
    name="hunyuan_video_framepack",
    denoisers=("HunyuanVideoFramepackTransformer3DModel",),
    observe=_observe_framepack,
    attention=(_REFINER, ("*", (("history+video+image_ctx+text", "video+image_ctx+text"),))),
    default_relations=("video->text",),
    timestep=Timestep(1, "timestep"),
    separate_cfg_calls=True,
    sizes=_refiner_sizes,
)
