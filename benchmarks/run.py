"""Run every benchmark measurement and write the rows as JSON.

    python benchmarks/run.py [--device cpu|cuda] [--out benchmarks/results-<device>.json]
                             [--shapes sd15_self,wan480_self] [--providers sdpa,naive]
                             [--threads 1] [--paired] [--merge]

Each (provider, shape) runs in a fresh process (benchmarks/measure.py, forked from a server that
has only imported torch and attncap), so every peak-memory figure is that provider's alone. For
each shape attncap_fused runs first and saves its products, which every other provider must match
(1e-4 on CPU) before it is timed. On a CPU shared with other work, each worker waits (up to
20 s) for a quiet second first, and records how much CPU others took while it timed. CPU shapes are scaled-down
stand-ins of the real ones; every row names its real shape in "scaled_from".
Then render the tables: python benchmarks/report.py
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
from providers import PROVIDERS  # noqa: E402
from shapes import shapes_for  # noqa: E402

ORDER = ("attncap_fused", "sdpa", "attncap_plain", "hybrid", "chunked_eager", "naive", "peer")  # attncap_fused first: the yardstick
WORKER_TIMEOUT_S = 600
QUIET_WAIT_S = 20  # longest wait for other processes to calm down before each CPU worker


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait (up to max_wait_s) for a second in which other processes use under 10% of the CPU, so
    that timings on a shared machine are not taken in someone else's burst. Returns seconds waited."""
    start = time.time()
    while time.time() - start < max_wait_s:
        ticks, t0 = measure.others_cpu_ticks(), time.time()
        time.sleep(1.0)
        capacity = (time.time() - t0) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
        if (measure.others_cpu_ticks() - ticks) / capacity < 0.1:
            break
    return time.time() - start


def run_worker(ctx, cfg: dict) -> list[dict]:
    """Rows from one fresh worker process; a crashed or hung worker yields error rows."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=measure.worker, args=(cfg, send))
    proc.start()
    send.close()
    try:
        result = receive.recv() if receive.poll(WORKER_TIMEOUT_S) else f"worker took over {WORKER_TIMEOUT_S} s"
    except EOFError:  # died without a word: killed for memory, or a crash
        result = None
    if isinstance(result, str) and proc.is_alive():
        proc.kill()
    proc.join()
    if result is None:
        result = f"worker died with exit code {proc.exitcode}"
    if isinstance(result, list):
        return result
    return [dict(provider=cfg["provider"], shape=cfg["shape"], scaled_from=cfg["scaled_from"], task=t, error=result)
            for t in cfg["tasks"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results-<device>.json")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    ap.add_argument("--providers", default=None, help=f"comma-separated, from {','.join(PROVIDERS)}")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every worker (default: torch's own, one per core)")
    ap.add_argument("--paired", action="store_true",
                    help="capture providers time SDPA before each of their calls too (sdpa_paired_ms)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of shapes this run does not measure from the existing --out file")
    args = ap.parse_args()
    out_path = args.out or os.path.join(HERE, f"results-{args.device}.json")
    wanted = set(args.providers.split(",")) if args.providers else set(PROVIDERS)
    wanted.add("attncap_fused")  # the others are checked against it
    shapes = [(s, src) for s, src in shapes_for(args.device) if not args.shapes or s.name in args.shapes.split(",")]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "attncap", "measure"])
    rows: list[dict] = []
    if args.merge and os.path.exists(out_path):
        with open(out_path) as f:
            measured = {s.name for s, _ in shapes}
            rows = [r for r in json.load(f)["rows"] if r["shape"] not in measured]
    t_start, waited = time.time(), 0.0
    with tempfile.TemporaryDirectory(prefix="attncap-bench-") as refdir:
        for shape, scaled_from in shapes:
            for provider in (p for p in ORDER if p in wanted):
                tasks = ["forward"] if provider in ("sdpa", "attncap_plain") else list(shape.tasks)
                cfg = dict(provider=provider, shape=shape.name, device=args.device, tasks=tasks,
                           scaled_from=scaled_from, refdir=refdir, save_ref=provider == "attncap_fused",
                           threads=args.threads, paired=args.paired)
                waited += wait_for_quiet(QUIET_WAIT_S) if args.device == "cpu" else 0.0
                for row in run_worker(ctx, cfg):
                    rows.append(row)
                    status = row.get("error") or row.get("skipped") or \
                        f"{row['median_ms']:10.1f} ms  {row['peak_extra_mib']:8.1f} MiB"
                    print(f"{shape.name:14s} {row['task']:22s} {provider:14s} {status}", flush=True)
            write(out_path, rows, args, time.time() - t_start, waited)
    print(f"{len(rows)} rows in {time.time() - t_start:.0f} s ({waited:.0f} s waiting for a quiet CPU) -> {out_path}")


def write(path: str, rows: list[dict], args, seconds: float, waited: float) -> None:
    doc = dict(command=" ".join(["python benchmarks/run.py"] + sys.argv[1:]), device=args.device,
               suite_seconds=round(seconds, 1), waited_for_quiet_s=round(waited, 1), rows=rows)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
