"""attncap.capture: one context manager around an unchanged pipeline, model or module call."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .session import CaptureConfig, CaptureSession
from .store import Store


@contextmanager
def capture(target: Any, relations: str | Sequence[str] = "auto", layers: str | Sequence[str] = "all",
            steps: str | int | Sequence[int] = "all", heads: str | Sequence[int] = "mean",
            tokens: int | Sequence[int] | None = None, pool: int | Sequence[int] | None = None,
            stats: Sequence[str] = (), offload: str | None = "cpu", max_bytes: int = 8 * 2**30,
            spill_dir: str | Path | None = None, backend: str = "auto") -> Iterator[Store]:
    """Capture attention maps from every call of ``target`` inside the block.

    target:    a diffusers pipeline or denoiser model (SD/SDXL UNets, SD3, Flux, Wan 2.1/2.2).
    relations: "A->B" segment pairs such as "image->text", "image->image", "video->text", a list of
               them, "all", or "auto" (the family's text cross-attention: image->text / video->text).
    layers:    "all", a glob such as "*attn2*", or a list of layer names ("unet.down_blocks.1...").
    steps:     "all", "last", or step indices (denoising steps from 0).
    heads:     "mean", "all" or a list of head indices.   tokens: key indices of the text segment to
               keep as token maps (one-pass, exact).   pool: int or (t, h, w) on image/video grids.
    stats:     any of "entropy", "peak", "colsum".     offload: "cpu" moves maps off the GPU at once.
    max_bytes: the capture is refused before the first step if its products would pass this.
    spill_dir: write every record to disk as soon as it exists (an interrupted run keeps them).
    Yields the Store; every processor and hook is restored on exit, also after an exception.
    """
    config = CaptureConfig.build(relations, layers, steps, heads, tokens, pool, stats, max_bytes)
    store = Store(offload=offload, max_bytes=max_bytes, spill_dir=spill_dir)
    session = CaptureSession(config, store, backend=backend)
    installed = _integration_for(target, session)
    installed.install()
    try:
        yield store
    finally:
        installed.restore()


def _integration_for(target: Any, session: CaptureSession):
    from .integrations.diffusers.pipeline import DiffusersCapture, is_diffusers_target

    if is_diffusers_target(target):
        return DiffusersCapture(target, session)
    raise TypeError(f"attncap.capture does not know how to capture a {type(target).__name__}: pass a diffusers "
                    "pipeline or model")
