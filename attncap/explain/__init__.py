"""attncap.explain: word maps of an image or video the model did not generate.

    store = attncap.explain(pipe, image, "a red circle and a blue square")
    store.token_map("circle")                        # where the model reads "circle" in *your* picture

The picture is brought to what the pipeline expects (resized to its resolution, keeping the aspect
ratio; [-1, 1]; encoded with its VAE for latent models, as it is for pixel-space ones such as the
embedded demo model), noised at each of ``noise_levels`` with each seed's noise by the forward process
the denoiser was trained on, and the denoiser runs once per (level, seed) with the prompt encoded by
the pipeline's own encode_prompt, under attncap.capture. Nothing is generated: one call per level and
seed (two with cfg=True), and the store averages them in token_map.

Noise levels are fractions of the training timestep range T (num_train_timesteps): level l is the
timestep round(l * (T - 1)) for DDPM-trained models, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise with
the scheduler's alphas_cumprod (its add_noise), and sigma = l (timestep l * T) for flow-matching ones
(SD3, Flux, Wan), x_t = sigma * noise + (1 - sigma) * x0 (FlowMatchEulerDiscreteScheduler.scale_noise).

Records: step i is the i-th call, levels outer and seeds inner; branch "cond" (and "uncond" for the
negative prompt with cfg=True); meta["explain"] holds noise_level, seed, the input's size and the size
the model ran at. Per-family handling lives in attncap.explain.kinds, input handling in .inputs.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..capture import capture
from ..store import SPATIAL_AXIS, BudgetExceeded, Record, Store
from .inputs import as_frames, model_size, resample, valid_frame_count
from .kinds import KINDS, Kind, kind_of

# Chosen on 48 held-out demo scenes (benchmarks/explain.py; its RESULTS.md section has the tables): mean
# IoU is flat from 0 to 0.2 of the schedule (0.856-0.861; 0.1 best), then falls (0.5: 0.70, 0.7: 0.30),
# and more seeds or levels add nothing there, so the default is one call at 0.1 with one seed.
DEFAULT_NOISE_LEVELS: tuple[float, ...] = (0.1,)
DEFAULT_SEEDS: tuple[int, ...] = (0,)
STORE_OPTIONS = {"offload": "cpu", "max_bytes": 8 * 2**30, "spill_dir": None}

__all__ = ["explain", "noised", "DEFAULT_NOISE_LEVELS", "DEFAULT_SEEDS", "KINDS", "Kind", "kind_of"]


def noised(kind: Kind, scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, level: float
           ) -> tuple[torch.Tensor, float]:
    """(x_t, timestep): ``x0`` noised at ``level`` of the training timestep range (module docstring)."""
    T = scheduler.config.num_train_timesteps
    if kind.flow:
        sigma = torch.tensor(float(level), device=x0.device, dtype=x0.dtype)
        return sigma * noise + (1.0 - sigma) * x0, float(level) * T
    t = round(float(level) * (T - 1))
    abar = scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise, float(t)


def _check_levels(noise_levels: Sequence[float]) -> tuple[float, ...]:
    levels = (noise_levels,) if isinstance(noise_levels, (int, float)) else tuple(noise_levels)
    if not levels or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                             for v in levels):
        raise ValueError(f"noise_levels must be fractions of the noise schedule in [0, 1] (0: clean, 1: pure noise), "
                         f"e.g. {DEFAULT_NOISE_LEVELS}; got {noise_levels!r}")
    return tuple(float(v) for v in levels)


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    out = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise ValueError(f"seeds must be non-negative ints (one noise draw each), e.g. {DEFAULT_SEEDS}; got {seeds!r}")
    return out


def _check_capture_options(options: dict) -> None:
    allowed = set(inspect.signature(capture).parameters) - {"target"}
    if "steps" in options:
        raise ValueError("explain runs one denoiser call per noise level and seed (each call is a step of the store); "
                         "choose them with noise_levels= and seeds=, not steps=")
    if "layout" in options:
        raise ValueError("layout= is for plain modules; explain drives a diffusers pipeline's own denoiser")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"explain got unknown options {unknown}; capture options are {sorted(allowed - {'steps', 'layout'})}")


def _resize_axis(data: torch.Tensor, axis: int, grid: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """Interpolate ``axis`` (tokens row-major over ``grid``, (h, w) or (t, h, w)) to ``size`` of the same rank."""
    x = data.movedim(axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(-1, 1, *grid)
    if len(grid) == 2:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x.reshape(*lead, math.prod(size)).movedim(-1, axis)


def _at_input(record: Record, size: tuple[int, ...]) -> Record:
    """The record with its spatial axis (the query grid; the key grid of colsum/rows) at the input's size."""
    axis, attr = SPATIAL_AXIS[record.kind]
    grid = getattr(record, attr)
    if grid is None or len(grid) != len(size):
        return record
    target = tuple(size)
    record.data = _resize_axis(record.data.float(), axis, tuple(grid), target)
    setattr(record, attr, target)
    return record


def explain(pipe: Any, image: Any, prompt: str, *, noise_levels: float | Sequence[float] = DEFAULT_NOISE_LEVELS,
            seeds: int | Sequence[int] = DEFAULT_SEEDS, cfg: bool = False, negative_prompt: str = "",
            size: tuple[int, int] | None = None, num_frames: int | None = None, maps_at: str = "model",
            max_sequence_length: int | None = None, **capture_options: Any) -> Store:
    """Capture the attention maps ``pipe``'s denoiser gives ``prompt`` over an existing ``image``.

    pipe:          a diffusers pipeline explain knows (attncap.explain.kinds: the demo ShapesPipeline,
                   SD 1.x/2.x, SDXL, SD3, Flux.1, Wan 2.1/2.2 text-to-video).
    image:         PIL image; numpy array / torch tensor in [0, 1] (uint8 read as /255), [H, W, 3] or
                   [3, H, W]; for video pipelines a list of frames or [F, H, W, 3] / [F, 3, H, W] / [3, F, H, W]
                   (a still image is a one-frame video). Never modified.
    prompt:        the text whose words are mapped, encoded by the pipeline's encode_prompt.
    noise_levels:  fractions in [0, 1] of the training timestep range (see the module docstring).
    seeds:         one noise draw per seed (torch.Generator on the CPU, so any device gives the same noise).
    cfg:           also run ``negative_prompt`` (branch "uncond"), as classifier-free guidance would.
    size:          (height, width) the model runs at; default: the input's aspect ratio at the area of the
                   pipeline's default resolution, sides rounded to the multiple the pipeline needs.
    num_frames:    video: at most this many frames (evenly picked; counts of the form 4k + 1 for Wan).
    maps_at:       "model": records on the model's token grid; "input": each record's spatial axis
                   resized to the input's (frames,) height and width, so token_map(word) is at input size.
    max_sequence_length: the T5/UMT5 prompt length (default: the pipeline's own default).
    capture_options: attncap.capture's options (relations, layers, heads, tokens, pool, stats, offload,
                   max_bytes, spill_dir, backend); max_bytes bounds the whole store, shared by all calls.
    Returns the Store, its tokens set to the prompt's so store.token_map(word) works.
    """
    kind = kind_of(pipe)
    if not isinstance(prompt, str) or not prompt.strip():
        raise TypeError(f"prompt must be a non-empty string; got {prompt!r}")
    if not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a string; got {type(negative_prompt).__name__}")
    if maps_at not in ("model", "input"):
        raise ValueError(f"maps_at must be 'model' (the token grid) or 'input' (the input's size); got {maps_at!r}")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int or None; got {num_frames!r}")
    levels, seeds = _check_levels(noise_levels), _check_seeds(seeds)
    _check_capture_options(capture_options)
    if all(getattr(pipe, n, None) is None for n in ("text_encoder", "text_encoder_2", "text_encoder_3")):
        raise ValueError(f"explain encodes the prompt with the pipeline's own text encoder, and this "
                         f"{type(pipe).__name__} has none: load it with its text encoder(s)")
    scheduler = pipe.scheduler
    if not kind.flow and getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: a {kind.name} pipeline needs a DDPM-style "
                         "scheduler (DDIM, DDPM, PNDM, Euler, DPM-Solver ...)")

    frames = as_frames(image)                                              # [F, 3, H, W] in [0, 1]
    if not kind.video and frames.shape[0] > 1:
        raise ValueError(f"image is a video of {frames.shape[0]} frames, but {type(pipe).__name__} makes images; "
                         "pass one frame (or use a video pipeline such as Wan)")
    hw = model_size(tuple(frames.shape[-2:]), kind.default_size(pipe), kind.multiple(pipe), size)
    count = valid_frame_count(frames.shape[0], kind.temporal(pipe), num_frames) if kind.video else 1
    pixels = resample(frames, count, hw) * 2 - 1                          # [F', 3, h, w] in [-1, 1]
    x = pixels.permute(1, 0, 2, 3)[None] if kind.video else pixels        # [1, 3, F', h, w] / [1, 3, h, w]
    input_size = (frames.shape[0], *frames.shape[-2:]) if kind.video else tuple(frames.shape[-2:])

    store_opts = {k: capture_options.pop(k, v) for k, v in STORE_OPTIONS.items()}
    msl = max_sequence_length or kind.max_sequence_length
    from ..prompts import for_pipeline

    alignment = for_pipeline(pipe, prompt, msl)
    device = pipe._execution_device
    with torch.no_grad():
        x0 = kind.encode(pipe, x.to(device)).float()
        context = {"device": device, "size": hw, "max_sequence_length": msl}
        conds = {"cond": kind.prompt(pipe, prompt, context)}
        if cfg:
            conds["uncond"] = kind.prompt(pipe, negative_prompt, context)

    store = Store(**store_opts)
    store.tokens = alignment.to_tokens() if alignment is not None else None
    calls = len(levels) * len(seeds) * len(conds)
    per_call = store_opts["max_bytes"] // calls
    step = 0
    for level in levels:
        for seed in seeds:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
            x_t, timestep = noised(kind, scheduler, x0, noise, level)
            component = kind.denoiser_for(pipe, timestep)
            model = getattr(pipe, component)
            for branch, cond in conds.items():
                info = {"noise_level": level, "seed": seed, "timestep": timestep, "component": component,
                        "input_size": list(input_size), "model_size": [count, *hw] if kind.video else list(hw)}
                records = _one_call(kind, pipe, model, x_t, timestep, cond, store, per_call,
                                    _named_for(component, capture_options), calls if step == 0 else None)
                for r in records:
                    if component == "transformer_2" and r.layer.startswith("transformer."):
                        r.layer = component + r.layer[len("transformer"):]
                    r.step, r.branch, r.meta = step, branch, {**r.meta, "explain": info}
                    store.add(_at_input(r, input_size) if maps_at == "input" else r)
                step += 1
    return store


def _named_for(component: str, options: dict) -> dict:
    """Capture options for a call of ``component``. A denoiser captured on its own names its layers
    "unet.*" or "transformer.*"; Wan 2.2's low-noise expert is "transformer_2.*" in a pipeline capture,
    so layer names given that way are translated for its calls (and its records renamed back)."""
    layers = options.get("layers")
    if component != "transformer_2" or layers is None:
        return options
    fix = lambda n: "transformer." + n[len("transformer_2."):] if n.startswith("transformer_2.") else n  # noqa: E731
    return {**options, "layers": fix(layers) if isinstance(layers, str) else [fix(n) for n in layers]}


def _one_call(kind: Kind, pipe: Any, model: torch.nn.Module, x_t: torch.Tensor, timestep: float, cond: dict,
              store: Store, max_bytes: int, options: dict, calls: int | None) -> list[Record]:
    """The records of one denoiser call under attncap.capture (calls: say so in the first call's errors)."""
    try:
        with capture(model, max_bytes=max_bytes, **options) as inner:
            inner.tokens = store.tokens  # capture(tokens=["word"]) looks words up in them
            with torch.no_grad():
                kind.denoise(pipe, model, x_t.to(model.dtype), timestep, cond)
    except (ValueError, BudgetExceeded) as e:
        if calls is None:
            raise
        raise type(e)(f"{e} [explain makes {calls} denoiser calls (noise levels x seeds x branches); each may store "
                      f"max_bytes / {calls} = {max_bytes} bytes]") from e
    if not inner.records:
        raise ValueError(f"the {kind.name} denoiser ran but captured nothing with options {options or '(defaults)'}: "
                         "relations/layers select no attention call of it (explain's default relations='auto' "
                         "maps image->text, or video->text)")
    return inner.records
