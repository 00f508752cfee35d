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
  3. timed calls: perf_counter (CPU) or CUDA events; median, p20, p80 of 7 calls (5 when a call
     takes over 0.3 s; on CPU, 3 when it takes over 2 s, the memory call being the first of them).
Task "forward" is the capture-free call (sdpa, attncap_plain); it has no request.
Inputs: q, k, v [B, H, N, D] from torch.manual_seed(0), float32 on CPU, bfloat16 on CUDA.
"""
from __future__ import annotations

import ctypes
import datetime
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
from providers import RUN, naive_bytes  # noqa: E402
from shapes import CPU, REAL, SWEEP, request_for  # noqa: E402

MiB = 2**20
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-3}  # products; cuda: tf32 pooling dots (see tests/test_products.py)
OUT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SLOW_MS = 2000


def find_shape(name: str, device: str):
    return REAL[name] if device == "cuda" else {**CPU, **SWEEP}[name]


def make_inputs(shape, device: str):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(shape.B, shape.H, shape.Nq, shape.D)
    k = torch.randn(shape.B, shape.H, shape.Nk, shape.D)
    v = torch.randn(shape.B, shape.H, shape.Nk, shape.D)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


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


def timed(fn, device: str, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of fn."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


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
    device, provider = cfg["device"], cfg["provider"]
    shape = find_shape(cfg["shape"], device)
    q, k, v = make_inputs(shape, device)
    scale = shape.D ** -0.5
    fn = RUN[provider]
    memory = Memory(device)
    base_row = dict(provider=provider, shape=shape.name, scaled_from=cfg["scaled_from"], B=shape.B, H=shape.H,
                    Nq=shape.Nq, Nk=shape.Nk, D=shape.D, dtype=str(q.dtype).replace("torch.", ""), device=device_name(device),
                    torch=torch.__version__, triton=triton_version(), attncap=attncap.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []
    for task in cfg["tasks"]:
        row = dict(base_row, task=task)
        rows.append(row)
        request = None if task == "forward" else request_for(task, shape)
        if isinstance(request, str):
            row["skipped"] = request
            continue
        if provider == "naive":
            need = naive_bytes(shape.B, shape.H, shape.Nq, shape.Nk)
            if need > naive_limit(device):
                row["skipped"] = f"would need {need / 2**30:.1f} GiB"
                continue
        call = lambda: fn(q, k, v, scale, request)  # noqa: E731
        out, products = call()
        if cfg.get("save_ref"):
            save_ref(cfg["refdir"], shape.name, task, out, products)
        else:
            path = os.path.join(cfg["refdir"], f"{shape.name}.{task}.safetensors")
            problem = check(out, products, load_file(path), device) if os.path.exists(path) else \
                "no attncap_fused result to check against"
            if problem:
                row["error"] = problem
                continue
        del out, products
        memory.start()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - start) * 1e3
        row["peak_extra_mib"] = round(memory.extra() / MiB, 1)
        if device == "cpu" and first_ms > SLOW_MS:  # slow calls: the memory call is a timed sample too
            times = [first_ms] + timed(call, device, 2)
        else:
            times = timed(call, device, 7 if first_ms < 300 else 5)
        p20, p50, p80 = np.percentile(times, [20, 50, 80])
        row.update(median_ms=round(p50, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3), repeats=len(times))
    return rows


def naive_limit(device: str) -> int:
    """naive is skipped above this: 6 GiB of RAM on CPU, 80% of the GPU's memory on CUDA."""
    if device == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(0).total_memory)
    return 6 * 2**30


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "cpu")
    return f"{model}, {torch.get_num_threads()} threads"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


def worker(cfg: dict, conn) -> None:
    """Entry point of a worker process: sends its rows, or the error that stopped it, over conn."""
    try:
        conn.send(measure(cfg))
    except Exception as e:  # noqa: BLE001 - reported as error rows by run.py
        conn.send(f"{type(e).__name__}: {e}")
    conn.close()


if __name__ == "__main__":
    for r in measure(json.loads(sys.argv[1])):
        print(json.dumps(r), flush=True)
