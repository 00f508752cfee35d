"""The user's picture as explain needs it: frames in [0, 1], checked, resized, never modified in place.

Accepted: a PIL image; a numpy array or torch tensor in [0, 1] (uint8 arrays are read as /255),
[H, W, 3] or [3, H, W]; a video as a list of such frames or one array [F, H, W, 3], [F, 3, H, W],
[3, F, H, W] (or any of these with a leading batch of 1, as pipelines return videos).

Shape legend: F frames (1 for a still image), H, W pixels.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert") and hasattr(x, "size")


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """float32 copy of an array, tensor or PIL image; uint8 scaled by 1/255, range checked."""
    if _is_pil(x):
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            return torch.from_numpy(x.astype(np.float32) / 255.0)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{what}: a numpy array of {x.dtype} is not an image; pass floats in [0, 1] or uint8")
        x = torch.from_numpy(np.array(x, np.float32))
    elif isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            return x.detach().to("cpu", torch.float32) / 255.0
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{what}: a {x.dtype} tensor is not an image; pass floats in [0, 1] or uint8")
        x = x.detach().to("cpu", torch.float32, copy=True)
    else:
        raise TypeError(f"{what} must be a PIL image, a numpy array, a torch tensor or a list of frames; "
                        f"got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {list(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{what} values must lie in [0, 1]; got {lo:.4g}..{hi:.4g} (scale 0..255 data by 1/255, or "
                         "pass it as uint8; map [-1, 1] data with (x + 1) / 2)")
    return x


def _channels_first(x: torch.Tensor, what: str) -> torch.Tensor:
    """[..., 3, H, W] from one frame [H, W, 3] / [3, H, W] or frames [F, H, W, 3] / [F, 3, H, W] / [3, F, H, W]."""
    shape = list(x.shape)
    if x.dim() == 3:
        if shape[-1] == 3:
            return x.permute(2, 0, 1)
        if shape[0] == 3:
            return x
    elif x.dim() == 4:
        if shape[-1] == 3:
            return x.permute(0, 3, 1, 2)
        if shape[1] == 3:
            return x
        if shape[0] == 3:
            return x.permute(1, 0, 2, 3)
    else:
        raise ValueError(f"{what} must be an image [H, W, 3] / [3, H, W] or a video [F, H, W, 3] / [F, 3, H, W]; "
                         f"got {x.dim()} dimensions {shape}")
    raise ValueError(f"{what} of shape {shape} has no axis of 3 colour channels: explain needs RGB "
                     "(convert grey or RGBA pictures to RGB first)")


def as_frames(image: Any, what: str = "image") -> torch.Tensor:
    """float32 [F, 3, H, W] in [0, 1] on the CPU, a copy of ``image`` (see the module docstring)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{what} is an empty list of frames")
        frames = [_channels_first(_as_tensor(f, f"{what}[{i}]"), f"{what}[{i}]") for i, f in enumerate(image)]
        bad = [i for i, f in enumerate(frames) if f.dim() != 3 or f.shape != frames[0].shape]
        if bad:
            raise ValueError(f"{what}: frames must be single images of one size; frame {bad[0]} has shape "
                             f"{list(frames[bad[0]].shape)}, frame 0 {list(frames[0].shape)} (as [3, H, W])")
        return torch.stack(frames)
    x = _as_tensor(image, what)
    if x.dim() == 5:
        if x.shape[0] != 1:
            raise ValueError(f"{what}: explain takes one image or video, not a batch of {x.shape[0]} "
                             f"(shape {list(x.shape)}); call it once per item")
        x = x[0]
    x = _channels_first(x, what)
    return x[None] if x.dim() == 3 else x


def model_size(input_hw: tuple[int, int], default_hw: tuple[int, int], multiple: int,
               size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(h, w) the model runs at: ``size`` if given (checked), else the input's aspect ratio at the area of
    the pipeline's default resolution, each side rounded to ``multiple`` (at least one multiple)."""
    if size is not None:
        if len(size) != 2 or any(int(s) != s or s <= 0 or s % multiple for s in size):
            raise ValueError(f"size must be (height, width), positive multiples of {multiple} for this pipeline; "
                             f"got {size!r}")
        return int(size[0]), int(size[1])
    h, w = input_hw
    scale = math.sqrt(default_hw[0] * default_hw[1] / (h * w))
    return tuple(max(multiple, round(s * scale / multiple) * multiple) for s in (h, w))  # type: ignore[return-value]


def valid_frame_count(frames: int, temporal: int, limit: int | None = None) -> int:
    """The largest count n <= frames (and <= limit) with (n - 1) % temporal == 0 (Wan, LTX: 4k + 1)."""
    n = min(frames, limit) if limit else frames
    return (n - 1) // temporal * temporal + 1


def resample(frames: torch.Tensor, count: int, hw: tuple[int, int]) -> torch.Tensor:
    """[count, 3, h, w]: ``count`` frames picked evenly over the clip, each resized (bilinear, antialiased)."""
    if count != frames.shape[0]:
        idx = torch.linspace(0, frames.shape[0] - 1, count).round().long()
        frames = frames[idx]
    if tuple(frames.shape[-2:]) != tuple(hw):
        frames = F.interpolate(frames, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)
    return frames.clamp(0, 1)
