"""Moving pictures: attention evolution over denoising steps, maps over video frames, and the
generation view of a language model (one frame per generated token), as GIF or MP4.

GIFs go through imageio's Pillow plugin; MP4 through imageio-ffmpeg (libx264, yuv420p), when its
ffmpeg binary runs (``ffmpeg_available()``). Frames of different sizes are padded to one size.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import analysis as A
from ..store import Store, _resize
from .core import (BG, as_frames, as_rgb, colorize, fit, font, grid, heat_tile, lut, normalize, overlay, resize,
                   short_layer, text_width, to_numpy, value_range, with_colorbar)
from .figures import resolve_words


@functools.lru_cache(maxsize=1)
def ffmpeg_available() -> bool:
    """True when imageio-ffmpeg is installed and its ffmpeg binary runs."""
    try:
        import subprocess

        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        return subprocess.run([exe, "-version"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


def _pad_to(frames: Sequence[np.ndarray], multiple: int = 1) -> list[np.ndarray]:
    h = max(f.shape[0] for f in frames)
    w = max(f.shape[1] for f in frames)
    h += (-h) % multiple
    w += (-w) % multiple
    out = []
    for f in frames:
        if f.shape[:2] != (h, w):
            g = np.full((h, w, 3), BG, np.uint8)
            g[: f.shape[0], : f.shape[1]] = f[..., :3]
            f = g
        out.append(np.ascontiguousarray(f[..., :3].astype(np.uint8)))
    return out


def write_animation(frames: Sequence[np.ndarray], path: str | Path, fps: float = 4.0) -> Path:
    """Write frames (uint8 [H, W, 3]) as .gif (looping) or .mp4 (H.264), by the path's suffix."""
    import imageio.v2 as iio2
    import imageio.v3 as iio

    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        iio.imwrite(path, np.stack(_pad_to(frames)), extension=".gif", duration=int(round(1000 / fps)), loop=0)
    elif suffix in (".mp4", ".mov", ".mkv"):
        if not ffmpeg_available():
            raise RuntimeError("writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); GIF works without")
        writer = iio2.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                 pixelformat="yuv420p", ffmpeg_log_level="error")
        try:
            for f in _pad_to(frames, 2):
                writer.append_data(f)
        finally:
            writer.close()
    else:
        raise ValueError(f"animation path must end in .gif or .mp4; got {path.name!r}")
    return path


def _write_all(frames, paths, fps) -> list[Path]:
    out = []
    for p in ([paths] if isinstance(paths, (str, Path)) else paths or []):
        if Path(p).suffix.lower() == ".mp4" and not ffmpeg_available():
            continue
        out.append(write_animation(frames, p, fps))
    return out


def _timesteps(store: Store) -> dict[int, float | None]:
    return {r.step: r.timestep for r in store.records}


def evolution_frames(store: Store, words: Any = None, image: Any = None, size=None, relation: str | None = None,
                     layer=None, branch: str | None = None, batch: int = 0, tile: int = 160, cmap: str = "inferno",
                     scale: str = "word", progress: bool | None = None) -> list[np.ndarray]:
    """One frame per denoising step: each word's map at that step (over the image when given).
    scale "word": one colour scale per word over all steps (strength shows); "frame": per frame."""
    from tqdm.auto import tqdm

    chosen = resolve_words(store, words)
    if not chosen:
        raise ValueError("no words to animate")
    steps = A.steps_of(store, relation, layer, branch)
    if not steps:
        raise ValueError("no text map records to animate")
    hw = tuple(size) if size else A.largest_hw(r.query_grid for r in A.text_records(store, relation, layer, None, branch))
    aggs = [A.aggregate(store, hw, relation, layer, s, branch, batch) for s in steps]  # once per step, all words
    series = []
    for _, keys in chosen:
        maps = torch.stack([a.word(keys) for a in aggs])
        series.append(maps if maps.dim() == 3 else maps.mean(1))
    ts = _timesteps(store)
    img = None if image is None else fit(image, tile)
    recs = A.text_records(store, relation, layer, None, branch)
    n_layers = len({r.layer for r in recs})
    what = f"{recs[0].relation}, " + (f"mean of {n_layers} layers" if n_layers > 1 else short_layer(recs[0].layer))
    what += ", colour scale per word over all steps" if scale == "word" else ", colour scale per frame"
    frames = []
    for i, s in enumerate(tqdm(steps, desc="attncap: evolution", leave=False, disable=not progress)):
        tiles = []
        for maps in series:
            m = maps[i]
            vmin, vmax = (float(maps.min()), float(maps.max())) if scale == "word" else value_range(m)
            pic = heat_tile(m, tile, cmap, vmin, vmax) if img is None else overlay(img, m, cmap=cmap, vmin=vmin, vmax=vmax)
            tiles.append(with_colorbar(pic, vmin, vmax, cmap))
        t = ts.get(s)
        title = f"step {s} ({i + 1} of {len(steps)})" + (f", t = {t:.4g}" if t is not None else "") + f"  ·  {what}"
        frames.append(grid([tiles], [[lab for lab, _ in chosen]], title=title))
    return frames


def evolution_animation(store: Store, paths: str | Path | Sequence[str | Path], words: Any = None, image: Any = None,
                        fps: float = 3.0, **kwargs) -> list[Path]:
    """evolution_frames written to each path (.gif / .mp4; MP4 skipped when ffmpeg does not run)."""
    return _write_all(evolution_frames(store, words, image, **kwargs), paths, fps)


def video_overlay(video: Any, m: Any, alpha: float = 0.55, cmap: str = "inferno", vmin=None, vmax=None) -> list[np.ndarray]:
    """Frames of a video with a map [t, h, w] (or [h, w]) over them; with fewer map frames than video
    frames (temporal compression), video frame f shows map frame f * t // T. One colour scale."""
    frames = as_frames(video)
    a = to_numpy(m)
    a = a[None] if a.ndim == 2 else a
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    t, n = a.shape[0], len(frames)
    return [overlay(f, a[min(t - 1, i * t // n)], alpha, cmap, lo, hi) for i, f in enumerate(frames)]


def video_word_animation(store: Store, word: Any, video: Any, paths, fps: float = 8.0, **select) -> list[Path]:
    """A word's aggregated map (query grid (t, h, w)) over the video's frames."""
    return _write_all(video_overlay(video, A.word_map(store, word, **select)), paths, fps)


# ----------------------------------------------------------------------------------------------
# language models: one frame per generated token
# ----------------------------------------------------------------------------------------------

def generation_records(store: Store, relation: str | None = None, layer=None, branch=None):
    """"map" records whose queries are text (no grid) and whose keys are an image/video grid."""
    recs = [r for r in store.get(layer=layer, relation=relation, kind="map", branch=branch)
            if r.query_grid is None and r.key_grid is not None]
    return A.cond_first(recs, branch)


def generation_maps(store: Store, relation=None, layer=None, branch=None, batch: int = 0):
    """(steps, maps [S, *key grid] of the last query at each step (the token being generated),
    mass [S] = the attention that query gives the image keys), averaged over layers and heads."""
    recs = generation_records(store, relation, layer, branch)
    if not recs:
        raise ValueError("no records with text queries and image keys (e.g. text->image of a language model)")
    hw = A.largest_hw(r.key_grid for r in recs)
    by: dict[int, list] = {}
    for r in recs:
        row = A.query_maps(r, batch)[-1]
        mass = float(row.sum())
        g = tuple(r.key_grid)
        if g[-2:] != hw:
            row, g = _resize(row[None], 1, g, hw)
            row = row[0]
        by.setdefault(r.step, []).append((row.reshape(g), mass))
    steps = sorted(by)
    maps = torch.stack([torch.stack([m for m, _ in by[s]]).mean(0) for s in steps])
    mass = torch.tensor([float(np.mean([x for _, x in by[s]])) for s in steps], dtype=torch.float32)
    return steps, maps, mass


def _token_panel(tokens: Sequence[str], colours: Sequence[np.ndarray], current: int, width: int, height: int,
                 size: int = 15) -> np.ndarray:
    """Generated text so far, each token on a box of its colour, the current one outlined."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (BG, BG, BG))
    draw = ImageDraw.Draw(canvas)
    x, y, line = 6, 6, size + 10
    for i, (tok, col) in enumerate(zip(tokens, colours)):
        label = tok.replace("\n", "\u21b5") or " "
        w = text_width(label, size) + 6
        if x + w > width - 6 and x > 6:
            x, y = 6, y + line
        if y + line > height:
            break
        c = tuple(int(v) for v in col)
        draw.rectangle([x, y, x + w, y + line - 4], fill=c)
        lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
        draw.text((x + 3, y + 2), label, fill=(0, 0, 0) if lum > 110 else (255, 255, 255), font=font(size))
        if i == current:
            draw.rectangle([x - 2, y - 2, x + w + 2, y + line - 2], outline=(0, 200, 255), width=2)
        x += w + 4
    return np.asarray(canvas)


def generation_frames(store: Store, tokens: Sequence[str] | None = None, image: Any = None, relation=None, layer=None,
                      branch=None, batch: int = 0, tile: int = 256, cmap: str = "inferno") -> list[np.ndarray]:
    """Frame s: the image with the attention of generated token s over it, beside the text generated
    so far, every token coloured by how much attention it paid to the image (its mass)."""
    steps, maps, mass = generation_maps(store, relation, layer, branch, batch)
    if tokens is None:
        tokens = (store.tokens or {}).get("generated")
    tokens = list(tokens) if tokens else [f"<{s}>" for s in steps]
    if len(tokens) < len(steps):
        tokens += [f"<{s}>" for s in steps[len(tokens):]]
    colours = lut(cmap)[(normalize(mass, 0.0) * 255).round().astype(np.int64)]
    img = None if image is None else fit(image, tile)
    vmin, vmax = float(maps.min()), float(maps.max())
    frames = []
    for i, s in enumerate(steps):
        m = maps[i] if maps[i].dim() == 2 else maps[i].mean(0)
        left = heat_tile(m, tile, cmap, vmin, vmax, smooth=True) if img is None else overlay(img, m, cmap=cmap,
                                                                                            vmin=vmin, vmax=vmax)
        left = with_colorbar(left, vmin, vmax, cmap)
        right = _token_panel(tokens[: i + 1], colours[: i + 1], i, width=int(tile * 1.5), height=left.shape[0])
        title = f"token {s}: {tokens[i]!r}  (attention to image {float(mass[i]):.2f})"
        frames.append(grid([[left, right]], [["attention over the image", "generated text (colour: image attention)"]],
                           title=title))
    return frames


def generation_view(store: Store, paths, tokens: Sequence[str] | None = None, image: Any = None, fps: float = 2.0,
                    **kwargs) -> list[Path]:
    """generation_frames written as a video (.mp4 / .gif)."""
    return _write_all(generation_frames(store, tokens, image, **kwargs), paths, fps)


__all__ = ["ffmpeg_available", "write_animation", "evolution_frames", "evolution_animation", "video_overlay",
           "video_word_animation", "generation_maps", "generation_frames", "generation_view", "as_rgb",
           "colorize", "resize"]
