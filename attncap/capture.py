"""attncap.capture: one context manager around an unchanged pipeline, model or module call."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .session import CaptureConfig, CaptureSession
from .store import Store


@contextmanager
def capture(target: Any, relations: str | Sequence[str] = "auto", layers: str | Sequence[str] = "all",
            steps: str | int | Sequence[int] = "all", heads: str | Sequence[int] = "mean",
            tokens: int | str | Sequence[int | str] | None = None, pool: int | Sequence[int] | None = None,
            stats: Sequence[str] = (), offload: str | None = "cpu", max_bytes: int = 8 * 2**30,
            spill_dir: str | Path | None = None, backend: str = "auto", layout: Any = None) -> Iterator[Store]:
    """Capture attention maps from every call of ``target`` inside the block.

    target:    a diffusers pipeline or denoiser model (SD/SDXL UNets, SD3, Flux, Wan 2.1/2.2), a transformers
               PreTrainedModel (text models, Qwen2-VL / Qwen2.5-VL, LLaVA-style VLMs), or any torch.nn.Module
               that calls scaled_dot_product_attention (captured generically; layers are module paths and
               each call of its forward is one step).
    relations: "A->B" segment pairs such as "image->text", "image->image", "video->text", a list of
               them, "all", or "auto" (the family's text cross-attention: image->text / video->text).
    layers:    "all", a glob such as "*attn2*", or a list of layer names ("unet.down_blocks.1...").
    steps:     "all", "last", or step indices (denoising steps from 0).
    heads:     "mean", "all" or a list of head indices.   pool: int or (t, h, w) on image/video grids.
    tokens:    text keys to keep as token maps (one pass, exact): key indices, or prompt words such as
               ["cat", "sofa"] (all their sub-word tokens), found in the prompt the pipeline encodes.
    stats:     any of "entropy", "peak", "colsum".     offload: "cpu" moves maps off the GPU at once.
    max_bytes: the capture is refused before the first step if its products would pass this.
    spill_dir: write every record to disk as soon as it exists (an interrupted run keeps them).
    layout:    the token layout of a plain module's (or a transformers model's) attention calls:
               [("part0", 64, (4, 4, 4)), ("text", 16, None)] (name, length, grid) runs, a dict
               {"queries": [...], "keys": [...]}, or a callable (layer, q, k) -> CallLayout | None; None is
               one "tokens" segment (transformers: the model's own text/image layout). A diffusers model
               given a layout, or one no family adapter knows, is captured generically.
    Yields the Store; every processor and hook is restored on exit, also after an exception.
    """
    config = CaptureConfig.build(relations, layers, steps, heads, tokens, pool, stats, max_bytes)
    store = Store(offload=offload, max_bytes=max_bytes, spill_dir=spill_dir)
    session = CaptureSession(config, store, backend=backend)
    installed = _integration_for(target, session, layout)
    installed.install()
    try:
        yield store
    finally:
        installed.restore()


def _integration_for(target: Any, session: CaptureSession, layout: Any = None):
    from .integrations.diffusers.pipeline import DiffusersCapture, is_diffusers_target
    from .integrations.generic import GenericCapture, check_layout
    from .integrations.transformers import TransformersCapture, is_transformers_model

    layout = check_layout(layout)
    # Nothing is a diffusers object while diffusers is not imported (and importing it takes seconds).
    if "diffusers" in sys.modules and is_diffusers_target(target):
        if layout is None:
            from .integrations.diffusers.families import family_for

            pipeline = isinstance(getattr(target, "components", None), dict)
            if pipeline or family_for(target) is not None:
                return DiffusersCapture(target, session)
        if isinstance(target, torch.nn.Module):  # given a layout, or a denoiser no family adapter knows
            return GenericCapture(target, session, layout)
        raise ValueError(f"layout= applies to a module's SDPA calls; pass the {type(target).__name__}'s denoiser "
                         "(e.g. pipe.transformer) to capture it generically, or drop layout= for the diffusers "
                         "adapters")
    if is_transformers_model(target):
        return TransformersCapture(target, session, layout)
    if isinstance(target, torch.nn.Module):
        return GenericCapture(target, session, layout)
    raise TypeError(f"attncap.capture does not know how to capture a {type(target).__name__}: pass a diffusers "
                    "pipeline or model, a transformers model, or any torch.nn.Module that calls "
                    "scaled_dot_product_attention")
