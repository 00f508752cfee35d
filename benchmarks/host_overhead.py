"""Per-call host overhead of a captured attncap.attention call, and the recompiles a capture costs.

    python benchmarks/host_overhead.py [--before-src DIR ...] [--write-results benchmarks/RESULTS.md]

Host overhead = time of an attncap.attention call minus the time spent in its compute (the CPU
path's forward, timed by wrapping attncap.cpu_path.forward): validation, planning, dispatch and
product assembly. It is reported as a ratio to that compute (the attention call itself). Each
source tree is measured in its own fresh process, the trees alternating over ROUNDS rounds, so a
busy machine slows both alike; the figure is the median over rounds of each round's median over
CALLS calls. --before-src (repeatable) is a checkout of an earlier attncap (e.g. `git worktree add
/tmp/before <commit>`): its attncap/ package is imported instead of this one.

Recompiles: a tiny WanTransformer3DModel (one block) compiled with backend aot_eager, warmed up,
then one captured call inside attncap.capture and one call after the block; Dynamo's graph counter
says how many graphs each compiled.
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
CALLS, ROUNDS = 200, 5
# (name, B, H, Nq, Nk, D, request kwargs): a tiny model's cross-attention and a CPU-sized Wan one.
SHAPES = [
    ("tiny_wan_cross", 2, 2, 45, 6, 12, dict(query_grid=(3, 3, 5), query_pool=(1, 2, 2), stats=("entropy",))),
    ("wan_cross_cpu", 1, 2, 1560, 64, 64, dict(query_grid=(4, 15, 26), query_pool=(1, 2, 2), stats=("entropy", "colsum"))),
]


def worker() -> None:
    """One process: every shape, CALLS timed calls after a warm-up; prints JSON rows."""
    import torch

    import attncap
    from attncap import cpu_path

    torch.set_num_threads(1)
    spent = []
    forward = cpu_path.forward

    def timed(*a, **kw):
        t = time.perf_counter()
        out = forward(*a, **kw)
        spent.append(time.perf_counter() - t)
        return out

    cpu_path.forward = timed
    rows = []
    for name, B, H, Nq, Nk, D, req in SHAPES:
        torch.manual_seed(0)
        q, k, v = torch.randn(B, H, Nq, D), torch.randn(B, H, Nk, D), torch.randn(B, H, Nk, D)
        request = attncap.MapRequest(**req)
        attncap.attention(q, k, v, request=request)
        calls, computes = [], []
        for _ in range(CALLS):
            spent.clear()
            t = time.perf_counter()
            attncap.attention(q, k, v, request=attncap.MapRequest(**req))  # a new request object per call, as capture makes
            calls.append(time.perf_counter() - t)
            computes.append(sum(spent))
        rows.append(dict(shape=name, call_us=statistics.median(calls) * 1e6,
                         compute_us=statistics.median(computes) * 1e6,
                         overhead_us=statistics.median(c - s for c, s in zip(calls, computes)) * 1e6))
    print(json.dumps(rows))


def measure(src: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, check=True,
                         cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def recompiles() -> dict:
    """Graphs Dynamo compiles for a captured call of a compiled tiny Wan, and after the block."""
    import torch
    from diffusers import WanTransformer3DModel
    from torch._dynamo.utils import counters

    import attncap

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 6, 10), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32), return_dict=False)
    model.compile(backend="aot_eager")
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    with torch.no_grad():
        model(**inputs)
        start = graphs()
        with attncap.capture(model, relations="all", pool=2):
            model(**inputs)
        during = graphs() - start
        model(**inputs)
        after = graphs() - start - during
        model(**inputs)
        steady = graphs() - start - during - after
    return dict(compile_graphs=start, during=during, after=after, steady=steady)


def section(rows: dict[str, list[dict]], rc: dict, env: str, trees: str) -> str:
    lines = ["## Host overhead of a captured call (issue 13)", "",
             f"Measured by `python benchmarks/host_overhead.py --before-src <checkout>` on {env}. Host overhead = "
             "an attncap.attention call minus its compute (the CPU path's forward); ratio = overhead / compute. "
             f"Median over {ROUNDS} alternating fresh processes per tree of the median of {CALLS} calls; a new "
             "MapRequest per call, as capture makes. On a shared 2-core machine: the ratios, not the absolute "
             f"times, are the figures to read. Trees: {trees}; compute differs between them where the CPU path "
             "itself changed.", "",
             "| shape | tree | call us | compute us | host overhead us | overhead / compute |", "|---|---|---:|---:|---:|---:|"]
    for tree, data in rows.items():
        for r in data:
            lines.append(f"| {r['shape']} | {tree} | {r['call_us']:.0f} | {r['compute_us']:.0f} | {r['overhead_us']:.0f} | "
                         f"{r['overhead_us'] / r['compute_us']:.2f} |")
    lines += ["", "GPU: not measured (no GPU in this session). Read from the code: on CUDA a call makes no host "
              "synchronisation after a plan's first call, which copies the plan's index tensors in one transfer (one "
              "synchronisation); tests/test_compile.py checks it with torch.cuda.set_sync_debug_mode when a GPU is "
              "present.", "",
              f"Recompiles a capture costs (tiny WanTransformer3DModel, one block, `model.compile(backend='aot_eager')`): "
              f"the model compiled {rc['compile_graphs']} graph(s); a captured call inside attncap.capture compiled "
              f"{rc['during']} more; the first call after the block {rc['after']}; later calls {rc['steady']}.", ""]
    return "\n".join(lines)


def _revision(src: str) -> str:
    rev = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return rev.stdout.strip() if rev.returncode == 0 else os.path.basename(src.rstrip("/"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before-src", action="append", default=[],
                        help="a checkout of an earlier attncap to compare against (repeatable)")
    parser.add_argument("--write-results", help="RESULTS.md to write this section into")
    args = parser.parse_args()
    if args.worker:
        return worker()
    trees = [(f"before {_revision(src)}", src) for src in args.before_src] + [("after", ROOT)]
    runs: dict[str, list[list[dict]]] = {name: [] for name, _ in trees}
    for _ in range(ROUNDS):
        for name, src in trees:
            runs[name].append(measure(src))
    rows = {name: [{key: (statistics.median(run[i][key] for run in data) if key != "shape" else data[0][i][key])
                    for key in data[0][i]} for i in range(len(SHAPES))] for name, data in runs.items()}
    import platform

    import torch
    env = f"CPU ({platform.machine()}, {os.cpu_count()} cores, 1 thread per process), torch {torch.__version__}"
    names = "; ".join([f"{name}: the tree of that commit" for name, _ in trees[:-1]]
                      + [f"after: this tree (commit {_revision(ROOT)})"])
    text = section(rows, recompiles(), env, names)
    print(text)
    if args.write_results:
        sys.path.append(ROOT)
        from attncap.report import replace_section
        replace_section(args.write_results, text)


if __name__ == "__main__":
    main()
