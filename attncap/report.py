"""A report of one store: markdown and HTML with the figures and the statistics tables.

    write_report(out_dir, store, figures=[("Token heatmaps", out_dir / "token_heatmaps.png"), ...],
                 meta={"prompt": ..., "model": ...})   # -> [report.md, report.html]

Tables: per (layer, relation) entropy, sparsity, peak, mass, top token (analysis.layer_stats);
token importance (the text tokens receiving the most attention); the top token at each step.
Figure paths are written relative to out_dir, so the folder can be moved as a whole.
"""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from . import analysis as A
from .store import Store

STAT_COLUMNS = [("layer", "layer"), ("relation", "relation"), ("grid", "grid"), ("steps", "steps"),
                ("entropy", "entropy (nats)"), ("sparsity", "sparsity (Gini)"), ("peak", "peak"),
                ("mass", "mass"), ("top_token", "top token")]


def replace_section(path: str | Path, section: str) -> Path:
    """Put a markdown section (text starting with its "## " heading line) into the file at ``path``:
    it replaces the section with the same heading, up to the next "## " heading, or is appended.
    Lets several scripts own one section each of a shared file such as benchmarks/RESULTS.md."""
    path = Path(path)
    heading = section.splitlines()[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with its '## ' heading line; got {heading!r}")
    text = path.read_text() if path.exists() else ""
    if text.startswith(heading + "\n"):
        start = 0
    else:
        found = text.find("\n" + heading + "\n")
        start = found + 1 if found >= 0 else -1
    body = section.rstrip("\n") + "\n"
    if start < 0:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + body
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + body + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return "-" if v is None else str(v)


def collect_stats(store: Store, top: int = 10) -> dict:
    """The numbers the report shows, as JSON-able data: layers, importance, top token per step."""
    out: dict = {"records": len(store), "layers": len({r.layer for r in store}),
                 "steps": sorted({r.step for r in store}), "relations": sorted({r.relation for r in store}),
                 "kinds": sorted({r.kind for r in store}), "layer_stats": A.layer_stats(store)}
    try:
        out["importance"] = [vars(t) for t in A.token_importance(store, top=top)]
        out["top_by_step"] = [{"step": s, **vars(t)} for s, t in A.top_token_by_step(store)]
    except ValueError:
        out["importance"], out["top_by_step"] = [], []
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = lambda s: _fmt(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stats_table(rows: Sequence[dict]) -> str:
    """The per-layer statistics as a markdown table (one row per (layer, relation))."""
    return _md_table([h for _, h in STAT_COLUMNS], [[r.get(k) for k, _ in STAT_COLUMNS] for r in rows])


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _sections(stats: dict) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    out = [("Statistics per layer",
            "Entropy: mean over queries of the entropy of each query's attention row (exact over all keys where "
            "captured with stats=('entropy',), else over the relation's key block). Sparsity: mean Gini "
            "coefficient of the rows (0 uniform, 1 one key). Peak: mean largest probability. Mass: mean "
            "attention the queries give the relation's keys (1 for cross-attention). Top token: the key "
            "receiving the most attention (special tokens left out).",
            [h for _, h in STAT_COLUMNS], [[r.get(k) for k, _ in STAT_COLUMNS] for r in stats["layer_stats"]])]
    if stats["importance"]:
        out.append(("Token importance", "Mean attention each text token receives, over queries, heads, layers and steps.",
                    ["rank", "token", "key index", "score"],
                    [[i + 1, t["label"], t["index"], t["score"]] for i, t in enumerate(stats["importance"])]))
    if stats["top_by_step"]:
        out.append(("Top token at each step", "", ["step", "token", "key index", "score"],
                    [[t["step"], t["label"], t["index"], t["score"]] for t in stats["top_by_step"]]))
    return out


def write_report(out_dir: str | Path, store: Store, figures: Sequence[tuple[str, str | Path]] = (),
                 meta: dict | None = None, notes: Sequence[str] = (), stats: dict | None = None,
                 title: str = "attncap report") -> list[Path]:
    """Write report.md and report.html into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = stats if stats is not None else collect_stats(store)
    meta = {k: v for k, v in (meta or {}).items() if v is not None}
    figs = [(t, _rel(Path(p), out)) for t, p in figures if Path(p).exists()]
    summary = [("records", stats["records"]), ("layers captured", stats["layers"]),
               ("steps captured", f"{len(stats['steps'])} ({stats['steps'][0]}-{stats['steps'][-1]})"
                if stats["steps"] else "0"),
               ("relations", ", ".join(stats["relations"])), ("kinds", ", ".join(stats["kinds"]))]
    info = [(k, v if isinstance(v, (str, int, float)) else json.dumps(v)) for k, v in meta.items()] + summary
    sections = _sections(stats)

    md = [f"# {title}", "", _md_table(["run", "value"], info), ""]
    for t, rel in figs:
        link = f"[{Path(rel).name}]({rel})" + (" (open it in a browser; it works offline)" if rel.endswith(".html") else "")
        md += [f"## {t}", "", link if rel.endswith((".mp4", ".html")) else f"![{t}]({rel})", ""]
    for name, text, header, rows in sections:
        md += [f"## {name}", ""] + ([text, ""] if text else []) + [_md_table(header, rows), ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    e = html.escape

    def table(header, rows):
        head = "".join(f"<th>{e(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f3f3f3}img,video{max-width:100%;border:1px solid #eee}</style></head><body>",
             f"<h1>{e(title)}</h1>", table(["run", "value"], info)]
    for t, rel in figs:
        media = (f"<video src='{e(rel)}' controls loop autoplay muted></video>" if rel.endswith(".mp4")
                 else f"<p><a href='{e(rel)}'>{e(Path(rel).name)}</a> (works offline)</p>" if rel.endswith(".html")
                 else f"<img src='{e(rel)}' alt='{e(t)}'>")
        parts.append(f"<h2>{e(t)}</h2>{media}")
    for name, text, header, rows in sections:
        parts.append(f"<h2>{e(name)}</h2>" + (f"<p>{e(text)}</p>" if text else "") + table(header, rows))
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts))
    return [md_path, html_path]
