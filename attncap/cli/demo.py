"""``attncap demo``: the embedded shapes model draws a few captions with capture on (no download)."""
from __future__ import annotations

from pathlib import Path

from .common import positive


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded demo and write pictures to results/<timestamp>/")
    p.add_argument("--out", default=None, help="output folder (default results/<timestamp>)")
    p.add_argument("--prompt", nargs="+", default=None, metavar="CAPTION",
                   help="captions to draw, like 'a red circle and a blue square' (colours: red, green, blue, "
                        "yellow, cyan, magenta; shapes: circle, square, triangle)")
    p.add_argument("--steps", type=positive(int), default=20, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def run(args) -> Path:
    from ..demo import CAPTIONS, run as run_demo

    return run_demo(args.out, captions=args.prompt or CAPTIONS, steps=args.steps, seed=args.seed,
                    progress=not args.quiet)
