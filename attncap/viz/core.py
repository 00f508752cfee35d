"""Pixels: colour maps, overlays on images, labelled tile grids, PNG writing.

Everything here works on numpy arrays (uint8 [H, W, 3] pictures, float maps [h, w]) and composes
pictures with exact geometry: a tile grid has a white background, each tile is pasted at integer
offsets with its label written below it (PIL, matplotlib's DejaVu Sans), so pictures are cheap to
write by the thousand and easy to read back. matplotlib supplies colour maps (never a GUI backend).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

BG = 255


@functools.lru_cache(maxsize=16)
def lut(cmap: str = "inferno") -> np.ndarray:
    """[256, 3] uint8 table of a matplotlib colour map."""
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colour map {cmap!r}; try 'inferno', 'magma', 'viridis', 'jet', 'gray'") from None
    return (cm(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def to_numpy(m: Any) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        return m.detach().float().cpu().numpy()
    return np.asarray(m, dtype=np.float32)


def normalize(m: Any, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Map values to [0, 1] (min/max of the map unless given); a flat map becomes 0."""
    a = to_numpy(m).astype(np.float32)
    lo = float(np.nanmin(a)) if vmin is None else vmin
    hi = float(np.nanmax(a)) if vmax is None else vmax
    if not np.isfinite(hi - lo) or hi - lo <= 1e-20:
        return np.zeros_like(a)
    return np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0, 1)


def colorize(m: Any, cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """uint8 [h, w, 3] picture of a 2D map."""
    return lut(cmap)[(normalize(m, vmin, vmax) * 255).round().astype(np.int64)]


def resize(m: Any, size: Sequence[int], mode: str = "bilinear") -> np.ndarray:
    """Resize a [h, w] map (or [h, w, C] picture) to size = (H, W)."""
    a = torch.as_tensor(to_numpy(m))
    chan = a.dim() == 3
    x = a.permute(2, 0, 1)[None] if chan else a[None, None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=tuple(int(s) for s in size), mode=mode,
                          **({} if mode == "nearest" else {"align_corners": False}))
    x = x[0].permute(1, 2, 0) if chan else x[0, 0]
    return x.numpy()


def as_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image, a path, a [H, W(, C)] array (uint8 or floats in [0, 1]),
    or a torch tensor [C, H, W] / [1, C, H, W] in [0, 1] (diffusers output_type="pt")."""
    if isinstance(image, (str, Path)):
        import imageio.v3 as iio

        image = iio.imread(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim != 3:
        raise ValueError(f"image must be [H, W, C] or [C, H, W]; got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def as_frames(video: Any) -> np.ndarray:
    """uint8 [T, H, W, 3] from a path (mp4/gif), a list of pictures, an array [T, H, W, C] or a tensor
    [T, C, H, W] / [C, T, H, W] in [0, 1]."""
    if isinstance(video, (str, Path)):
        import imageio.v3 as iio

        return np.stack([as_rgb(f) for f in iio.imiter(video)])
    if isinstance(video, torch.Tensor):
        t = video.detach().float().cpu()
        if t.dim() == 5:
            t = t[0]
        if t.shape[0] in (1, 3) and t.shape[1] not in (1, 3):  # [C, T, H, W]
            t = t.permute(1, 0, 2, 3)
        return np.stack([as_rgb(f) for f in t])
    return np.stack([as_rgb(f) for f in video])


def overlay(image: Any, m: Any, alpha: float = 0.6, cmap: str = "inferno", vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    """The map upsampled (bilinear) over the picture and blended with weight alpha: uint8 [H, W, 3]."""
    img = as_rgb(image)
    colour = colorize(resize(to_numpy(m), img.shape[:2]), cmap, vmin, vmax)
    return (img.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round().astype(np.uint8)


def tile_shape(grid: Sequence[int], tile: int) -> tuple[int, int]:
    """(height, width) of a tile of at most ``tile`` pixels a side with the grid's aspect ratio."""
    h, w = grid[-2], grid[-1]
    return (tile, max(1, round(tile * w / h))) if h >= w else (max(1, round(tile * h / w)), tile)


def heat_tile(m: Any, tile: int = 128, cmap: str = "inferno", vmin=None, vmax=None, smooth: bool = False) -> np.ndarray:
    """A map as a picture of at most ``tile`` pixels a side (nearest: every cell stays visible)."""
    a = to_numpy(m)
    return colorize(resize(a, tile_shape(a.shape, tile), "bilinear" if smooth else "nearest"), cmap, vmin, vmax)


def fit(image: Any, tile: int) -> np.ndarray:
    img = as_rgb(image)
    return resize(img.astype(np.float32), tile_shape(img.shape[:2], tile)).round().clip(0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def font(size: int = 13):
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except Exception:  # pragma: no cover - a stripped matplotlib
        return ImageFont.load_default()


def text_width(text: str, size: int = 13) -> int:
    return int(np.ceil(font(size).getlength(text)))


def _ellipsize(text: str, width: int, size: int) -> str:
    if text_width(text, size) <= width:
        return text
    while text and text_width(text + "...", size) > width:
        text = text[:-1]
    return text + "..."


def short_layer(name: str) -> str:
    """'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'down1.a0.t0.attn2'."""
    s = re.sub(r"^(unet|transformer_2|transformer)\.", "", name)
    for a, b in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block", "mid"), ("attentions.", "a"),
                 ("single_transformer_blocks.", "st"), ("transformer_blocks.", "t"), ("blocks.", "b")):
        s = s.replace(a, b)
    return s


def grid(cells: Sequence[Sequence[np.ndarray | None]], cell_labels: Sequence[Sequence[str]] | None = None,
         col_labels: Sequence[str] | None = None, row_labels: Sequence[str] | None = None, title: str | None = None,
         pad: int = 6, font_size: int = 13) -> np.ndarray:
    """Tiles on a white canvas: rows x columns, a label under each tile, column labels on top, row
    labels on the left, a title above. None cells stay blank. Returns uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw

    ncols = max(len(r) for r in cells)
    col_w = [max((r[c].shape[1] for r in cells if c < len(r) and r[c] is not None), default=8) for c in range(ncols)]
    row_h = [max((c.shape[0] for c in r if c is not None), default=8) for r in cells]
    line = font_size + 5
    lab_h = line if cell_labels is not None else 0
    title_h = line + 4 if title else 0
    col_h = line if col_labels is not None else 0
    left = (max(text_width(t, font_size) for t in row_labels) + 2 * pad) if row_labels else 0
    width = left + pad + sum(w + pad for w in col_w)
    height = title_h + col_h + pad + sum(h + lab_h + pad for h in row_h)
    if title:
        width = max(width, text_width(title, font_size + 1) + 2 * pad)
    canvas = Image.new("RGB", (width, height), (BG, BG, BG))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font(font_size + 1))
    xs = [left + pad + sum(w + pad for w in col_w[:c]) for c in range(ncols)]
    y = title_h + col_h + pad
    if col_labels is not None:
        for c, t in enumerate(col_labels[:ncols]):
            draw.text((xs[c], title_h + 1), _ellipsize(str(t), col_w[c], font_size), fill=(0, 0, 0), font=font(font_size))
    for r, row in enumerate(cells):
        if row_labels is not None:
            draw.text((pad, y + row_h[r] // 2 - font_size // 2), str(row_labels[r]), fill=(0, 0, 0), font=font(font_size))
        for c, cell in enumerate(row):
            if cell is None:
                continue
            canvas.paste(Image.fromarray(np.ascontiguousarray(cell)), (xs[c], y))
            if cell_labels is not None and c < len(cell_labels[r]) and cell_labels[r][c]:
                draw.text((xs[c], y + cell.shape[0] + 2), _ellipsize(str(cell_labels[r][c]), col_w[c], font_size),
                          fill=(0, 0, 0), font=font(font_size))
        y += row_h[r] + lab_h + pad
    return np.asarray(canvas)


def strip(tiles: Sequence[np.ndarray], labels: Sequence[str] | None = None, ncols: int | None = None,
          title: str | None = None) -> np.ndarray:
    """Tiles wrapped into rows of ncols (default: all in one row)."""
    n = len(tiles)
    ncols = ncols or max(1, n)
    cells = [list(tiles[i:i + ncols]) for i in range(0, n, ncols)]
    labs = None if labels is None else [list(labels[i:i + ncols]) for i in range(0, n, ncols)]
    return grid(cells, labs, title=title)


def legend(names: Sequence[str], colours: Sequence[Sequence[int]], width: int, size: int = 13) -> np.ndarray:
    """Colour swatches with their names, wrapped to ``width`` pixels."""
    from PIL import Image, ImageDraw

    line, sw = size + 6, size
    items, x, y = [], 0, 0
    for name, c in zip(names, colours):
        w = sw + 4 + text_width(str(name), size) + 10
        if x + w > width and x > 0:
            x, y = 0, y + line
        items.append((x, y, str(name), tuple(int(v) for v in c)))
        x += w
    canvas = Image.new("RGB", (max(width, 1), y + line), (BG, BG, BG))
    draw = ImageDraw.Draw(canvas)
    for x, y, name, c in items:
        draw.rectangle([x, y + 2, x + sw, y + 2 + sw], fill=c)
        draw.text((x + sw + 4, y + 1), name, fill=(0, 0, 0), font=font(size))
    return np.asarray(canvas)


def value_range(m: Any, vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
    """The (low, high) that normalize/colorize use for this map: its min and max unless given."""
    a = to_numpy(m)
    lo = float(np.nanmin(a)) if vmin is None else float(vmin)
    hi = float(np.nanmax(a)) if vmax is None else float(vmax)
    return lo, hi


def _tick(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.1e}"


def colorbar(vmin: float, vmax: float, height: int, cmap: str = "inferno", size: int = 10) -> np.ndarray:
    """A vertical colour bar [height, w, 3] on white: vmax at the top, vmin at the bottom, the middle
    value between, so a heatmap beside it can be read as numbers."""
    from PIL import Image, ImageDraw

    labels = [_tick(v) for v in (vmax, (vmin + vmax) / 2, vmin)]
    bar_w, gap = 8, 3
    width = bar_w + gap + max(text_width(t, size) for t in labels) + 2
    height = max(height, 3 * (size + 2))
    canvas = Image.new("RGB", (width, height), (BG, BG, BG))
    ramp = lut(cmap)[np.linspace(255, 0, height).round().astype(np.int64)]          # top = high
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None], bar_w, 1))), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for text, y in zip(labels, (0, (height - size) // 2, height - size - 2)):
        draw.text((bar_w + gap, y), text, fill=(0, 0, 0), font=font(size))
    return np.asarray(canvas)


def with_colorbar(img: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """The picture with its colour bar on the right (3 white pixels between)."""
    bar = colorbar(vmin, vmax, img.shape[0], cmap)
    h = max(img.shape[0], bar.shape[0])
    out = np.full((h, img.shape[1] + 3 + bar.shape[1], 3), BG, np.uint8)
    out[:img.shape[0], :img.shape[1]] = img[..., :3]
    out[:bar.shape[0], img.shape[1] + 3:] = bar
    return out


def scaled_heat_tile(m: Any, tile: int = 128, cmap: str = "inferno", vmin=None, vmax=None,
                     smooth: bool = False) -> np.ndarray:
    """heat_tile with the colour bar of its scale beside it."""
    lo, hi = value_range(m, vmin, vmax)
    return with_colorbar(heat_tile(m, tile, cmap, lo, hi, smooth), lo, hi, cmap)


def draw_marker(img: np.ndarray, yx: tuple[float, float], colour=(0, 255, 255), size: int = 7) -> np.ndarray:
    """A cross at fractional position (y, x) in [0, 1]."""
    out = img.copy()
    h, w = out.shape[:2]
    y, x = int(min(h - 1, yx[0] * h)), int(min(w - 1, yx[1] * w))
    out[max(0, y - 1):y + 2, max(0, x - size):x + size + 1] = colour
    out[max(0, y - size):y + size + 1, max(0, x - 1):x + 2] = colour
    return out


def save_png(img: np.ndarray, path: str | Path, compress_level: int = 6) -> Path:
    """Write a uint8 picture as PNG (compress_level 1 is ~5x faster, for files written by the thousand)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(img[..., :3].astype(np.uint8))).save(path, format="PNG",
                                                                               compress_level=compress_level)
    return path


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a word or layer name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "token"
    return s[:limit]
