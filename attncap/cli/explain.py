"""``attncap explain MODEL IMAGE --prompt TEXT --out DIR``: word maps of an existing picture or video.

MODEL: a diffusers pipeline folder, a Hugging Face Hub id, or "shapes" (the embedded demo model).
IMAGE: a picture file (png, jpg, ...), a video file (mp4, gif) or a folder of frame pictures (sorted by
name). attncap.explain noises it at --noise-levels with each of --seeds and runs the denoiser once per
level and seed with the prompt, under capture. DIR gets image.png (the input; video.mp4/gif too for a
video), the store (index.json + safetensors), run.json and everything render_all draws: words/ with
overlays on the input, masks/, montages, the report and explorer.html.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .common import (OUT_ALIASES, CLIError, check_words, csv, heads, in_flag_words, pool, positive, relations,
                     stats)

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in csv(text))
    except ValueError:
        vals = ()
    if not vals or not all(0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: use fractions of the noise schedule in [0, 1], like 0.3,0.5,0.7")
    return vals


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in csv(text))
    except ValueError:
        vals = ()
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use non-negative ints like 0 or 0,1,2")
    return vals


def _size(text: str) -> tuple[int, int]:
    vals = _ints(text)
    if len(vals) != 2 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use HEIGHT,WIDTH like 512,768")
    return vals  # type: ignore[return-value]


def add_parser(sub) -> None:
    from ..explain import DEFAULT_NOISE_LEVELS, DEFAULT_SEEDS

    p = sub.add_parser("explain", help="word maps of an existing image or video (one the model did not generate)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a diffusers pipeline folder, a Hugging Face Hub id, or 'shapes' (the demo model)")
    p.add_argument("image", help="a picture file, a video file (mp4, gif) or a folder of frame pictures")
    p.add_argument("--prompt", required=True, help="the text whose words are mapped onto the picture")
    p.add_argument("--out", *OUT_ALIASES, dest="out", required=True, help="output folder")
    p.add_argument("--noise-levels", type=_floats, default=DEFAULT_NOISE_LEVELS,
                   help="fractions of the noise schedule, comma list")
    p.add_argument("--seeds", type=_ints, default=DEFAULT_SEEDS, help="noise seeds, comma list (one call each)")
    p.add_argument("--cfg", action="store_true", help="also run --negative-prompt (the uncond branch)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--size", type=_size, default=None,
                   help="HEIGHT,WIDTH the model runs at (default: the input's aspect at the pipeline's resolution)")
    p.add_argument("--frames", type=positive(int), default=None, help="video: at most this many frames")
    p.add_argument("--layers", default="all", help="'all', a glob ('*attn2*') or a comma list of layer names")
    p.add_argument("--relations", type=relations, default="auto", help="'auto' (the text cross-attention), 'all', "
                   "or a comma list like image->text")
    p.add_argument("--heads", type=heads, default="mean", help="'mean', 'all' or head indices 0,3")
    p.add_argument("--tokens", default=None, help="keep only these prompt words or key indices, comma list")
    p.add_argument("--pool", type=pool, default=None, help="pool image/video grids: 4 or t,h,w factors")
    p.add_argument("--stats", type=stats, default=(), help="comma list of entropy,peak,colsum")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--max-gib", type=positive(float), default=8.0, help="refuse captures larger than this")
    p.add_argument("--words", nargs="+", default=None, help="words to draw (default: the prompt's words)")
    p.add_argument("--tree", action=argparse.BooleanOptionalAction, default=False,
                   help="also write the per-layer/per-call tree of .npy/.png")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="write report.md/.html")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def read_input(path: str) -> tuple[Any, bool]:
    """(uint8 [H, W, 3] picture or [F, H, W, 3] frames, is_video) from a file or a folder of frames."""
    from ..viz.core import as_frames, as_rgb

    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"IMAGE {path}: no such file or folder")
    try:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in PICTURE_SUFFIXES)
            if not files:
                raise CLIError(f"IMAGE {path}: the folder holds no pictures ({', '.join(PICTURE_SUFFIXES)})")
            return as_frames(files), True
        if p.suffix.lower() in VIDEO_SUFFIXES:
            frames = as_frames(p)
            return (frames[0], False) if len(frames) == 1 else (frames, True)
        return as_rgb(p), False
    except (OSError, ValueError) as e:
        raise CLIError(f"IMAGE {path}: cannot read it as a picture or video ({str(e).splitlines()[0][:300]})") from None


def run(args) -> Path:
    import numpy as np
    import torch

    import attncap

    from ..render import render_all
    from ..viz.animate import ffmpeg_available, write_animation
    from ..viz.core import save_png
    from .run import _device_dtype, load_pipeline

    picture, is_video = read_input(args.image)
    device, dtype = _device_dtype(args.device, args.dtype)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype, args.quiet).to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    tokens = None if args.tokens is None else [int(t) if t.isdigit() else t for t in csv(args.tokens)]
    layers = args.layers if args.layers == "all" or "," not in args.layers else csv(args.layers)
    t_load = time.perf_counter() - t0
    try:
        store = attncap.explain(pipe, list(picture) if is_video else picture, args.prompt,
                                noise_levels=args.noise_levels, seeds=args.seeds, cfg=args.cfg,
                                negative_prompt=args.negative_prompt, size=args.size, num_frames=args.frames,
                                relations=args.relations, layers=layers, heads=args.heads, tokens=tokens,
                                pool=args.pool, stats=args.stats, max_bytes=int(args.max_gib * 2**30))
    except (ValueError, TypeError, attncap.BudgetExceeded) as e:
        raise CLIError(in_flag_words(str(e))) from None
    t_run = time.perf_counter() - t0 - t_load

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = ["image.png"]
    save_png(picture[0] if is_video else picture, out / "image.png")
    if is_video:
        name = "video.mp4" if ffmpeg_available() else "video.gif"
        write_animation(list(picture), out / name, fps=8)
        files.append(name)
    try:
        store.save(out)
    except FileExistsError as e:
        raise CLIError(f"--out {out}: {e}") from None
    info = store.records[0].meta["explain"]
    meta = {"model": args.model, "input": str(args.image), "prompt": args.prompt, "pipeline": type(pipe).__name__,
            "noise_levels": list(args.noise_levels), "seeds": list(args.seeds), "cfg": args.cfg,
            "input_size": info["input_size"], "model_size": info["model_size"], "layers": args.layers,
            "relations": args.relations, "pool": args.pool, "heads": args.heads, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "load_s": round(t_load, 2), "run_s": round(t_run, 2),
            "records": len(store), "store_mib": round(store.nbytes / 2**20, 2), "outputs": files,
            "attncap": attncap.__version__, "torch": torch.__version__}
    (out / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    render_all(store, out, image=None if is_video else picture, video=np.asarray(picture) if is_video else None,
               words=check_words(store, args.words), tree=args.tree, report=args.report, progress=not args.quiet,
               meta={k: meta[k] for k in ("model", "input", "prompt", "pipeline", "noise_levels", "seeds", "layers",
                                           "relations", "device", "run_s")})
    print(f"attncap explain: {len(store)} records ({meta['store_mib']} MiB) from {len(args.noise_levels)} noise "
          f"level(s) x {len(args.seeds)} seed(s) in {t_run:.1f} s -> {out}")
    return out
