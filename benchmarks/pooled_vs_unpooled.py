"""The pooled map against the unpooled one on the torch path, timed side by side in one process.

    python benchmarks/pooled_vs_unpooled.py [--threads 2] [--repeats 41] [--out benchmarks/results-pooled-cpu.json]
        [--write-results benchmarks/RESULTS.md] [--render]

run.py times each task in its own block of calls, so comparing its pooled_map and head_mean_map
cells compares two blocks taken seconds apart, each paired with its own SDPA calls; on a shared VM
the two ratios then differ by a few percent either way at no real difference. Here each repeat
calls both (which goes first alternates) on the same inputs, so the ratio pooled / unpooled is
taken under the same load. Per CPU shape with both tasks (benchmarks/shapes.py, the requests of
run.py's head_mean_map and pooled_map): median, p20 and p80 of the per-repeat ratios, and each
call's median time. Figures come from this run only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))  # last: the checkout's kernels/ must not hide Hugging Face's "kernels"
import attncap  # noqa: E402
from measure import attncap_source_hash, device_name, make_inputs  # noqa: E402
from providers import attncap_fused  # noqa: E402
from shapes import CPU, request_for  # noqa: E402

TASKS = ("head_mean_map", "pooled_map")


def measure(shape, repeats: int) -> dict:
    """Per-repeat pooled / unpooled times of one shape, the order of the two calls alternating."""
    q, k, v = make_inputs(shape, "cpu")
    scale = shape.D ** -0.5
    calls = {task: (lambda r=request_for(task, shape): attncap_fused(q, k, v, scale, r)) for task in TASKS}
    for call in calls.values():  # warm-up: plans, tile buffers
        call(), call()
    ms = {task: [] for task in TASKS}
    for i in range(repeats):
        for task in TASKS if i % 2 == 0 else TASKS[::-1]:
            t0 = time.perf_counter()
            calls[task]()
            ms[task].append((time.perf_counter() - t0) * 1e3)
    ratios = [p / u for p, u in zip(ms["pooled_map"], ms["head_mean_map"])]
    p20, p50, p80 = np.percentile(ratios, [20, 50, 80])
    return dict(shape=shape.name, B=shape.B, H=shape.H, Nq=shape.Nq, Nk=shape.Nk, D=shape.D, repeats=repeats,
                ratio_median=round(float(p50), 4), ratio_p20=round(float(p20), 4), ratio_p80=round(float(p80), 4),
                unpooled_ms=round(statistics.median(ms["head_mean_map"]), 3),
                pooled_ms=round(statistics.median(ms["pooled_map"]), 3))


def section(doc: dict, source: str) -> str:
    lines = ["## Pooled map vs unpooled map, side by side (issue 15)", "",
             f"Measured {doc['date'][:10]} on CPU ({doc['device']}), torch {doc['torch']}, attncap source "
             f"{doc['attncap_src']}, `{doc['command']}`; rendered from `{source}`. Each repeat times both calls "
             "on the same inputs, in alternating order, in one process (benchmarks/pooled_vs_unpooled.py says "
             "why); the ratio is pooled time / unpooled time, below 1 where the pooled map is faster.", "",
             "| shape | pooled / unpooled (median) | p20 - p80 | unpooled ms | pooled ms | repeats |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['shape']} | {r['ratio_median']:.3f} | {r['ratio_p20']:.3f} - {r['ratio_p80']:.3f} | "
                     f"{r['unpooled_ms']:.2f} | {r['pooled_ms']:.2f} | {r['repeats']} |")
    slower = [f"{r['shape']} ({r['ratio_median']:.3f})" for r in doc["rows"] if r["ratio_median"] > 1.0]
    lines += ["", "Pooled map slower than the unpooled one (median ratio over 1): "
              + ("; ".join(slower) if slower else "nowhere") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--shapes", help="comma-separated CPU shape names (default: every shape with both tasks)")
    parser.add_argument("--out", default=os.path.join(HERE, "results-pooled-cpu.json"))
    parser.add_argument("--write-results", help="RESULTS.md to write this section into")
    parser.add_argument("--render", action="store_true", help="measure nothing: render the run in --out")
    args = parser.parse_args()
    if args.render:
        with open(args.out) as f:
            write(json.load(f), args)
        return
    torch.set_num_threads(args.threads)
    names = args.shapes.split(",") if args.shapes else [n for n, s in CPU.items() if all(t in s.tasks for t in TASKS)]
    unknown = [n for n in names if n not in CPU]
    if unknown:
        parser.error(f"unknown --shapes {unknown}; choose from {sorted(CPU)}")
    rows = []
    for name in names:
        rows.append(measure(CPU[name], args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    doc = dict(command="python benchmarks/pooled_vs_unpooled.py " + " ".join(sys.argv[1:]),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=device_name('cpu'), torch=torch.__version__,
               attncap=attncap.__version__, attncap_src=attncap_source_hash(), rows=rows)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    write(doc, args)


def write(doc: dict, args: argparse.Namespace) -> None:
    text = section(doc, os.path.relpath(args.out, os.path.dirname(HERE)))
    print(text)
    if args.write_results:
        from attncap.report import replace_section
        replace_section(args.write_results, text)


if __name__ == "__main__":
    main()
