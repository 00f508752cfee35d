"""``attncap explore RUN [--out page.html]``: the run's maps as one offline HTML page (attncap.explore)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import OUT_ALIASES, CLIError, positive

# how ExplorerTooLarge's advice spells each option here
FLAGS = {"pool": "--pool {}", "every": "--every {}", "branch": "--branch {}", "self_attention": "--no-self",
         "layers": "fewer layers (--layers GLOB)", "max_mb": "--max-mb {}"}


def add_parser(sub) -> None:
    p = sub.add_parser("explore", help="write an interactive offline HTML page of a saved run's maps",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder (attncap run / demo) or any saved store (index.json)")
    p.add_argument("--out", *OUT_ALIASES, dest="out", default=None,
                   help="the page (.html), or a folder for explorer.html (default RUN/explorer.html)")
    p.add_argument("--image", default=None, help="picture to lay the maps over (default RUN/image.png)")
    p.add_argument("--video", default=None, help="video to lay the maps over (default RUN/video.mp4 or .gif)")
    p.add_argument("--pool", type=positive(int), default=1, help="average the maps in NxN cells (smaller page)")
    p.add_argument("--every", type=positive(int), default=1, help="keep every N-th step (and the last)")
    p.add_argument("--layers", default=None, help="a glob ('*attn2*') or comma list of layer names (default all)")
    p.add_argument("--branch", default=None, help="only this CFG branch (cond / uncond); default all")
    p.add_argument("--self", dest="self_attention", action=argparse.BooleanOptionalAction, default=True,
                   help="embed the image->image maps (click a position to see where it looks)")
    p.add_argument("--max-mb", type=positive(float), default=25.0, help="refuse pages larger than this")
    p.add_argument("--title", default=None)


def run(args) -> Path:
    import attncap

    from ..viz.explorer import ExplorerTooLarge, explore

    d = Path(args.run)
    if not d.is_dir():
        raise CLIError(f"{args.run}: no such folder")
    try:
        store = attncap.load(d)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    for flag, p in (("--image", args.image), ("--video", args.video)):
        if p and not Path(p).is_file():
            raise CLIError(f"{flag} {p}: no such file")
    video = args.video or next((str(d / n) for n in ("video.mp4", "video.gif") if (d / n).exists()), None)
    image = args.image or (str(d / "image.png") if video is None and (d / "image.png").exists() else None)
    out = Path(args.out) if args.out else d / "explorer.html"
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "explorer.html"
    meta = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    layers = None if not args.layers or args.layers == "all" else \
        args.layers if "," not in args.layers else [s.strip() for s in args.layers.split(",") if s.strip()]
    try:
        path = explore(store, out, image=image, video=video, title=args.title, pool=args.pool, every=args.every,
                       layers=layers, branch=args.branch, self_attention=args.self_attention, max_mb=args.max_mb,
                       meta={k: meta.get(k) for k in ("model", "pipeline", "seed", "steps", "guidance") if meta.get(k)})
    except ExplorerTooLarge as e:
        raise CLIError(e.advice(FLAGS)) from None
    except ValueError as e:
        raise CLIError(str(e).replace("layers=", "--layers ").replace("branch=", "--branch ")) from None
    print(f"attncap explore: {path} ({path.stat().st_size / 2**20:.1f} MB); open it in a browser")
    return path
