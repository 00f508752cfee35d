"""What the family examples share: their command line, pipeline loading (or --tiny) and saving.

The capture itself stays in each script, where a reader looks for it. Prompt tokens need no code:
attncap.capture wraps the pipeline's encode_prompt, so store.token_map("cat") works after a run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

import attncap

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parser(doc: str, model: str, prompt: str, steps: int, out: str, tiny: tuple[str, ...],
           gpu_dtype: str = "bfloat16", capture_steps: str = "all") -> argparse.ArgumentParser:
    """The arguments every family example takes; a script adds its own to the returned parser."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, help="hub id or local path")
    p.add_argument("--prompt", default=prompt)
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {steps}; 2 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help=f"default: {gpu_dtype} on CUDA, float32 on CPU (--tiny: float32)")
    p.add_argument("--out", default=out, help="directory for the store and the image or frames")
    p.add_argument("--tiny", nargs="?", const=tiny[0], choices=tiny, default=None,
                   help="use a tiny random-weight pipeline instead of --model (no download)")
    p.add_argument("--capture-steps", default=capture_steps, help='"all", "last" or comma-separated step indices')
    p.set_defaults(default_steps=steps, gpu_dtype=gpu_dtype)
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Arguments with steps, dtype and capture_steps resolved."""
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else args.default_steps)
    gpu = args.device.startswith("cuda")
    args.torch_dtype = DTYPES[args.dtype or (args.gpu_dtype if gpu else "float32")]
    cs = args.capture_steps
    args.capture_steps = cs if cs in ("all", "last") else [int(s) for s in cs.split(",")]
    return args


def pipeline(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple]) -> tuple:
    """(pipe on args.device, call kwargs): the tiny pipeline for --tiny, else load(args)."""
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _tiny import tiny

        pipe, call = tiny(args.tiny, steps=args.steps)
        pipe.to(args.device, args.torch_dtype) if args.dtype else pipe.to(args.device)  # float32 unless asked
        print(f"tiny random {args.tiny} pipeline: --prompt is not used (random prompt embeddings)")
    else:
        pipe, call = load(args)
        pipe.to(args.device)
    return pipe, {**call, "output_type": "pil"}


def save(store: attncap.Store, out: str, images: list) -> Path:
    """The store and the pictures (image.png, or frame_NNN.png for a video) in ``out``."""
    path = store.save(out)
    names = ["image.png"] if len(images) == 1 else [f"frame_{i:03d}.png" for i in range(len(images))]
    for image, name in zip(images, names):
        image.save(path / name)
    print(store.summary())
    print(f"saved {len(store.records)} records and {len(images)} picture(s) to {path}")
    return path
