"""render_all: everything a person wants to look at from one store, written to one folder.

    out/
      tree/<layer>/<relation>-<kind>/step_007.{npy,png}   every record's picture and its numbers
      words/<word>.{png,npy}, words/<word>_overlay.png     each word aggregated over layers and steps
      token_heatmaps.png    a tile per word (+ overlays on the image)
      montage_<word>.png    layers x steps
      evolution.gif/.mp4    the words' maps step by step
      masks/<word>.{png,npy}  LEDITS++-style bool masks at image (else map) resolution
      self_attention.png    query points' self-attention (image->image records)
      heads_<word>.png      per-head tiles (heads="all" records)
      groups.png            part-wise view of named token groups (groups=)
      video_<word>.mp4/.gif the word's map over the video's frames (video records + video=)
      generation.mp4/.gif   language models: one frame per generated token
      explorer.html         the interactive offline page (viz.explorer.explore)
      importance.png, stats.json, report.md, report.html

Used by ``attncap run``, ``attncap render DIR`` and the demo. A view that cannot be drawn from
this store (no such records) is left out; a view that fails is noted in the report, not fatal.
"""
from __future__ import annotations

import json
import math
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import analysis as A
from . import viz
from .report import collect_stats, write_report
from .store import Store
from .viz.core import as_frames, as_rgb, safe_name, save_png, scaled_heat_tile, short_layer, strip


def _dir_name(text: str) -> str:
    return safe_name(text.replace("->", "_to_"), 120)


def _tree_title(r) -> str:
    """'down1.a0.t0.attn2 · image->text map · step 3 (t = 667) · cond · head mean'."""
    heads = "head mean" if r.heads == "mean" else "mean of heads " + ",".join(map(str, r.heads)) \
        if not isinstance(r.heads, str) else "mean of all heads"
    return " · ".join([short_layer(r.layer), f"{r.relation} {r.kind}",
                       f"step {r.step}" + (f" (t = {r.timestep:.4g})" if r.timestep is not None else "")]
                      + ([r.branch] if r.branch else []) + [heads])


def render_tree(store: Store, out_dir: str | Path, words: list[tuple[str, list[int]]], branch: str | None = None,
                batch: int = 0, tile: int = 96, progress: bool = True) -> list[Path]:
    """tree/<layer>/<relation>-<kind>/step_NNN[_<branch>].{npy,png}: per record, the picture and its
    numbers. Text maps: npy [words, *grid] (one map per word) and a strip of tiles; self-attention:
    attention received per position; entropy / peak / colsum: the spatial map."""
    from tqdm.auto import tqdm

    from .viz.figures import record_map

    recs = store.get(kind=None, branch=None if branch == "all" else branch)
    if branch is None and any(r.branch == "cond" for r in recs):
        recs = [r for r in recs if r.branch in ("cond", None)]
    root = Path(out_dir) / "tree"
    paths = []
    for r in tqdm(recs, desc="attncap: tree", leave=False, disable=not progress):
        is_text = r.key_grid is None and r.query_grid is not None and r.kind in ("map", "tokens")
        if is_text:
            if not words:
                continue
            maps = [record_map(r, keys, batch) for _, keys in words]
            kept = [(lab, m) for (lab, _), m in zip(words, maps) if m is not None]
            if not kept:
                continue
            arr = np.stack([m.numpy() for _, m in kept])
            flat = [m if m.dim() == 2 else m.mean(0) for _, m in kept]
            pic = strip([scaled_heat_tile(m, tile) for m in flat], [lab for lab, _ in kept], title=_tree_title(r))
        else:
            m = record_map(r, None, batch)
            if m is None:
                continue
            arr = m.numpy()
            what = {"map": "attention received per position", "colsum": "attention received per key"}.get(r.kind, r.kind)
            pic = strip([scaled_heat_tile(m if m.dim() == 2 else m.mean(0), tile)], [what], title=_tree_title(r))
        d = root / _dir_name(r.layer) / _dir_name(f"{r.relation}-{r.kind}")
        d.mkdir(parents=True, exist_ok=True)
        stem = f"step_{r.step:03d}" + (f"_{r.branch}" if r.branch not in (None, "cond") else "")
        np.save(d / f"{stem}.npy", arr.astype(np.float32))
        paths += [d / f"{stem}.npy", save_png(pic, d / f"{stem}.png", compress_level=1)]
    return paths


def render_all(store: Store, out_dir: str | Path, image: Any = None, words: Any = None, video: Any = None, *,
               relation: str | None = None, branch: str | None = None, groups: dict | None = None,
               generated: Sequence[str] | None = None, tree: bool = True, report: bool = True, fps: float = 3.0,
               mask_quantile: float = 0.9, mask_sigma: float = 1.0, animations: Sequence[str] = ("gif", "mp4"),
               meta: dict | None = None, explorer_page: bool = True, progress: bool = True) -> list[Path]:
    """Write every view of ``store`` that its records support into out_dir (see the module doc) and
    return the paths written. image: the generated picture (PIL, array, tensor or path); video: its
    frames or a path; words: words / key indices to draw (default: the prompt's words from
    store.tokens, else the most attended tokens); groups: {name: [words]} for the part-wise view;
    generated: the generated tokens of a language model (default store.tokens["generated"]);
    explorer_page: write explorer.html (viz.explorer; a page over its size limit is a note in the report)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = None if video is None else as_frames(video)
    img = as_rgb(image) if image is not None else (frames[0] if frames is not None else None)
    paths: list[Path] = []
    figures: list[tuple[str, Path]] = []
    notes: list[str] = []
    sel = dict(relation=relation, branch=branch)

    text = A.text_records(store, relation, branch=branch)
    chosen = viz.resolve_words(store, words) if text else []
    if text and text[0].kind == "tokens":  # captured with tokens=[...]: only those keys exist
        kept = set.intersection(*(set(r.meta.get("keys", ())) for r in text))
        dropped = [lab for lab, keys in chosen if not set(keys) <= kept]
        chosen = [(lab, keys) for lab, keys in chosen if set(keys) <= kept]
        if dropped:
            notes.append(f"not captured (tokens=): {', '.join(dropped)}")
        if not chosen:
            labels = A.alignment_of(store).fit(max(kept) + 1).labels if kept else []
            chosen = [(labels[k], [k]) for k in sorted(kept)]
    if text and not chosen:
        notes.append("no words to draw: the store has no tokens and no text map records to rank")
    spatial = A.spatial_records(store, relation, branch=branch)
    heads = [r for r in store.records if r.heads != "mean" and r.kind == "map" and r.query_grid is not None]
    # language-model records: text queries over an image grid, steps are generated tokens (no timestep);
    # a diffusion model's text->image block (Flux, SD3) has timesteps and is left to the tree.
    gen = [r for r in viz.animate.generation_records(store, relation, branch=branch)
           if r.timestep is None or generated is not None or "generated" in (store.tokens or {})]
    steps = sorted({r.step for r in text})

    def attempt(name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # a view that fails must not cost the others
            notes.append(f"{name} skipped: {type(e).__name__}: {e}")
            warnings.warn(f"attncap render: {name} failed: {e}\n{traceback.format_exc(limit=3)}")

    jobs = []
    if tree:
        jobs.append(("tree", lambda: paths.extend(render_tree(store, out, chosen, branch, progress=progress))))

    def words_views():
        agg = A.aggregate(store, None, relation, branch=branch)
        for lab, keys in chosen:
            m = agg.word(keys)
            name = safe_name(lab.split(" (")[0])
            (out / "words").mkdir(exist_ok=True)
            np.save(out / "words" / f"{name}.npy", m.numpy().astype(np.float32))
            paths.append(out / "words" / f"{name}.npy")
            flat = m if m.dim() == 2 else m.mean(0)
            paths.append(save_png(scaled_heat_tile(flat, 256), out / "words" / f"{name}.png"))
            if img is not None:
                paths.append(save_png(viz.overlay(img, flat), out / "words" / f"{name}_overlay.png"))
        p = out / "token_heatmaps.png"
        viz.token_heatmaps(store, chosen, image=img, path=p, **sel)
        paths.append(p)
        figures.append(("Attention per word", p))

    def montages():
        for lab, keys in chosen[:6]:
            p = out / f"montage_{safe_name(lab.split(' (')[0])}.png"
            viz.montage(store, (lab, keys), path=p, **sel)
            paths.append(p)
            figures.append((f"Layers x steps: {lab}", p))

    def evolution():
        ps = [out / f"evolution.{ext}" for ext in animations]
        written = viz.evolution_animation(store, ps, chosen, image=img, fps=fps, progress=progress, **sel)
        paths.extend(written)
        for p in written:
            figures.append(("Evolution over denoising steps" + (" (MP4)" if p.suffix == ".mp4" else ""), p))
        if len(written) < len(ps):
            notes.append("MP4 not written: ffmpeg (imageio-ffmpeg) is not available")

    def masks():
        pic, found = viz.masks_view(store, chosen, image=img, quantile=mask_quantile, sigma=mask_sigma, **sel)
        (out / "masks").mkdir(exist_ok=True)
        for lab, m in found.items():
            name = safe_name(lab.split(" (")[0])
            np.save(out / "masks" / f"{name}.npy", m.numpy())
            flat = (m if m.dim() == 2 else m.any(0)).numpy()
            paths.extend([out / "masks" / f"{name}.npy",
                          save_png(np.repeat((flat * 255).astype(np.uint8)[..., None], 3, -1), out / "masks" / f"{name}.png")])
        paths.append(save_png(pic, out / "masks.png"))
        figures.append(("Masks", out / "masks.png"))

    def self_attention():
        p = out / "self_attention.png"
        viz.self_attention(store, image=img, path=p, branch=branch)
        paths.append(p)
        figures.append(("Self-attention of query points", p))

    def head_views():
        text_heads = [r for r in heads if r.key_grid is None]
        if text_heads and chosen:
            for lab, keys in chosen[:4]:
                p = out / f"heads_{safe_name(lab.split(' (')[0])}.png"
                viz.head_grid(store, (lab, keys), path=p, image=img, branch=branch)
                paths.append(p)
                figures.append((f"Heads: {lab}", p))
        if any(r.key_grid is not None for r in heads):
            p = out / "heads_self_attention.png"
            viz.head_grid(store, point=(0.5, 0.5), path=p, image=img, branch=branch,
                          relation=next(r.relation for r in heads if r.key_grid is not None))
            paths.append(p)
            figures.append(("Heads: self-attention of the centre", p))

    def group_view():
        p = out / "groups.png"
        viz.groups_view(store, groups, path=p, image=img, **sel)
        paths.append(p)
        figures.append(("Token groups", p))

    def video_views():
        for lab, keys in chosen[:4]:
            ps = [out / f"video_{safe_name(lab.split(' (')[0])}.{ext}" for ext in animations]
            written = viz.video_word_animation(store, keys, frames, ps, fps=8, **sel)
            paths.extend(written)
            figures.extend((f"Over the video: {lab}", p) for p in written if p.suffix == ".gif")

    def generation():
        ps = [out / f"generation.{ext}" for ext in animations]
        written = viz.generation_view(store, ps, tokens=generated, image=img, branch=branch)
        paths.extend(written)
        figures.extend(("Generation view", p) for p in written)

    def explorer():
        p = viz.explorer.explore(store, out / "explorer.html", image=img if frames is None else None, video=frames,
                                 branch=branch, meta=meta)
        paths.append(p)
        figures.insert(0, ("Interactive explorer (word, step, layer, head, branch; hover and click)", p))

    def importance_chart():
        st, scores = A.importance_by_step(store, relation, branch=branch)
        top = [t.index for t in A.token_importance(store, relation, branch=branch, top=6)]
        labels = A.alignment_of(store).fit(scores.shape[1]).labels
        p = out / "importance.png"
        viz.stats_chart(st, {f"{labels[i]} [{i}]": [float(v) for v in scores[:, i]] for i in top}, path=p,
                        title="attention received by the top tokens, per step")
        paths.append(p)
        figures.append(("Token importance over steps", p))

    if chosen:
        jobs += [("word maps", words_views), ("montages", montages), ("masks", masks)]
        if len(steps) > 1 and animations:
            jobs.append(("evolution", evolution))
        jobs.append(("importance chart", importance_chart))
        if frames is not None and any(r.query_grid is not None and len(r.query_grid) == 3 for r in text):
            jobs.append(("video overlays", video_views))
    if spatial:
        jobs.append(("self-attention", self_attention))
    if heads:
        jobs.append(("heads", head_views))
    if groups and text:
        jobs.append(("groups", group_view))
    if gen and animations:
        jobs.append(("generation view", generation))

    if explorer_page and (text or spatial or gen):
        jobs.append(("explorer", explorer))

    for name, fn in tqdm(jobs, desc="attncap: render", disable=not progress):
        attempt(name, fn)

    stats = collect_stats(store)
    (out / "stats.json").write_text(json.dumps(stats, indent=1, default=lambda o: None if isinstance(o, float)
                                               and math.isnan(o) else str(o)))
    paths.append(out / "stats.json")
    if report:
        paths += write_report(out, store, figures, meta=meta, notes=notes, stats=stats)
    return paths
