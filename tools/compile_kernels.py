"""Compile every kernel variant for real GPU targets on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile:
shapes, types and layouts that only the GPU compiler sees. This script compiles each variant
ahead of time for sm_80 (A100) and sm_90 (H100/H200) through Triton's own ptxas, and reports
registers, spills and shared memory per variant (ptxas -v), so a variant that would spill or not
fit is visible without a GPU; it exits with an error when a variant needs more shared memory than
the architecture allows (that launch would fail on the GPU).

    python tools/compile_kernels.py [--arch 90] [--json out.json]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attncap.kernels.configs import SHARED_LIMIT, forward_config, map_config  # noqa: E402
from attncap.kernels.forward import attn_fwd_kernel  # noqa: E402
from attncap.kernels.map_pass import attn_map_kernel  # noqa: E402

POINTERS = {
    "attn_fwd_kernel": {"Q": "in", "K": "in", "V": "in", "O": "in", "LSE": "*fp32", "MASK": "*u8", "KPM": "*u8",
                        "SEL": "*i32", "TOK": "*fp32", "ENT": "*fp32", "PEAK": "*fp32"},
    "attn_map_kernel": {"Q": "in", "K": "in", "LSE": "*fp32", "MASK": "*u8", "KPM": "*u8", "OUT": "*fp32",
                        "HEADS": "*i32", "QPERM": "*i32", "QBIN": "*i32", "QSTART": "*i32", "QCOUNT": "*fp32",
                        "KPERM": "*i32", "KBIN": "*i32", "KSTART": "*i32", "KCOUNT": "*fp32"},
}


def _variants():
    """(name, kernel, dtype, constexprs, launch config) for the shapes the models use."""
    gpu = type("Dev", (), {"type": "cuda"})()
    for dtype in ("bf16", "fp16", "fp32"):
        for d in (40, 64, 72, 80, 128, 160, 256):
            bd = max(16, triton.next_power_of_2(d))
            for n_sel, stats in ((0, False), (16, True), (128, True)):
                cfg = forward_config(d, d, n_sel, gpu, 4 if dtype == "fp32" else 2)
                yield (f"fwd-{dtype}-d{d}-sel{n_sel}", attn_fwd_kernel, dtype, dict(
                    HEAD_D=d, HEAD_DV=d, BLOCK_D=bd, BLOCK_DV=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_S=max(16, n_sel), IS_CAUSAL=False, MASK_KIND=0, HAS_KPM=False, HAS_SEL=n_sel > 0,
                    WANT_STATS=stats, DOT_F32=False), cfg)
            for pool_q, pool_k in ((False, False), (True, True), (False, True)):
                cfg = map_config(d, pool_q, pool_k, gpu)
                yield (f"map-{dtype}-d{d}-pool{int(pool_q)}{int(pool_k)}", attn_map_kernel, dtype, dict(
                    HEAD_D=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_QB=32 if pool_q else cfg.block_m, BLOCK_KB=32 if pool_k else cfg.block_n,
                    POOL_Q=pool_q, POOL_K=pool_k, IS_CAUSAL=True, MASK_KIND=1, HAS_KPM=True, DOT_F32=False), cfg)


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        ptr = POINTERS[kernel.fn.__name__].get(name)
        if name in constexprs:
            sig[name] = "constexpr"
        elif ptr is not None:
            sig[name] = f"*{dtype}" if ptr == "in" else ptr
        elif name == "scale_log2":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_usage(ptx: str, arch: int) -> dict:
    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this architecture
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = res.stderr
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def compile_all(arch: int, only: str | None = None) -> list[dict]:
    rows = []
    for name, kernel, dtype, constexprs, cfg in _variants():
        if only and only not in name:
            continue
        src = ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        rows.append({"variant": name, "arch": f"sm_{arch}", "shared_bytes": compiled.metadata.shared,
                     "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                     **_ptxas_usage(compiled.asm["ptx"], arch)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default=None, help="substring of the variant names to compile")
    parser.add_argument("--json", default=None)
    parser.add_argument("--write-results", default=None, metavar="RESULTS.md",
                        help="also put a summary section into this markdown file (benchmarks/RESULTS.md)")
    args = parser.parse_args()
    rows = compile_all(args.arch, args.only)
    for r in rows:
        print(f"{r['variant']:28s} {r['arch']} regs {r['registers']:3d} spill st/ld {r['spill_stores']}/{r['spill_loads']} "
              f"shared {r['shared_bytes']} warps {r['num_warps']} stages {r['num_stages']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from attncap.report import replace_section

        replace_section(args.write_results, results_section(rows, args.arch))
    # Compiling succeeds past the shared-memory limit; the launch would fail on the GPU. Fail here.
    over = [r for r in rows if r["shared_bytes"] > SHARED_LIMIT[args.arch]]
    for r in over:
        print(f"{r['variant']}: {r['shared_bytes']} bytes of shared memory, over sm_{args.arch}'s "
              f"{SHARED_LIMIT[args.arch]}", file=sys.stderr)
    if over:
        sys.exit(1)


def results_section(rows: list[dict], arch: int) -> str:
    """Markdown: spill-free variants per kernel and dtype, and every variant that spills."""
    import datetime

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        kernel, dtype = r["variant"].split("-")[:2]
        groups.setdefault((kernel, dtype), []).append(r)
    lines = [f"## Kernel compile report (ptxas, sm_{arch}, no GPU needed)", "",
             f"{datetime.date.today().isoformat()}, triton {triton.__version__}: every kernel variant compiled ahead of "
             f"time for sm_{arch} by `python tools/compile_kernels.py --arch {arch} --write-results "
             "benchmarks/RESULTS.md` (ptxas -v). Variants: forward (fwd) by dtype, head dim and selected-key "
             "count; map pass (map) by dtype, head dim and pooling (pool<query><key>).", "",
             "| kernel | dtype | variants | spill-free | max registers | max shared KiB |", "|---|---|---:|---:|---:|---:|"]
    for (kernel, dtype), rs in sorted(groups.items()):
        free = sum(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rs)
        lines.append(f"| {kernel} | {dtype} | {len(rs)} | {free} | {max(r['registers'] for r in rs)} | "
                     f"{max(r['shared_bytes'] for r in rs) / 1024:.0f} |")
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    over = [r["variant"] for r in rows if r["shared_bytes"] > SHARED_LIMIT[arch]]
    lines += ["", f"Shared memory limit of sm_{arch}: {SHARED_LIMIT[arch] // 1024} KiB per block; over it: "
              f"{', '.join(over) if over else 'none'}."]
    lines += ["", "Variants that spill (stores/loads in bytes):" if spills else "No variant spills.", ""]
    lines += [f"- {r['variant']}: {r['spill_stores']}/{r['spill_loads']} ({r['registers']} registers, "
              f"{r['num_warps']} warps, {r['num_stages']} stages)" for r in spills]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
