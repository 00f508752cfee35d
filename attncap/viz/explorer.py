"""The explorer: one offline HTML page to browse a store by word, step, layer, head and branch.

    attncap.explore(store, "page.html", image=image)        # or: attncap explore RUN [--out page.html]

The page is a single file: script, styles and data inline, nothing fetched. Maps are quantised to
uint8 (one float32 scale per displayed map), concatenated into one zlib blob and embedded as base64;
the page inflates it with the browser's DecompressionStream. What it holds:

    text maps    per (layer, step, branch): [G heads kept, Q query bins, W words] of the image->text
                 (video->text ...) records, a word being the mean of its tokens' columns (the maps
                 render and store.token_map draw), plus an "all layers" aggregate per (step, branch)
                 (analysis.aggregate: every layer resized to the largest grid, head mean).
                 Scale per (head, word): the column's max.
    self maps    per (layer, step, branch) of image->image records: [Q, K] head mean, scale per row
                 (the clicked query's row is what is drawn), plus an aggregate over those layers
                 (analysis.query_row at each query bin's centre of the largest grid).
    generation   language models (text queries over an image grid): per (layer, step) the row of the
                 token generated at that step, with the share of its attention that went to the image.

Quantisation error: a value v of a map with scale s comes back as round(255 v / s) s / 255, within
s / 510 of v. The page's test API (window.attncap, see explorer.js) reads these values back.
Size: pool= (query grids, and key grids of self maps, averaged in pool x pool cells), every= (every
n-th step, and the last), layers=, branch= and self_attention=False make a page smaller; a page over
max_mb raises ExplorerTooLarge naming what each option would save.
"""
from __future__ import annotations

import base64
import fnmatch
import io
import json
import math
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import analysis as A
from ..store import Record, Store, _resize
from .animate import generation_records
from .core import as_frames, as_rgb, lut, resize

ASSETS = Path(__file__).with_name("explorer_page")
ALL_LAYERS = "all layers"
MAX_WORDS = 48          # keys shown when the store has no word list (ranked by attention received)
MAX_IMAGE_SIDE = 768    # the embedded picture / video frames are downscaled to this (maps are coarser)
MAX_FRAMES = 96         # video frames embedded (evenly spaced)


class ExplorerTooLarge(ValueError):
    """The page would pass max_mb. ``options``: (option, value, MB the page would be with it) for each
    downsampling option that applies (MB None where it cannot be told in advance)."""

    def __init__(self, mb: float, limit: float, parts: dict[str, float],
                 options: list[tuple[str, Any, float | None]]) -> None:
        self.mb, self.limit, self.parts, self.options = mb, limit, parts, options
        super().__init__(self.advice())

    def advice(self, flags: dict[str, str] | None = None) -> str:
        """The message. ``flags`` spells each option for another interface: {option: "--flag {}"}
        (the CLI passes its flags), else Python's keyword arguments."""
        def spell(option: str, value: Any) -> str:
            if flags and option in flags:
                return flags[option].format(value)
            return f"{option}={value!r}" if value is not None else f"fewer {option} ({option}=[...])"

        parts = ", ".join(f"{k} {_mb(v)}" for k, v in self.parts.items() if v >= 0.005)
        opts = "; ".join(spell(o, v) + (f" (about {_mb(mb)})" if mb is not None else "") for o, v, mb in self.options)
        return (f"the explorer page would be {_mb(self.mb)} ({parts}), over the limit of {self.limit:g} MB. "
                f"Make it smaller with {opts}; or raise the limit with {spell('max_mb', math.ceil(self.mb))}")


def _mb(v: float) -> str:
    return f"{v:.0f} MB" if v >= 10 else f"{v:.1f} MB" if v >= 1 else f"{v:.2f} MB"


# ----------------------------------------------------------------------------------------------
# words
# ----------------------------------------------------------------------------------------------

def page_words(store: Store, recs: Sequence[Record]) -> list[dict]:
    """The word chips: every occurrence of each prompt word (its tokens merged), labelled "a", "a#2", ...;
    without a word list, the non-special keys (the MAX_WORDS most attended). Only keys every record holds."""
    a = A.alignment_of(store)
    words = [(w, list(idx)) for w, idx in a.words if any(ch.isalnum() for ch in w)]
    if not words:
        keys = [i for i, sp in enumerate(a.special) if not sp]
        if len(keys) > MAX_WORDS:
            scores = A.token_scores(store)
            keys = sorted(sorted(keys, key=lambda i: -float(torch.nan_to_num(scores[i], -1.0)))[:MAX_WORDS])
        words = [(a.labels[i], [i]) for i in keys]
    held = None
    for r in recs:
        have = set(r.meta.get("keys", ())) if r.kind == "tokens" else set(range(r.data.shape[-1]))
        held = have if held is None else held & have
    seen: dict[str, int] = {}
    out = []
    for w, idx in words:
        if held is not None and not set(idx) <= held:
            continue
        seen[w.lower()] = seen.get(w.lower(), 0) + 1
        occ = seen[w.lower()]
        out.append({"label": w if occ == 1 else f"{w}#{occ}", "text": w, "occurrence": occ, "keys": idx,
                    "pieces": [a.labels[i] for i in idx] if len(idx) > 1 else []})
    return out


def word_columns(r: Record, words: Sequence[dict], batch: int = 0) -> torch.Tensor:
    """[G, Q, W]: each word's mean over its keys' columns of a text record."""
    x = r.data[batch].float()
    cols = []
    for w in words:
        keys = [r.meta["keys"].index(k) for k in w["keys"]] if r.kind == "tokens" else w["keys"]
        cols.append(x[..., keys].mean(-1))
    return torch.stack(cols, -1)


# ----------------------------------------------------------------------------------------------
# pooling, quantisation, the blob
# ----------------------------------------------------------------------------------------------

def pool_axis(x: torch.Tensor, axis: int, grid: Sequence[int], factor: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Average ``axis`` (tokens row-major over grid (t,) h, w) in factor x factor cells of h, w; a cell
    at an uneven edge is the mean of the tokens it holds (as the store's pooled grids)."""
    grid = tuple(int(g) for g in grid)
    if factor <= 1 or len(grid) < 2:
        return x, grid
    h, w = grid[-2:]
    hw = (math.ceil(h / factor), math.ceil(w / factor))
    pad = (0, hw[1] * factor - w, 0, hw[0] * factor - h)
    y = x.movedim(axis, -1)
    lead = y.shape[:-1]
    y = F.pad(y.reshape(-1, h, w), pad)                    # [lead * t, h, w] padded with zeros
    count = F.pad(torch.ones(1, h, w, dtype=y.dtype), pad)
    cells = lambda a: a.reshape(a.shape[0], hw[0], factor, hw[1], factor).sum((2, 4))  # noqa: E731
    y = cells(y) / cells(count)
    return y.reshape(*lead, -1).movedim(-1, axis), grid[:-2] + hw


def quantise(x: torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 levels of x / max along ``axis`` and the float32 max (the scale) of each slice."""
    a = np.nan_to_num(x.detach().float().cpu().numpy(), nan=0.0).clip(0, None)
    scale = a.max(axis=axis, keepdims=True).astype(np.float32)
    q = np.round(a / np.where(scale > 0, scale, 1) * 255).astype(np.uint8)
    return q, np.squeeze(scale, axis)


class Blob:
    """Arrays laid end to end, each at a 4-byte aligned offset (Float32Array views need it)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.by_part: dict[str, int] = {}

    def add(self, arr: np.ndarray, part: str) -> int:
        pad = -self.size % 4
        if pad:
            self.parts.append(bytes(pad))
            self.size += pad
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
        offset = self.size
        self.parts.append(data)
        self.size += len(data)
        self.by_part[part] = self.by_part.get(part, 0) + len(data)
        return offset


# ----------------------------------------------------------------------------------------------
# the maps the page holds
# ----------------------------------------------------------------------------------------------

def _keep_steps(steps: Sequence[int], every: int) -> list[int]:
    steps = sorted(set(steps))
    return sorted(set(steps[::every]) | set(steps[-1:])) if every > 1 else steps


def _layer_ok(name: str, layers: Any) -> bool:
    if layers is None or layers == "all":
        return True
    pats = [layers] if isinstance(layers, str) else list(layers)
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in pats)


def _branches(recs: Sequence[Record], branch: str | None) -> list:
    have = list(dict.fromkeys(r.branch for r in recs))
    if branch is not None:
        if branch not in have:
            raise ValueError(f"branch={branch!r}: the store's records have branches {have}")
        return [branch]
    order = {"cond": 0, "uncond": 1}
    return sorted(have, key=lambda b: (order.get(b, 2), str(b)))


def _text_entries(store, recs, words, steps, branches, pool, blob) -> list[dict]:
    entries = []
    for r in recs:
        cols, grid = pool_axis(word_columns(r, words), 1, r.query_grid, pool)    # [G, Q, W]
        q, scale = quantise(cols, 1)
        heads = None if isinstance(r.heads, str) and cols.shape[0] == 1 else \
            (list(r.heads) if not isinstance(r.heads, str) else list(range(cols.shape[0])))
        entries.append({"layer": r.layer, "step": r.step, "branch": r.branch, "relation": r.relation,
                        "grid": list(grid), "heads": heads, "G": cols.shape[0], "Q": cols.shape[1], "W": len(words),
                        "data": blob.add(q, "text maps"), "scale": blob.add(scale, "text maps")})
    if len({r.layer for r in recs}) > 1:
        for b in branches:
            for s in steps:
                if not any(r.step == s and r.branch == b for r in recs):
                    continue
                agg = A.aggregate(store, None, recs[0].relation if len({r.relation for r in recs}) == 1 else None,
                                  [r.layer for r in recs], s, b)
                cols = torch.stack([agg.word([k for k in w["keys"]]) for w in words], -1)  # [*grid, W]
                cols, grid = pool_axis(cols.reshape(1, -1, len(words)), 1, agg.grid, pool)
                q, scale = quantise(cols, 1)
                entries.append({"layer": ALL_LAYERS, "step": s, "branch": b, "relation": recs[0].relation,
                                "grid": list(grid), "heads": None, "G": 1, "Q": cols.shape[1], "W": len(words),
                                "data": blob.add(q, "text maps"), "scale": blob.add(scale, "text maps")})
    return entries


def _self_entries(store, recs, steps, branches, pool, blob) -> list[dict]:
    entries = []
    rows = {}
    for r in recs:
        x, qgrid = pool_axis(A.query_maps(r, 0), 0, r.query_grid, pool)        # [Q, K]
        x, kgrid = pool_axis(x, 1, r.key_grid, pool)
        rows[r.layer, r.step, r.branch] = (x, qgrid, kgrid)
        q, scale = quantise(x, 1)
        entries.append({"layer": r.layer, "step": r.step, "branch": r.branch, "relation": r.relation,
                        "qgrid": list(qgrid), "kgrid": list(kgrid), "data": blob.add(q, "self-attention"),
                        "scale": blob.add(scale, "self-attention")})
    if len({r.layer for r in recs}) > 1:
        for b in branches:
            for s in steps:
                here = [v for (lay, st, br), v in rows.items() if st == s and br == b]
                if not here:
                    continue
                qg = max((v[1] for v in here), key=lambda g: (math.prod(g[-2:]), g))
                kg = max((v[2] for v in here), key=lambda g: (math.prod(g[-2:]), g))
                centres = [[(i + 0.5) / n for i, n in zip(idx, qg)] for idx in np.ndindex(*qg)]
                total = 0
                for x, g, k in here:   # the row of the bin holding each centre (nearest), keys resized
                    sel = x[[A.bin_of(c, g) for c in centres]]
                    total = total + (sel if tuple(k[-2:]) == tuple(kg[-2:]) else _resize(sel, 1, k, kg[-2:])[0])
                agg = total / len(here)
                q, scale = quantise(agg, 1)
                entries.append({"layer": ALL_LAYERS, "step": s, "branch": b, "relation": recs[0].relation,
                                "qgrid": list(qg), "kgrid": list(kg), "data": blob.add(q, "self-attention"),
                                "scale": blob.add(scale, "self-attention")})
    return entries


def _generation(store, recs, pool, blob) -> dict | None:
    if not recs:
        return None
    entries, by_step = [], {}
    for r in recs:
        row, grid = pool_axis(A.query_maps(r, 0)[-1], 0, r.key_grid, pool)      # the token generated at r.step
        by_step.setdefault((r.step, r.branch), []).append((row, grid))
        q, scale = quantise(row[None], 1)
        entries.append({"layer": r.layer, "step": r.step, "branch": r.branch, "kgrid": list(grid),
                        "mass": float(A.query_maps(r, 0)[-1].sum()),
                        "data": blob.add(q, "generation"), "scale": blob.add(scale, "generation")})
    if len({r.layer for r in recs}) > 1:
        for (s, b), rows in sorted(by_step.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            kg = max((g for _, g in rows), key=lambda g: (math.prod(g[-2:]), g))
            agg = sum(row if tuple(g) == tuple(kg) else _resize(row[None], 1, g, kg[-2:])[0][0] for row, g in rows)
            agg = agg / len(rows)
            masses = [e["mass"] for e in entries if e["step"] == s and e["branch"] == b]
            q, scale = quantise(agg[None], 1)
            entries.append({"layer": ALL_LAYERS, "step": s, "branch": b, "kgrid": list(kg),
                            "mass": float(np.mean(masses)), "data": blob.add(q, "generation"),
                            "scale": blob.add(scale, "generation")})
    steps = sorted({r.step for r in recs})
    tokens = list((store.tokens or {}).get("generated") or [])
    tokens += [f"<{s}>" for s in steps[len(tokens):]]
    layers = list(dict.fromkeys(r.layer for r in recs))
    return {"tokens": tokens[:len(steps)], "steps": steps, "relation": recs[0].relation,
            "layers": ([ALL_LAYERS] if len(layers) > 1 else []) + layers, "entries": entries}


# ----------------------------------------------------------------------------------------------
# pictures and the page
# ----------------------------------------------------------------------------------------------

def _data_url(img: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) > MAX_IMAGE_SIDE:
        k = MAX_IMAGE_SIDE / max(h, w)
        img = resize(img.astype(np.float32), (max(1, round(h * k)), max(1, round(w * k)))).round().clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img.astype(np.uint8))).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _pictures(image: Any, video: Any) -> dict:
    """The page's picture: {"image": data URL, "frames": [data URLs of video frames], "frameIndex":
    [the video frame each one is], "frameCount": frames in the video, "imageSize": [H, W]}."""
    if video is not None:
        frames = as_frames(video)
        idx = np.linspace(0, len(frames) - 1, min(len(frames), MAX_FRAMES)).round().astype(int)
        urls = [_data_url(frames[i], "JPEG") for i in idx]
        return {"image": urls[0], "frames": urls, "frameIndex": idx.tolist(), "frameCount": len(frames),
                "imageSize": list(frames.shape[1:3])}
    if image is not None:
        img = as_rgb(image)
        return {"image": _data_url(img), "frames": [], "imageSize": list(img.shape[:2])}
    return {"image": None, "frames": [], "imageSize": None}


def _too_large(mb: float, limit: float, blob: Blob, pictures: int, ratio: float, n_steps: int,
               n_branches: int, pool: int) -> ExplorerTooLarge:
    """The error, with what each option would leave (from the parts' sizes and the compression ratio)."""
    parts = {k: v * ratio * 4 / 3 / 2**20 for k, v in blob.by_part.items()}
    parts["pictures"] = pictures / 2**20
    text, self_ = parts.get("text maps", 0.0), parts.get("self-attention", 0.0)
    rest = mb - text - self_          # pictures, generation rows, the page itself: the options keep them
    options: list[tuple[str, Any, float | None]] = []
    if text + self_ > 0:
        for f in (2, 4, 8):           # text maps shrink with the query grid, self maps with both grids
            after = rest + text / f ** 2 + self_ / f ** 4
            if after <= limit or f == 8:
                options.append(("pool", pool * f, after))
                break
    if n_steps > 2:
        options.append(("every", 2, rest + (text + self_) / 2))
    if n_branches > 1:
        options.append(("branch", "cond", rest + (text + self_) / n_branches))
    if self_ > 0:
        options.append(("self_attention", False, mb - self_))
    options.append(("layers", None, None))
    return ExplorerTooLarge(mb, limit, parts, options)


def _text_records(store: Store, branch: str | None) -> list[Record]:
    """Text map records of every branch (analysis.text_records keeps only "cond" when not told)."""
    branches = [branch] if branch is not None else list(dict.fromkeys(r.branch for r in store.records))
    return [r for b in branches for r in A.text_records(store, None, branch=b) if r.branch == b]


def explore(store: Store, path: str | Path, image: Any = None, video: Any = None, *, title: str | None = None,
            pool: int = 1, every: int = 1, layers: Any = None, branch: str | None = None,
            self_attention: bool = True, max_mb: float = 25.0, meta: dict | None = None) -> Path:
    """Write the explorer page of ``store`` to ``path`` (one self-contained .html) and return the path.

    image: the generated picture (PIL, array, tensor or path) the maps are laid over; video: its frames
    (array, tensor or path), for video grids (t, h, w). pool: average each map's grid in pool x pool
    cells (self-attention: both grids); every: keep every n-th step (and the last); layers: glob or
    list of layer names; branch: one CFG branch ("cond"/"uncond") instead of all; self_attention:
    embed image->image maps (click a position); max_mb: refuse (ExplorerTooLarge) past this size;
    meta: extra {name: value} shown in the page's header (model, seed...).
    """
    for name, v in (("pool", pool), ("every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0:
        raise ValueError(f"max_mb must be a positive number of megabytes; got {max_mb!r}")
    if not isinstance(store, Store):
        raise TypeError(f"store must be an attncap Store (attncap.load(dir) reads a saved one); got {type(store).__name__}")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"path must end in .html; got {path.name!r}")

    have = list(dict.fromkeys(r.branch for r in store.records))
    if branch is not None and branch not in have:
        raise ValueError(f"branch={branch!r}: the store's records have branches {have}")
    pick = lambda rs: [r for r in rs if _layer_ok(r.layer, layers)]  # noqa: E731
    text = pick(_text_records(store, branch))
    spatial = pick([r for r in store.get(kind="map", branch=branch)
                    if r.query_grid is not None and r.key_grid is not None]) if self_attention else []
    gen = pick(generation_records(store, branch=branch))
    if not (text or spatial or gen):
        raise ValueError(f"nothing to explore: no text maps (image->text), self-attention (image->image) or "
                         f"generation (text->image) records{' match layers=' + repr(layers) if layers else ''}; "
                         f"the store has relations {sorted({r.relation for r in store.records})}")
    steps = _keep_steps([r.step for r in text + spatial], every)
    text = [r for r in text if r.step in steps]
    spatial = [r for r in spatial if r.step in steps]
    branches = _branches(text + spatial, branch) if text or spatial else []
    words = page_words(store, text) if text else []
    if text and not words:
        raise ValueError("the text maps hold no word of the prompt (captured with tokens=[...] of other keys?)")

    blob = Blob()
    text_entries = _text_entries(store, text, words, steps, branches, pool, blob) if text else []
    self_entries = _self_entries(store, spatial, steps, branches, pool, blob) if spatial else []
    generation = _generation(store, gen, pool, blob)
    pics = _pictures(image, video)
    pictures = sum(len(f) for f in pics["frames"]) if pics["frames"] else len(pics["image"] or "")
    raw = b"".join(blob.parts)
    fail = lambda mb, ratio: _too_large(mb, max_mb, blob, pictures, ratio, len(steps), len(branches), pool)  # noqa: E731
    if len(raw) > 64 * 2**20:  # refuse a far too large page from a sample before compressing all of it
        sample = b"".join(raw[i:i + 2**20] for i in range(0, len(raw), len(raw) // 16))
        ratio = len(zlib.compress(sample, 6)) / len(sample)
        if (len(raw) * ratio * 4 / 3 + pictures) / 2**20 > 1.2 * max_mb:
            raise fail((len(raw) * ratio * 4 / 3 + pictures) / 2**20, ratio)
    packed = base64.b64encode(zlib.compress(raw, 6)).decode()
    ts = {r.step: r.timestep for r in store.records}
    prompt = (store.tokens or {}).get("prompt")
    payload = {
        "title": title or ("attncap explorer: " + (prompt or "attention maps")), "prompt": prompt,
        "meta": {k: v for k, v in (meta or {}).items() if v is not None},
        **pics, "words": words,
        "steps": [{"step": s, "timestep": ts.get(s)} for s in steps], "branches": branches,
        "layers": ([ALL_LAYERS] if len({r.layer for r in text}) > 1 else []) + list(dict.fromkeys(r.layer for r in text)),
        "selfLayers": ([ALL_LAYERS] if len({r.layer for r in spatial}) > 1 else [])
        + list(dict.fromkeys(r.layer for r in spatial)),
        "text": text_entries, "self": self_entries, "generation": generation, "pool": pool,
        "lut": lut("inferno").tolist(), "blobBytes": len(raw),
    }
    html = _page(json.dumps(payload, separators=(",", ":"), default=_json_default), packed)
    mb = len(html) / 2**20
    if mb > max_mb:
        raise fail(mb, len(packed) * 3 / 4 / max(1, len(raw)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _page(payload: str, blob: str) -> str:
    """The page template with its script, styles and data put inline ("</" escaped in the JSON)."""
    template = (ASSETS / "page.html").read_text(encoding="utf-8")
    parts = {"/*@CSS@*/": (ASSETS / "explorer.css").read_text(encoding="utf-8"),
             "/*@JS@*/": (ASSETS / "explorer.js").read_text(encoding="utf-8"),
             "@DATA@": payload.replace("</", "<\\/"), "@BLOB@": blob}
    for key, value in parts.items():
        template = template.replace(key, value, 1)
    return template
