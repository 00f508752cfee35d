"""``attncap run MODEL --prompt TEXT``: a diffusers pipeline under capture, then its pictures.

MODEL: a diffusers pipeline folder (save_pretrained), a Hugging Face Hub id, or "shapes" (the embedded
demo model). Writes results/<timestamp>-<prompt>/ with image.png (or video.mp4), the store (index.json +
maps-*.safetensors), run.json and everything render_all draws (tree/, words/, montages,
evolution.gif/.mp4, masks/, report.md/.html). Pipelines without a text encoder: --prompt-embeds
FILE.safetensors with prompt_embeds [1, T, C] (and optionally negative_prompt_embeds,
pooled_prompt_embeds, ...); --prompt then only labels the tokens.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .common import (OUT_ALIASES, CLIError, Interrupted, capture_steps, check_words, csv, groups, heads, in_flag_words,
                     pool, positive, relations, stats)

DTYPES = ("auto", "float32", "float16", "bfloat16")
EMBEDDED_MODEL = "shapes"  # attncap run shapes: the demo model shipped in attncap/assets


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a diffusers pipeline under capture and draw what it attended to",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help=f"a diffusers pipeline folder (save_pretrained), a Hugging Face Hub id, or "
                                   f"{EMBEDDED_MODEL!r} (the embedded demo model)")
    p.add_argument("--prompt", default=None, help="the prompt (with --prompt-embeds: only for token labels)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--prompt-embeds", default=None, metavar="FILE.safetensors",
                     help="tensors prompt_embeds [1,T,C] (+ negative_prompt_embeds, pooled_prompt_embeds, ...) for "
                          "pipelines without a text encoder")
    p.add_argument("--steps", type=positive(int), default=None, help="denoising steps (pipeline default)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (pipeline default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=positive(int), default=None)
    p.add_argument("--width", type=positive(int), default=None)
    p.add_argument("--frames", type=positive(int), default=None, help="video frames (video pipelines)")
    p.add_argument("--layers", default="all", help="'all', a glob ('*attn2*') or a comma list of layer names")
    p.add_argument("--relations", type=relations, default="auto",
                     help="'auto' (the text cross-attention), 'all', or a comma list like image->text,image->image")
    p.add_argument("--pool", type=pool, default=None, help="pool image/video grids: 4 or t,h,w factors")
    p.add_argument("--tokens", default=None, help="keep only these text tokens: key indices or prompt words, comma list")
    p.add_argument("--heads", type=heads, default="mean", help="'mean', 'all' or head indices 0,3")
    p.add_argument("--stats", type=stats, default=("entropy", "peak"), help="comma list of entropy,peak,colsum or none")
    p.add_argument("--capture-steps", type=capture_steps, default="all", help="'all', 'last' or step indices 0,10")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on cuda, float32 on cpu")
    p.add_argument("--max-gib", type=positive(float), default=8.0, help="refuse captures larger than this")
    p.add_argument("--out", *OUT_ALIASES, dest="out", default="results",
                   help="parent folder of the timestamped run folder (the store spills there as it is captured)")
    p.add_argument("--render", action=argparse.BooleanOptionalAction, default=True, help="draw the pictures")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="write report.md/.html")
    p.add_argument("--tree", action=argparse.BooleanOptionalAction, default=True,
                     help="write the per-layer/per-step tree of .npy/.png")
    p.add_argument("--words", nargs="+", default=None, help="words to draw (default: the prompt's words)")
    p.add_argument("--groups", nargs="+", default=None, metavar="NAME=w1,w2", help="token groups for the part-wise view")
    p.add_argument("--fps", type=positive(float), default=3.0, help="frames per second of the animations")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here; use --device cpu")
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def load_pipeline(model: str, dtype=None, quiet: bool = False):
    """DiffusionPipeline.from_pretrained with readable errors; components saved as null (no text
    encoder, no safety checker) are passed as None."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise CLIError("attncap run needs diffusers: pip install 'attncap[diffusers]'") from None
    if model == EMBEDDED_MODEL:
        from ..demo_model.pipeline import MODEL_DIR

        model = str(MODEL_DIR)
    path = Path(model).expanduser()
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    loader = DiffusionPipeline
    if path.exists():
        index = path / "model_index.json"
        if not path.is_dir() or not index.exists():
            raise CLIError(f"{model} is not a diffusers pipeline folder (no model_index.json); save one with "
                           "pipe.save_pretrained(folder) or pass a Hub id like stable-diffusion-v1-5/stable-diffusion-v1-5")
        try:
            config = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"{index} is not valid JSON: {e}") from None
        for name, value in config.items():
            if isinstance(value, list) and len(value) == 2 and value[0] is None and value[1] is None:
                kwargs[name] = None
        source = str(path)
        if config.get("_class_name") == "ShapesPipeline":  # the embedded demo model: not a diffusers class
            from ..demo_model.pipeline import ShapesPipeline

            loader = ShapesPipeline
    else:
        if model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model:
            raise CLIError(f"model path {model!r} does not exist (and it is not a Hub id like org/name)")
        source = model
    from diffusers.utils import logging as dlogging

    bars_were_off = not dlogging.is_progress_bar_enabled()
    if quiet:
        dlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 deprecates torch_dtype for dtype; older releases only know torch_dtype
            warnings.filterwarnings("ignore", message="(?s).*torch_dtype")
            return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: a pipeline class diffusers lacks
        where = "folder" if path.exists() else "Hub id"
        raise CLIError(f"could not load the pipeline from {where} {model!r}: {str(e).splitlines()[0][:400]}") from None
    finally:
        if quiet and not bars_were_off:
            dlogging.enable_progress_bar()


def _call_params(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def _has_text_encoder(pipe) -> bool:
    return any(getattr(pipe, n, None) is not None for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))


def _slug(text: str | None) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text or "").strip("-").lower()
    return s[:40]


def _pipeline_kwargs(pipe, args, device, dtype) -> dict:
    import torch

    params = _call_params(pipe)
    kw: dict[str, Any] = {}
    if args.prompt_embeds:
        p = Path(args.prompt_embeds)
        if not p.exists():
            raise CLIError(f"--prompt-embeds {args.prompt_embeds}: no such file")
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p))
        except Exception as e:
            raise CLIError(f"--prompt-embeds {p}: not a safetensors file ({e})") from None
        if "prompt_embeds" not in tensors:
            raise CLIError(f"--prompt-embeds {p} holds {sorted(tensors)}; it needs a tensor named prompt_embeds [1, T, C]")
        unknown = sorted(k for k in tensors if k not in params)
        if unknown:
            raise CLIError(f"--prompt-embeds: {type(pipe).__name__} takes no {unknown}; its embedding arguments are "
                           f"{sorted(k for k in params if 'embeds' in k)}")
        kw.update({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()})
        cfg = args.guidance is None or args.guidance > 1
        if cfg and "negative_prompt_embeds" in params and "negative_prompt_embeds" not in kw and not _has_text_encoder(pipe):
            print("attncap: no negative_prompt_embeds in the file: using zeros for the unconditional branch",
                  file=sys.stderr)
            kw["negative_prompt_embeds"] = torch.zeros_like(kw["prompt_embeds"])
            for k in ("pooled_prompt_embeds",):
                if k in kw and f"negative_{k}" in params:
                    kw[f"negative_{k}"] = torch.zeros_like(kw[k])
    else:
        if not args.prompt:
            raise CLIError("give --prompt TEXT (or --prompt-embeds FILE.safetensors)")
        if not _has_text_encoder(pipe):
            raise CLIError(f"{type(pipe).__name__} from {args.model} has no text encoder; pass --prompt-embeds "
                           "FILE.safetensors holding prompt_embeds [1, T, C] (--prompt then only labels the tokens)")
        kw["prompt"] = args.prompt
        if args.negative_prompt is not None:
            kw["negative_prompt"] = args.negative_prompt
    for flag, name in (("steps", "num_inference_steps"), ("guidance", "guidance_scale"), ("height", "height"),
                       ("width", "width"), ("frames", "num_frames")):
        value = getattr(args, flag)
        if value is None:
            continue
        if name not in params:
            raise CLIError(f"--{flag}: {type(pipe).__name__} has no {name} argument")
        kw[name] = value
    if "generator" in params:
        kw["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    return kw


def _save_output(result, run_dir: Path, fps: float) -> tuple[Any, Any, list[str]]:
    """image.png or video.mp4 (GIF without ffmpeg) from a pipeline output; returns (image, frames, files)."""
    from ..viz.animate import ffmpeg_available, write_animation
    from ..viz.core import as_frames, as_rgb, save_png

    files = []
    frames = getattr(result, "frames", None)
    if frames is not None:
        video = as_frames(frames[0])
        path = run_dir / ("video.mp4" if ffmpeg_available() else "video.gif")
        write_animation(list(video), path, fps=max(fps, 8))
        save_png(video[0], run_dir / "image.png")
        return video[0], video, [path.name, "image.png"]
    images = getattr(result, "images", None)
    if images is None:
        raise CLIError(f"the pipeline returned {type(result).__name__} without images or frames")
    img = as_rgb(images[0] if not hasattr(images, "shape") or images.ndim == 4 else images)
    save_png(img, run_dir / "image.png")
    files.append("image.png")
    return img, None, files


def _new_run_dir(parent: Path, prompt: str | None) -> Path:
    """parent/<YYYYmmdd-HHMMSS>-<prompt slug>, with -2, -3 ... when taken."""
    name = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{_slug(prompt)}" if _slug(prompt) else "")
    for i in range(1, 1000):
        d = parent / (name if i == 1 else f"{name}-{i}")
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise CLIError(f"cannot create a run folder under {parent}")


def _label_tokens(store, alignment, prompt: str | None) -> None:
    """store.tokens from --prompt: the tokenizer's alignment (also with --prompt-embeds: the prompt only
    labels the keys then), else position labels with the prompt kept."""
    from .. import prompts
    from ..analysis import text_length

    n = text_length(store)
    if alignment is not None:
        store.tokens = alignment.fit(n or len(alignment)).to_tokens()
    elif prompt and n:
        store.tokens = {"text": prompts.positions(n).tokens, "prompt": prompt, "words": []}


def run(args) -> Path:
    import torch

    import attncap

    from .. import prompts
    from ..render import render_all

    word_groups = groups(args.groups)
    if not args.prompt and not args.prompt_embeds:
        raise CLIError("give --prompt TEXT (or --prompt-embeds FILE.safetensors)")
    if args.prompt_embeds and not Path(args.prompt_embeds).is_file():
        raise CLIError(f"--prompt-embeds {args.prompt_embeds}: no such file")
    device, dtype = _device_dtype(args.device, args.dtype)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype, args.quiet)
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=args.quiet)
    kw = _pipeline_kwargs(pipe, args, device, dtype)
    alignment = prompts.for_pipeline(pipe, args.prompt) if args.prompt else None
    if args.prompt and alignment is None and not args.quiet:
        print(f"attncap: {type(pipe).__name__} has no tokenizer: the maps' keys are labelled by position, not by the "
              "words of --prompt", file=sys.stderr)
    tokens = None
    if args.tokens:
        tokens = []
        for item in csv(args.tokens):
            if item.lstrip("-").isdigit():
                tokens.append(int(item))
            elif alignment is None:
                raise CLIError(f"--tokens {item!r}: words need the pipeline's tokenizer and --prompt; pass key indices")
            else:
                try:
                    tokens += alignment.indices(item)
                except ValueError as e:
                    raise CLIError(f"--tokens: {e}") from None
    layers = args.layers if args.layers == "all" or "," not in args.layers else csv(args.layers)
    t_load = time.perf_counter() - t0
    meta = {"model": args.model, "prompt": args.prompt, "negative_prompt": args.negative_prompt,
            "prompt_embeds": args.prompt_embeds, "pipeline": type(pipe).__name__, "seed": args.seed,
            "steps": args.steps, "guidance": args.guidance, "height": args.height, "width": args.width,
            "frames": args.frames, "layers": args.layers, "relations": args.relations, "pool": args.pool,
            "tokens": tokens, "heads": args.heads, "stats": list(args.stats), "capture_steps": args.capture_steps,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "load_s": round(t_load, 2),
            "attncap": attncap.__version__, "torch": torch.__version__}
    # The store spills into the run folder as it fills, so an interrupted run leaves a store that loads.
    run_dir = _new_run_dir(Path(args.out), args.prompt)
    store, result, t1 = None, None, time.perf_counter()
    try:
        with attncap.capture(pipe, relations=args.relations, layers=layers, steps=args.capture_steps, heads=args.heads,
                             tokens=tokens, pool=args.pool, stats=args.stats, max_bytes=int(args.max_gib * 2**30),
                             spill_dir=run_dir) as store:
            with torch.inference_mode():
                result = pipe(**kw)
    except KeyboardInterrupt:
        _keep_partial(store, run_dir, alignment, args.prompt, meta, time.perf_counter() - t1)
    except (ValueError, TypeError, attncap.BudgetExceeded) as e:
        if store is None or len(store) == 0:
            shutil.rmtree(run_dir, ignore_errors=True)  # refused before any record: nothing to keep
            raise CLIError(in_flag_words(str(e))) from None
        _label_tokens(store, alignment, args.prompt)
        store.save(run_dir)
        raise CLIError(f"{in_flag_words(str(e))}\n(the {len(store)} records captured so far are in {run_dir})") from None
    t_run = time.perf_counter() - t1
    _label_tokens(store, alignment, args.prompt)
    image, frames, files = _save_output(result, run_dir, args.fps)
    store.save(run_dir)
    meta.update({"records": len(store), "store_mib": round(store.nbytes / 2**20, 2), "run_s": round(t_run, 2),
                 "outputs": files})
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    if args.render:
        render_all(store, run_dir, image=image if frames is None else None, video=frames,
                   words=check_words(store, args.words),
                   groups=word_groups, tree=args.tree, report=args.report, fps=args.fps, progress=not args.quiet,
                   meta={k: meta[k] for k in ("model", "prompt", "pipeline", "seed", "steps", "guidance", "layers",
                                               "relations", "pool", "heads", "device", "dtype", "run_s")})
    print(f"attncap run: {len(store)} records ({meta['store_mib']} MiB) in {t_run:.1f} s -> {run_dir}")
    return run_dir


def _keep_partial(store, run_dir: Path, alignment, prompt: str | None, meta: dict, seconds: float):
    """After Ctrl-C: the spilled records labelled and indexed, run.json marked interrupted; raises Interrupted."""
    if store is None or len(store) == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise Interrupted("interrupted before any map was captured; nothing was kept")
    _label_tokens(store, alignment, prompt)
    store.save(run_dir)
    meta.update({"records": len(store), "store_mib": round(store.nbytes / 2**20, 2), "run_s": round(seconds, 2),
                 "interrupted": True, "outputs": []})
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    raise Interrupted(f"interrupted after {seconds:.1f} s; the {len(store)} records captured so far are kept in {run_dir}\n"
                      f"  attncap render {run_dir}     draws them\n  attncap explore {run_dir}    explores them")
