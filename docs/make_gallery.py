"""Rebuild the README gallery (docs/gallery/) from a fresh ``attncap demo`` run.

    python docs/make_gallery.py [--out docs/gallery]

Runs the CLI's demo (the embedded shapes model, CPU, about 15 s) into a temporary folder and copies
a few of the pictures it wrote for one caption; each file must stay under 400 KB (the animation is
re-encoded smaller until it does).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from attncap.cli import main as attncap_main

LIMIT = 400 * 1024
CAPTION = "a yellow triangle and a green circle and a magenta square"
PICTURES = {"token_heatmaps.png": "token_heatmaps.png", "montage_circle.png": "montage.png",
            "masks.png": "masks.png", "self_attention.png": "self_attention.png", "evolution.gif": "evolution.gif"}


def shrink_gif(src: Path, dst: Path) -> Path:
    """Copy an animation, halving its size (and keeping every other frame) until it fits LIMIT."""
    from PIL import Image, ImageSequence

    with Image.open(src) as gif:
        frames = [f.convert("RGB") for f in ImageSequence.Iterator(gif)]
        duration = gif.info.get("duration", 300)
    scale, step = 1.0, 1
    while True:
        picked = frames[::step] + ([frames[-1]] if (len(frames) - 1) % step else [])
        size = (round(frames[0].width * scale), round(frames[0].height * scale))
        small = [f.resize(size, Image.LANCZOS) for f in picked]
        small[0].save(dst, save_all=True, append_images=small[1:], duration=duration * step, loop=0, optimize=True)
        if dst.stat().st_size <= LIMIT:
            return dst
        scale, step = (scale * 0.8, step) if step >= 2 else (scale, step * 2)


def build(out: Path) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        if attncap_main(["demo", "--out", tmp, "--quiet", "--prompt", CAPTION]) != 0:
            raise SystemExit("attncap demo failed")
        (run,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for src, dst in PICTURES.items():
            if src.endswith(".gif"):
                written.append(shrink_gif(run / src, out / dst))
                continue
            size = (run / src).stat().st_size
            if size > LIMIT:
                raise SystemExit(f"{src} is {size // 1024} KB, over the gallery's {LIMIT // 1024} KB")
            written.append(Path(shutil.copyfile(run / src, out / dst)))
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gallery")
    for path in build(ap.parse_args().out):
        print(path, file=sys.stderr)
