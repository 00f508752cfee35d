"""Render a second CPU run of benchmarks/run.py (another thread count) as its own RESULTS.md section.

    python benchmarks/run.py --threads 2 --paired --shapes ... --providers sdpa,attncap_fused,peer \
        --out benchmarks/results-cpu-2threads.json
    python benchmarks/threads_section.py benchmarks/results-cpu-2threads.json [--write-results benchmarks/RESULTS.md]

Per shape and task: attncap's torch path (attncap_fused) over the SDPA call its own worker timed
just before each of its calls (sdpa_paired_ms), the peer over the sdpa provider's time in the same
run, and attncap's peak extra memory; cells over the 2.0x target and pooled maps slower than the
unpooled map are listed under the table. Figures come only from the JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from shapes import TASKS  # noqa: E402

TARGET = 2.0


def section(doc: dict, source: str) -> str:
    rows = [r for r in doc["rows"] if "median_ms" in r]
    sdpa = {r["shape"]: r["median_ms"] for r in rows if r["provider"] == "sdpa"}
    cell = {(r["shape"], r["task"], r["provider"]): r for r in rows}
    shapes = sorted({r["shape"] for r in rows if r["provider"] == "attncap_fused"})
    first = next(r for r in rows if r["provider"] == "attncap_fused")
    lines = [f"## Torch path at {first['device'].split(', ')[-1]} (issue 15)", "",
             f"Measured {first['date'][:10]} on CPU ({first['device']}), torch {first['torch']}, attncap source "
             f"{first['attncap_src']}, `{doc['command']}`; rendered from `{source}` by "
             "`python benchmarks/threads_section.py`. attncap = attncap_fused time / the SDPA call timed just before "
             "each of its calls in the same worker; peer = attention-map-diffusers 1.0 / the sdpa provider's time in "
             "this run; MiB = attncap's peak extra memory.", "",
             "| shape | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    misses, slower = [], []
    for shape in shapes:
        cells = []
        for task in TASKS:
            a, p = cell.get((shape, task, "attncap_fused")), cell.get((shape, task, "peer"))
            if a is None or not a.get("sdpa_paired_ms"):
                cells.append("-")
                continue
            r = a["median_ms"] / a["sdpa_paired_ms"]
            if r > TARGET:
                misses.append(f"{shape} {task} {r:.2f}x")
            peer = f", peer {p['median_ms'] / sdpa[shape]:.2f}x" if p is not None and shape in sdpa else ""
            cells.append(f"{r:.2f}x{peer}, {a['peak_extra_mib']:.0f} MiB")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        pooled, plain = cell.get((shape, "pooled_map", "attncap_fused")), cell.get((shape, "head_mean_map", "attncap_fused"))
        if pooled and plain and pooled["median_ms"] > plain["median_ms"]:
            slower.append(f"{shape} ({pooled['median_ms']:.1f} vs {plain['median_ms']:.1f} ms)")
    lines += ["", f"Over {TARGET}x SDPA: " + (", ".join(misses) or "none") + ".",
              "Pooled map slower than the unpooled head-mean map: " + (", ".join(slower) or "none") + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON file written by benchmarks/run.py")
    parser.add_argument("--write-results", help="RESULTS.md to write this section into")
    args = parser.parse_args()
    with open(args.results) as f:
        doc = json.load(f)
    text = section(doc, os.path.relpath(args.results, os.path.dirname(HERE)))
    print(text)
    if args.write_results:
        sys.path.insert(0, os.path.dirname(HERE))
        from attncap.report import replace_section
        replace_section(args.write_results, text)


if __name__ == "__main__":
    main()
