"""Host overhead of a captured diffusers model call, eager and torch.compile'd, and what a capture recompiles.

    python benchmarks/captured_overhead.py [--before-src DIR] [--write-results benchmarks/RESULTS.md]

A WanTransformer3DModel with two blocks (random weights, CPU, float32) runs inside one capture block
(default relations, pool=2, entropy), eagerly and compiled with `model.compile(backend="aot_eager")`,
each call a new step and only even steps captured: captured and uncaptured calls alternate, so a
busy machine slows both alike. Overhead per captured attention call = the median over adjacent
pairs of (captured call - uncaptured call) / attention calls per model call; it is reported as a
ratio to the attention call itself: torch SDPA alone on that model's self- and cross-attention
shapes, timed in the same process.
Each source tree runs in its own fresh process, the trees alternating over ROUNDS rounds, so a busy
machine slows both alike; figures are medians over rounds of per-round medians. --before-src is a
checkout of an earlier attncap (`git worktree add /tmp/before <commit>`), imported instead of this one.

Recompiles: graphs Dynamo compiles in a first capture block, a second block and after the blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROUNDS = 3
# name: (heads, head dim, latent frames, height, width, text tokens, model calls timed)
SIZES = {"tiny_wan": (2, 12, 3, 6, 10, 6, 40), "wan_cpu": (4, 32, 4, 30, 52, 64, 8)}
BLOCKS = 2


def _model(heads: int, dim: int, frames: int, h: int, w: int, text: int):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim,
                                  in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=2 * heads * dim,
                                  num_layers=BLOCKS, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=64)
    inputs = dict(hidden_states=torch.randn(1, 16, frames, h, w), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, text, 32), return_dict=False)
    return model, inputs


def _alternating(model, inputs, calls: int) -> tuple[float, float, float]:
    """(captured, uncaptured, per-pair difference) medians in seconds over ``calls`` pairs."""
    import torch

    import attncap

    n = 2 * calls + 2  # the first pair warms up (and compiles both variants)
    times = []
    with attncap.capture(model, pool=2, stats=("entropy",), steps=list(range(0, n, 2))):
        for i in range(n):
            args = dict(inputs, timestep=torch.tensor([900.0 - i]))  # a new step per call
            t = time.perf_counter()
            model(**args)
            times.append(time.perf_counter() - t)
    captured, plain = times[2::2], times[3::2]
    return (statistics.median(captured), statistics.median(plain),
            statistics.median(c - p for c, p in zip(captured, plain)))


def _per_call(fn, calls: int) -> float:
    """Median seconds of ``calls`` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker() -> None:
    """One process: every size, eager and compiled; prints one JSON line."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    rows = []
    for name, (heads, dim, frames, h, w, text, calls) in SIZES.items():
        model, inputs = _model(heads, dim, frames, h, w, text)
        n = frames * (h // 2) * (w // 2)
        q = torch.randn(1, heads, n, dim)
        kv = torch.randn(1, heads, text, dim)
        sdpa = (_per_call(lambda: F.scaled_dot_product_attention(q, q, q), calls * 4)
                + _per_call(lambda: F.scaled_dot_product_attention(q, kv, kv), calls * 4)) / 2
        row = dict(size=name, tokens=n, sdpa_us=sdpa * 1e6)
        with torch.no_grad():
            for mode in ("eager", "compiled"):
                if mode == "compiled":
                    model.compile(backend="aot_eager")
                captured, plain, diff = _alternating(model, inputs, calls)
                row[f"{mode}_plain_us"] = plain * 1e6
                row[f"{mode}_captured_us"] = captured * 1e6
                row[f"{mode}_overhead_us"] = diff / (2 * BLOCKS) * 1e6
        rows.append(row)
    print(json.dumps(rows))


def recompiles() -> dict:
    """Graphs Dynamo compiles around capture blocks of a compiled tiny Wan (this tree)."""
    import torch
    from torch._dynamo.utils import counters

    import attncap

    model, inputs = _model(*SIZES["tiny_wan"][:6])
    model.compile(backend="aot_eager")
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    out = {}
    with torch.no_grad():
        model(**inputs)
        out["model"] = graphs()
        for block in ("first_block", "second_block"):
            start = graphs()
            with attncap.capture(model, pool=2):
                model(**inputs)
                model(**inputs)
            out[block] = graphs() - start
        start = graphs()
        model(**inputs)
        model(**inputs)
        out["after"] = graphs() - start
    out["breaks"] = sum(counters["graph_break"].values())
    return out


def measure(src: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                         text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(rows: dict[str, list[dict]], rc: dict, env: str, before: str) -> str:
    lines = ["## Host overhead of a captured model call (issue 13)", "",
             f"Measured by `python benchmarks/captured_overhead.py --before-src <checkout>` on {env}. A "
             f"WanTransformer3DModel with {BLOCKS} blocks (4 attention calls per model call), capture with default "
             "relations, pool=2 and entropy; compiled = `model.compile(backend='aot_eager')`. Captured and uncaptured "
             "calls alternate in one capture block (even steps captured). Overhead per captured attention call = "
             "median over adjacent pairs of (captured - uncaptured model call) / 4; ratio = that / torch SDPA alone on the "
             f"model's attention shapes (mean of self and cross), timed in the same process. Median over {ROUNDS} "
             "alternating fresh processes per tree; on a shared 2-core machine the ratios are the figures to read. "
             f"before = {before}, after = this tree.", "",
             "| size (video tokens) | tree | SDPA us | eager: uncaptured / captured us | eager overhead per call: us (x SDPA) "
             "| compiled: uncaptured / captured us | compiled overhead per call: us (x SDPA) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for tree, data in rows.items():
        for r in data:
            cells = [f"{r['size']} ({r['tokens']})", tree, f"{r['sdpa_us']:.0f}"]
            for mode in ("eager", "compiled"):
                cells += [f"{r[mode + '_plain_us']:.0f} / {r[mode + '_captured_us']:.0f}",
                          f"{r[mode + '_overhead_us']:.0f} ({r[mode + '_overhead_us'] / r['sdpa_us']:.2f}x)"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Recompiles (this tree, tiny Wan with {BLOCKS} blocks, aot_eager, two model calls per block): the "
              f"model compiled {rc['model']} graph(s); a first capture block compiled {rc['first_block']} more (the "
              f"captured calls inside the graph, both blocks sharing it), a second block {rc['second_block']}, the "
              f"calls after the blocks {rc['after']}; Dynamo counted {rc['breaks']} graph break(s) in all.", "",
              "GPU: not measured (no GPU in this session).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before-src", help="a checkout of an earlier attncap to compare against")
    parser.add_argument("--write-results", help="RESULTS.md to write this section into")
    args = parser.parse_args()
    if args.worker:
        return worker()
    trees = ([("before", args.before_src)] if args.before_src else []) + [("after", ROOT)]
    runs: dict[str, list[list[dict]]] = {name: [] for name, _ in trees}
    for _ in range(ROUNDS):
        for name, src in trees:
            runs[name].append(measure(src))
    rows = {name: [{key: (statistics.median(run[i][key] for run in data) if isinstance(data[0][i][key], float)
                          else data[0][i][key]) for key in data[0][i]} for i in range(len(SIZES))]
            for name, data in runs.items()}
    import platform

    import torch
    env = f"CPU ({platform.machine()}, {os.cpu_count()} cores, 1 thread per process), torch {torch.__version__}"
    before = "not measured"
    if args.before_src:
        rev = subprocess.run(["git", "-C", args.before_src, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True)
        before = f"commit {rev.stdout.strip()}" if rev.returncode == 0 else args.before_src
    sys.path.append(ROOT)
    text = section(rows, recompiles(), env, before)
    print(text)
    if args.write_results:
        from attncap.report import replace_section
        replace_section(args.write_results, text)


if __name__ == "__main__":
    main()
