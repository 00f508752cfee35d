"""Still pictures of a store: per-token heatmaps and overlays, head grids, layer x step montages,
the self-attention of query points, token groups, and the picture of a single record.

Each function returns the picture (uint8 [H, W, 3]) and writes it as PNG when ``path`` is given.
Words are prompt words, phrases, key indices or lists of indices (see attncap.analysis.keys_of).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import analysis as A
from ..prompts import split_words
from ..store import Record, Store
from .core import (as_rgb, colorbar, draw_marker, fit, grid, heat_tile, legend, overlay, resize, save_png, scaled_heat_tile,
                   short_layer, strip, tile_shape, value_range, with_colorbar)

GROUP_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def _out(img: np.ndarray, path) -> np.ndarray:
    if path is not None:
        save_png(img, path)
    return img


def _selection(recs: Sequence[Record]) -> str:
    """'image->text, mean of 7 layers x 12 steps (0-11), heads averaged': what a picture aggregates."""
    if not recs:
        return "no records"
    layers = list(dict.fromkeys(r.layer for r in recs))
    steps = sorted({r.step for r in recs})
    rels = ", ".join(dict.fromkeys(r.relation for r in recs))
    where = short_layer(layers[0]) if len(layers) == 1 else f"mean of {len(layers)} layers"
    when = f"step {steps[0]}" if len(steps) == 1 else f"{len(steps)} steps ({steps[0]}-{steps[-1]})"
    branch = {r.branch for r in recs} - {None}
    return f"{rels}, {where} x {when}" + (f", {'/'.join(sorted(branch))}" if branch else "") + ", heads averaged"


def _is_pair(w: Any) -> bool:
    return isinstance(w, tuple) and len(w) == 2 and isinstance(w[0], str) and not isinstance(w[1], (str, int))


def one_word(store: Store, word: Any) -> tuple[str, list[int]]:
    """(label, key positions) of one word, index, list of indices or (label, keys) pair."""
    return resolve_words(store, [word])[0]


def resolve_words(store: Store, words: Any = None, limit: int = 12) -> list[tuple[str, list[int]]]:
    """[(label, key positions)] for the words to draw. words None: the prompt's words (from
    store.tokens), else the top tokens by attention received. A string is split into words."""
    a = A.alignment_of(store)
    if words is None:
        out, seen = [], set()
        for w, idx in a.words:
            if w.lower() in seen or not any(ch.isalnum() for ch in w):
                continue
            seen.add(w.lower())
            out.append((a.label_of(w), list(idx)))
        if out:
            return out[:limit]
        try:
            return [(f"{t.index}:{t.label}" if t.label != str(t.index) else t.label, [t.index])
                    for t in A.token_importance(store, top=min(limit, 6))]
        except ValueError:
            return []
    if isinstance(words, str):
        words = [w for w, _, _ in split_words(words) if any(ch.isalnum() for ch in w)]
    elif isinstance(words, int) or _is_pair(words):
        words = [words]
    out = []
    for w in words:
        if _is_pair(w):  # already resolved: (label, keys)
            out.append((str(w[0]), [int(k) for k in w[1]]))
            continue
        keys = A.keys_of(store, w)
        label = a.label_of(w) if store.tokens else (w if isinstance(w, str) else str(w))
        out.append((label, keys))
    return out


def token_heatmaps(store: Store, words: Any = None, image: Any = None, path: str | Path | None = None,
                   size: tuple[int, int] | None = None, relation: str | None = None, layer=None, step=None,
                   branch: str | None = None, batch: int = 0, tile: int = 160, cmap: str = "inferno",
                   shared_scale: bool = False, title: str | None = None) -> np.ndarray:
    """One heatmap per word (aggregated over the selected layers and steps), labelled with the word
    and its token pieces; with ``image`` a second row of overlays on the generated image."""
    agg = A.aggregate(store, size, relation, layer, step, branch, batch)
    chosen = resolve_words(store, words)
    if not chosen:
        raise ValueError("no words to draw: pass words=[...] or key indices")
    maps = [agg.word(k) for _, k in chosen]
    vmax = float(max(m.max() for m in maps)) if shared_scale else None
    vmin = 0.0 if shared_scale else None
    first = [m if m.dim() == 2 else m.mean(0) for m in maps]  # video maps: mean over time
    scales = [value_range(m, vmin, vmax) for m in first]
    rows = [[scaled_heat_tile(m, tile, cmap, lo, hi) for m, (lo, hi) in zip(first, scales)]]
    labels = [[lab for lab, _ in chosen]]
    if image is not None:
        img = fit(image, tile)
        rows.append([with_colorbar(overlay(img, m, cmap=cmap, vmin=lo, vmax=hi), lo, hi, cmap)
                     for m, (lo, hi) in zip(first, scales)])
        labels.append(["" for _ in chosen])
    title = title or f"attention to each word: {_selection(A.text_records(store, relation, layer, step, branch))}"
    return _out(grid(rows, labels, title=title), path)


def word_overlay(store: Store, word: Any, image: Any, path=None, alpha: float = 0.6, cmap: str = "inferno",
                 **select) -> np.ndarray:
    """The word's aggregated map over the full-size image (no labels: exactly the image's size)."""
    m = A.word_map(store, word, **select)
    return _out(overlay(image, m if m.dim() == 2 else m.mean(0), alpha, cmap), path)


def head_grid(store: Store, word: Any = None, point: Sequence[float] | None = None, path=None, layer=None, step=None,
              relation: str | None = None, branch: str | None = None, batch: int = 0, image: Any = None,
              tile: int = 128, cmap: str = "inferno", ncols: int = 8) -> np.ndarray:
    """One tile per kept head (records captured with heads="all" or a list): the word's map for text
    relations, the attention of the query at ``point`` for self-attention ones."""
    recs = [r for r in store.get(layer=layer, step=step, relation=relation, kind="map", branch=branch)
            if r.heads != "mean" and r.query_grid is not None]
    recs = A.cond_first(recs, branch)
    if word is not None or point is None:
        text = [r for r in recs if r.key_grid is None]
        recs = text or recs
    if not recs:
        raise ValueError("no per-head map records match (capture with heads='all' or a list of heads)")
    heads = recs[0].heads if not isinstance(recs[0].heads, str) else tuple(range(recs[0].data.shape[1]))
    recs = [r for r in recs if r.data.shape[1] == len(heads) and r.query_grid == recs[0].query_grid
            and r.key_grid == recs[0].key_grid]
    data = torch.stack([r.data[batch].float() for r in recs]).mean(0)  # [G, Qb, K]
    r0 = recs[0]
    if r0.key_grid is None:
        if word is None:
            top = A.token_importance(store, layer=layer, step=step)[0]
            word = (top.label, [top.index])
        what, keys = one_word(store, word)
        maps = data[..., keys].mean(-1).reshape(len(heads), *r0.query_grid)
    else:
        point = point or (0.5, 0.5)
        maps = data[:, A.bin_of(point, r0.query_grid)].reshape(len(heads), *r0.key_grid)
        what = f"query at {tuple(round(p, 2) for p in point)}"
    maps = maps if maps.dim() == 3 else maps.mean(1)
    tiles = [heat_tile(m, tile, cmap) if image is None else overlay(fit(image, tile), m, cmap=cmap) for m in maps]
    if point is not None and r0.key_grid is not None:
        tiles = [draw_marker(t, point[-2:]) for t in tiles]
    tiles = [with_colorbar(t, *value_range(m), cmap) for t, m in zip(tiles, maps)]
    steps = sorted({r.step for r in recs})
    when = f"step {steps[0]}" if len(steps) == 1 else f"mean of steps {steps[0]}-{steps[-1]}"
    title = f"{short_layer(r0.layer)} {r0.relation}: {what}, per head, {when}"
    return _out(strip(tiles, [f"head {h}" for h in heads], ncols, title), path)


def record_map(r: Record, keys: Sequence[int] | None = None, batch: int = 0) -> torch.Tensor | None:
    """The 2D (or t, h, w) picture of one record: the mean over ``keys`` of a text map, attention
    received per key of a self-attention map, a spatial statistic (entropy, peak, colsum); None when
    the record has no spatial axis."""
    x = r.data[batch].float().mean(0)
    if r.kind == "map" and r.query_grid is not None and r.key_grid is None:
        return None if keys is None else x[:, list(keys)].mean(-1).reshape(r.query_grid)
    if r.kind == "tokens" and r.query_grid is not None:
        cols = [r.meta["keys"].index(k) for k in (keys or r.meta["keys"]) if k in r.meta["keys"]]
        return x[:, cols].mean(-1).reshape(r.query_grid) if cols else None
    if r.kind == "map" and r.key_grid is not None:
        return x.mean(0).reshape(r.key_grid)
    if r.kind == "map" and r.query_grid is None and r.key_grid is not None:
        return x.mean(0).reshape(r.key_grid)
    if r.kind in ("entropy", "peak") and r.query_grid is not None:
        return x.reshape(r.query_grid)
    if r.kind == "colsum" and r.key_grid is not None:
        return x.reshape(r.key_grid)
    if r.kind == "rows" and r.key_grid is not None:
        return x.mean(0).reshape(r.key_grid)
    return None


def montage(store: Store, word: Any = None, path=None, relation: str | None = None, branch: str | None = None,
            batch: int = 0, tile: int = 96, max_steps: int = 10, max_layers: int = 32, image: Any = None,
            cmap: str = "inferno") -> np.ndarray:
    """Layers (rows) x steps (columns) of a word's map; without text records, the attention each
    position receives in the self-attention records."""
    recs = A.text_records(store, relation, None, None, branch)
    keys = None
    if recs:
        if word is None:
            top = A.token_importance(store, relation, branch=branch)[0]
            word = (top.label, [top.index])
        what, keys = one_word(store, word)
    else:
        recs = A.spatial_records(store, relation, None, None, branch)
        what = "attention received per position"
    if not recs:
        raise ValueError("no records with a spatial axis to montage")
    layers = list(dict.fromkeys(r.layer for r in recs))[:max_layers]
    steps = sorted({r.step for r in recs})
    if len(steps) > max_steps:
        steps = [steps[round(i * (len(steps) - 1) / (max_steps - 1))] for i in range(max_steps)]
    total = len({r.step for r in recs})
    by = {(r.layer, r.step): r for r in recs}
    img = None if image is None else as_rgb(image)
    maps = {}
    for layer in layers:
        for s in steps:
            r = by.get((layer, s))
            m = None if r is None else record_map(r, keys, batch)
            if m is not None:
                maps[layer, s] = m if m.dim() == 2 else m.mean(0)
    if not maps:
        raise ValueError("no records with a spatial axis to montage")
    # one colour scale for every tile, so a weak layer or an early step looks weak
    lo, hi = 0.0, max(float(m.max()) for m in maps.values())
    rows = []
    for layer in layers:
        row = []
        for s in steps:
            m = maps.get((layer, s))
            row.append(None if m is None else heat_tile(m, tile, cmap, lo, hi) if img is None else
                       overlay(fit(img, tile), m, cmap=cmap, vmin=lo, vmax=hi))
        rows.append(row)
    rows[0].append(colorbar(lo, hi, tile, cmap))
    shown = f"steps {', '.join(map(str, steps))}" + (f" ({len(steps)} of {total})" if len(steps) < total else "")
    title = f"{what}: layers x steps ({recs[0].relation}, heads averaged; {shown}; one colour scale)"
    return _out(grid(rows, col_labels=[f"step {s}" for s in steps] + [""], row_labels=[short_layer(x) for x in layers],
                     title=title), path)



def self_attention(store: Store, points: Sequence[Sequence[float]] | None = None, path=None, image: Any = None,
                   size=None, relation: str | None = None, layer=None, step=None, branch: str | None = None,
                   batch: int = 0, tile: int = 160, cmap: str = "inferno") -> np.ndarray:
    """Where chosen query points attend in the self-attention records (pooled maps work: a point
    falls in its bin). points: (y, x) fractions of the image; default the four quadrant centres."""
    points = points or [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]
    tiles, labels = [], []
    for p in points:
        m = A.query_row(store, p, size, relation, layer, step, branch, batch)
        m = m if m.dim() == 2 else m.mean(0)
        t = heat_tile(m, tile, cmap) if image is None else overlay(fit(image, tile), m, cmap=cmap)
        tiles.append(with_colorbar(draw_marker(t, p[-2:]), *value_range(m), cmap))
        labels.append(f"query ({p[-2]:.2f}, {p[-1]:.2f})")
    recs = A.spatial_records(store, relation, layer, step, branch)
    return _out(strip(tiles, labels, title=f"where each query point attends: {_selection(recs)}"), path)


def groups_view(store: Store, groups: dict[str, Sequence[Any]], path=None, image: Any = None, size=None,
                relation: str | None = None, layer=None, step=None, branch: str | None = None, batch: int = 0,
                tile: int = 160, cmap: str = "inferno", alpha: float = 0.55) -> np.ndarray:
    """Part-wise view: one map per named group of words / token indices, and a segmentation that
    colours every position by the group attending to it most (over the image when given)."""
    maps = A.group_maps(store, groups, size, relation, layer, step, branch, batch)
    names = list(maps)
    stack = torch.stack([m if m.dim() == 2 else m.mean(0) for m in maps.values()])
    # normalise each group's map to its own range, so a weak word still claims its region
    lo = stack.flatten(1).min(1).values[:, None, None]
    hi = stack.flatten(1).max(1).values[:, None, None]
    owner = ((stack - lo) / (hi - lo).clamp_min(1e-12)).argmax(0).numpy()
    seg = GROUP_COLOURS[owner % len(GROUP_COLOURS)].astype(np.float32)
    if image is None:
        seg = resize(seg, tile_shape(owner.shape, tile), "nearest").astype(np.uint8)
    else:
        base = fit(image, tile).astype(np.float32)
        seg = resize(seg, base.shape[:2], "nearest")
        seg = (base * (1 - alpha) + seg * alpha).round().astype(np.uint8)
    tiles = [heat_tile(m, tile, cmap) if image is None else overlay(fit(image, tile), m, cmap=cmap) for m in stack]
    key = legend(names, [GROUP_COLOURS[i % len(GROUP_COLOURS)] for i in range(len(names))], seg.shape[1])
    cells = [tiles + [seg], [None] * len(tiles) + [key]]
    labels = [names + ["parts (argmax)"], [""] * (len(names) + 1)]
    return _out(grid(cells, labels, title="token groups"), path)


def masks_view(store: Store, words: Any = None, image: Any = None, path=None, size=None, quantile: float = 0.9,
               sigma: float = 1.0, relation: str | None = None, layer=None, step=None, branch: str | None = None,
               batch: int = 0, tile: int = 160) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """LEDITS++-style masks of each word (analysis.word_mask) at ``size`` (default: the image's size,
    else the map's): the picture (the image where the mask is set, darkened elsewhere; white on
    black without an image) and {label: bool mask}."""
    img = None if image is None else as_rgb(image)
    size = size or (img.shape[:2] if img is not None else None)
    tiles, labels, masks = [], [], {}
    for lab, keys in resolve_words(store, words):
        m = A.word_mask(store, keys, size, quantile, sigma, relation, layer, step, branch, batch)
        masks[lab] = m
        flat = (m if m.dim() == 2 else m.any(0)).numpy()
        pic = np.repeat((flat * 255).astype(np.uint8)[..., None], 3, -1)
        if img is not None and flat.shape == img.shape[:2]:
            pic = np.where(flat[..., None], img, (img * 0.25).astype(np.uint8))
        tiles.append(fit(pic, tile))
        labels.append(lab)
    title = f"LEDITS++ masks (top {100 * (1 - quantile):.0f}%, sigma {sigma})"
    return _out(strip(tiles, labels, title=title), path), masks


def stats_chart(steps: Sequence[int], series: dict[str, Sequence[float]], path=None, title: str = "",
                ylabel: str = "attention received") -> np.ndarray:
    """A line chart (matplotlib, Agg canvas): one line per series over steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for name, ys in series.items():
        ax.plot(list(steps), list(ys), marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if series:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return _out(img, path)


__all__ = ["resolve_words", "token_heatmaps", "word_overlay", "head_grid", "record_map", "montage",
           "self_attention", "groups_view", "masks_view", "stats_chart"]
