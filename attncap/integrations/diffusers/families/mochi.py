"""Mochi 1: joint attention over [video, text], one attention call per sample of the batch.

MochiAttnProcessor2_0 loops over the batch: for sample i it keeps only the prompt tokens its
encoder_attention_mask marks valid and calls SDPA on [video, valid text of sample i] (batch 1).
So a layer makes B calls per denoiser call, each with its own text length; call i is sample i.
Its records carry meta["sample"], and under the pipeline's batched CFG ([uncond, cond] samples)
the branch of the sample, so the B records of one layer and step are told apart.
"""
from __future__ import annotations

import dataclasses
import math

from ....session import CallLayout
from .base import Family, Observed, Timestep, arg, length, patched_grid


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")          # [B, C, F, H, W], patchified per frame
    p = model.config.patch_size
    grid = (latent.shape[2], *patched_grid(latent.shape[-2:], p))
    text = arg(args, kwargs, 1, "encoder_hidden_states")
    mask = arg(args, kwargs, 3, "encoder_attention_mask")
    valid = [int(n) for n in mask.bool().sum(1)] if mask is not None else [length(text)] * latent.shape[0]
    # "text" is the longest sample's (for the byte estimate); each call's own is set in layout()
    return {"video": (math.prod(grid), grid), "text": (max(valid), None), "valid_text": valid}


class _PerSampleFamily(Family):
    """A family whose processor makes one attention call per batch sample, in sample order."""

    def layout(self, layer: str, observed: Observed, call: int, nq: int, nk: int) -> CallLayout | str:
        valid = observed["valid_text"]
        sample = call % len(valid)
        out = super().layout(layer, {**observed, "text": (valid[sample], None)}, 0, nq, nk)
        if isinstance(out, str) or len(valid) == 1:
            return out
        return dataclasses.replace(out, sample=(sample, len(valid)))


MOCHI = _PerSampleFamily(
    name="mochi",
    denoisers=("MochiTransformer3DModel",),
    observe=_observe,
    attention=(("*", ("video+text",)),),
    default_relations=("video->text",),
    timestep=Timestep(2, "timestep"),   # Mochi's reversed timesteps, as the scheduler lists them
)
