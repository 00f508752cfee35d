"""One benchmark worker: a fresh process measuring one provider on one shape, task by task.

run.py starts each worker as a child of a multiprocessing fork server that has imported torch and
attncap and computed nothing (so a worker starts in milliseconds, with no memory left over from
any other measurement) and calls worker(cfg, conn). By hand, for one measurement:

    python benchmarks/measure.py '{"provider": "attncap_fused", "shape": "sd15_self", "device": "cpu",
                                   "tasks": ["pooled_map"], "scaled_from": "?", "refdir": "/tmp/x",
                                   "save_ref": true}'

prints one JSON row per task. Per task:
  1. warm-up call, untimed; its products are checked against attncap_fused's (saved by the
     attncap_fused worker, which runs first for each shape): a provider that disagrees is not timed;
  2. memory call: CPU: gc, malloc_trim(0) (freed heap pages go back to the OS), reset the kernel's
     peak-RSS counter (write 5 to /proc/self/clear_refs), read VmRSS, run, read VmHWM:
     peak_extra = VmHWM - VmRSS. CUDA: reset_peak_memory_stats, max_memory_allocated - allocated;
  3. timed calls: perf_counter (CPU) or CUDA events; median, p20, p80 of 21 calls (11 when a call
     takes 30 ms or more, 5 from 0.3 s; on CPU, 3 when it takes over 2 s, the memory call being the
     first of them): repeats_for().
     On a shared machine, other processes' CPU use during the timed calls is recorded (others_cpu,
     share of all cores) and a disturbed block (> 5%) is timed again, up to twice. With
     cfg["paired"] (run.py --paired, capture providers), each timed call is preceded by a call of
     torch SDPA on the same inputs, and the row also holds that SDPA's median (sdpa_paired_ms): a
     ratio of two medians taken under the same load, alternating.
cfg["threads"] (run.py --threads) sets torch.set_num_threads in the worker first.
Task "forward" is the capture-free call (sdpa, attncap_plain); it has no request.
Inputs: q, k, v [B, H, N, D] from torch.manual_seed(0), float32 on CPU, bfloat16 on CUDA.
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import json
import os
import re
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attncap  # noqa: E402
from providers import RUN, naive_bytes, unsupported  # noqa: E402
from shapes import CPU, REAL, SWEEP, request_for  # noqa: E402

MiB = 2**20
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-3}  # products; cuda: fp16 P in the pooling dots (see tests/test_products.py)
OUT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SLOW_MS = 2000
MAX_OTHERS = 0.05  # share of the machine's CPU other processes may take while we time


def find_shape(name: str, device: str):
    return REAL[name] if device == "cuda" else {**CPU, **SWEEP}[name]


def make_inputs(shape, device: str) -> list[torch.Tensor]:
    """q [B, H, Nq, D], k and v [B, H, Nk, D]: seeded randn, fp32 on CPU, bf16 on CUDA."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [torch.randn(shape.B, shape.H, n, shape.D, device=device).to(dtype) for n in (shape.Nq, shape.Nk, shape.Nk)]


class Memory:
    """Peak extra memory of one call, in bytes, on the CPU (RSS) or on a CUDA device (allocator)."""

    def __init__(self, device: str):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device == "cpu" else None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    def start(self) -> None:
        gc.collect()
        if self.device == "cpu":
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
            self.base = self._status("VmRSS")
        else:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def extra(self) -> int:
        if self.device == "cpu":
            return self._status("VmHWM") - self.base
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def others_cpu_ticks() -> int:
    """CPU ticks all processes but this one have used so far (busy ticks of /proc/stat minus ours)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return sum(ticks) - ticks[3] - ticks[4] - int(own[11]) - int(own[12])  # minus idle, iowait; utime, stime


def one_call_ms(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def repeats_for(first_ms: float) -> int:
    """Timed calls for a call of ``first_ms``: more for fast calls, whose medians scatter most from
    call to call on a shared VM (a 2 ms call by +-10% over 7 calls; the time stays a few seconds)."""
    return 3 if first_ms > SLOW_MS else 5 if first_ms >= 300 else 11 if first_ms >= 30 else 21


def timed(fn, device: str, repeats: int, baseline=None) -> tuple[list[float], float, list[float]]:
    """Milliseconds of ``repeats`` calls of fn, the share of the machine's CPU time that other
    processes took meanwhile (0.0 = we had the machine to ourselves), and, with ``baseline``, the
    milliseconds of a baseline call made before each call of fn (else [])."""
    times, base = [], []
    ticks, wall = others_cpu_ticks(), time.perf_counter()
    for _ in range(repeats):
        if baseline is not None:
            base.append(one_call_ms(baseline, device))
        times.append(one_call_ms(fn, device))
    capacity = (time.perf_counter() - wall) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    return times, max(0.0, (others_cpu_ticks() - ticks) / capacity), base


def quiet_times(fn, device: str, repeats: int, baseline=None) -> tuple[list[float], float, list[float]]:
    """timed(), tried up to 3 times (1 s apart) while other processes take over 5% of the CPU;
    the least disturbed attempt is kept. Blocks over 3 s are not retried (the suite's time)."""
    best = timed(fn, device, repeats, baseline)
    for _ in range(2):
        if best[1] <= MAX_OTHERS or sum(best[0]) + sum(best[2]) > 3000 or device == "cuda":
            break
        time.sleep(1.0)
        best = min(best, timed(fn, device, repeats, baseline), key=lambda t: t[1])
    return best


def check(out, products, ref: dict, device: str) -> str | None:
    """None when out and products agree with attncap_fused's, else what differs."""
    tol = TOLERANCE[device]
    expected = {k[2:]: v for k, v in ref.items() if k.startswith("p.")}
    if set(products) != set(expected):
        return f"products {sorted(products)} != attncap's {sorted(expected)}"
    pairs = [(k, products[k].float().cpu(), expected[k]) for k in products]
    pairs.append(("out", out.float().cpu(), ref["out"]))
    for name, got, want in pairs:
        rtol = atol = OUT_TOLERANCE[out.dtype] if name == "out" else tol
        if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
            err = (got - want).abs().max().item() if got.shape == want.shape else "shape"
            return f"{name} differs from attncap's (max abs err {err}, tolerance {atol})"
    return None


def save_ref(refdir: str, shape: str, task: str, out, products) -> None:
    """attncap_fused's results, the yardstick of the other providers: per task, and the output alone."""
    out = out.float().cpu().contiguous()
    save_file({"out": out, **{f"p.{n}": p.cpu().contiguous() for n, p in products.items()}},
              os.path.join(refdir, f"{shape}.{task}.safetensors"))
    save_file({"out": out}, os.path.join(refdir, f"{shape}.forward.safetensors"))


def measure(cfg: dict) -> list[dict]:
    """All of cfg["tasks"] for one provider on one shape: one row each."""
    device = cfg["device"]
    shape = find_shape(cfg["shape"], device)
    q, k, v = make_inputs(shape, device)
    base = dict(provider=cfg["provider"], shape=shape.name, scaled_from=cfg["scaled_from"], B=shape.B, H=shape.H,
                Nq=shape.Nq, Nk=shape.Nk, D=shape.D, dtype=str(q.dtype).removeprefix("torch."),
                device=device_name(device), torch=torch.__version__, triton=triton_version(),
                attncap=attncap.__version__, attncap_src=attncap_source_hash(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []
    for task in cfg["tasks"]:
        row = dict(base, task=task)
        row.update(measure_task(cfg, shape, task, q, k, v))
        rows.append(row)
    return rows


def measure_task(cfg: dict, shape, task: str, q, k, v) -> dict:
    """Check, then peak memory and times of one task: the fields a row adds to the shape's."""
    device, provider = cfg["device"], cfg["provider"]
    request = None if task == "forward" else request_for(task, shape)
    if isinstance(request, str):
        return dict(skipped=request)
    why = None if request is None else unsupported(provider, request)
    if why:
        return dict(skipped=why)
    need = naive_bytes(shape.B, shape.H, shape.Nq, shape.Nk)
    if provider == "naive" and need > naive_limit(device):
        return dict(skipped=f"would need {need / 2**30:.1f} GiB")
    fn, scale = RUN[provider], shape.D ** -0.5

    def call():
        return fn(q, k, v, scale, request)

    out, products = call()  # warm-up, and the results to check
    if cfg.get("save_ref"):
        save_ref(cfg["refdir"], shape.name, task, out, products)
    else:
        path = os.path.join(cfg["refdir"], f"{shape.name}.{task}.safetensors")
        problem = check(out, products, load_file(path), device) if os.path.exists(path) else \
            "no attncap_fused result to check against"
        if problem:
            return dict(error=problem)
    del out, products
    memory = Memory(device)
    memory.start()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    peak = memory.extra()
    baseline = None
    if cfg.get("paired") and request is not None:
        sdpa = RUN["sdpa"]
        baseline = lambda: sdpa(q, k, v, scale)  # noqa: E731
        baseline()
    if device == "cpu" and first_ms > SLOW_MS and baseline is None:  # the memory call is a timed sample too
        times, others, base = timed(call, device, 2)
        times = [first_ms] + times
    else:
        times, others, base = quiet_times(call, device, repeats_for(first_ms), baseline)
    p20, p50, p80 = np.percentile(times, [20, 50, 80])
    row = dict(median_ms=round(p50, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3), repeats=len(times),
               peak_extra_mib=round(peak / MiB, 1), others_cpu=round(others, 3))
    if base:
        row["sdpa_paired_ms"] = round(float(np.median(base)), 3)
    return row


def naive_limit(device: str) -> int:
    """naive is skipped above this: 6 GiB of RAM on CPU, 80% of the GPU's memory on CUDA."""
    if device == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(0).total_memory)
    return 6 * 2**30


@functools.lru_cache(maxsize=None)
def attncap_source_hash() -> str:
    """Short sha256 of attncap's sources (attncap/ and kernels/): tells apart runs of one version.
    Taken once per process, first at import: run.py's workers are forks of a server that imported
    attncap when the suite began, so that is the code they run, even if the files change meanwhile."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(attncap.__file__)))
    h = hashlib.sha256()
    for folder in ("attncap", "kernels"):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, folder))):
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


attncap_source_hash()  # now, at import: see its docstring


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{model}, {torch.get_num_threads()} threads"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


def worker(cfg: dict, conn) -> None:
    """Entry point of a worker process: sends its rows, or the error that stopped it, over conn."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    try:
        conn.send(measure(cfg))
    except Exception as e:  # noqa: BLE001 - reported as error rows by run.py
        conn.send(f"{type(e).__name__}: {e}")
    conn.close()


if __name__ == "__main__":
    if json.loads(sys.argv[1]).get("threads"):
        torch.set_num_threads(json.loads(sys.argv[1])["threads"])
    for r in measure(json.loads(sys.argv[1])):
        print(json.dumps(r), flush=True)
