"""``attncap render DIR``: re-draw a saved run (or any saved store) into DIR or --out."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import OUT_ALIASES, CLIError, check_words, groups, positive


def add_parser(sub) -> None:
    p = sub.add_parser("render", help="draw a saved store (a folder written by 'attncap run' or store.save)")
    p.add_argument("dir", help="folder holding index.json (+ image.png / video.mp4 of a run)")
    p.add_argument("--out", *OUT_ALIASES, dest="out", default=None, help="output folder (default: the store's folder)")
    p.add_argument("--image", default=None, help="picture to overlay (default DIR/image.png when present)")
    p.add_argument("--video", default=None, help="video to overlay (default DIR/video.mp4 when present)")
    p.add_argument("--words", nargs="+", default=None, help="words or key indices to draw")
    p.add_argument("--groups", nargs="+", default=None, metavar="NAME=w1,w2")
    p.add_argument("--branch", default=None, help="cond (default where present), uncond")
    p.add_argument("--tree", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fps", type=positive(float), default=3.0)
    p.add_argument("--quiet", action="store_true")


def run(args) -> Path:
    import attncap

    from ..render import render_all

    d = Path(args.dir)
    if not d.is_dir():
        raise CLIError(f"{args.dir}: no such folder")
    try:
        store = attncap.load(d)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    image = Path(args.image) if args.image else (d / "image.png" if (d / "image.png").exists() else None)
    video = Path(args.video) if args.video else next((d / n for n in ("video.mp4", "video.gif") if (d / n).exists()), None)
    for flag, p in (("--image", args.image), ("--video", args.video)):
        if p and not Path(p).exists():
            raise CLIError(f"{flag} {p}: no such file")
    meta = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    out = Path(args.out) if args.out else d
    words = check_words(store, args.words)
    paths = render_all(store, out, image=image if video is None else None, video=video, words=words,
                       groups=groups(args.groups), branch=args.branch, tree=args.tree, report=args.report,
                       fps=args.fps, progress=not args.quiet,
                       meta={k: meta.get(k) for k in ("model", "prompt", "pipeline", "seed", "steps") if k in meta})
    print(f"attncap render: {len(paths)} files -> {out}")
    return out
