"""Compile the kernels exactly as the runtime launches them, for GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not what the GPU compiler
makes of them. This script runs the real launchers (attncap.kernels.forward / map_pass) on meta
tensors of real model shapes (WAN 2.1 480p self and cross attention, Flux, SD, ...), records each
launch instead of running it (kernels.configs.compiling_for), and compiles it through Triton's own
argument specialisation (its JIT binder: integer arguments equal to 1 become constants, those
divisible by 16 and 16-byte aligned pointers get divisibility hints), with the launch config the
runtime would pick for that architecture. Per variant it reports ptxas registers, spills and
shared memory, whether the loads of the kernel's loops are pipelined (asynchronous copies that
stay in flight across iterations, read from the TTGIR) and whether the dots use wgmma (sm_90).
It exits with an error when a variant needs more shared memory than the architecture allows (the
launch would fail on the GPU).

    python tools/compile_kernels.py [--arch 90] [--only wan] [--json out.json]
                                    [--write-results benchmarks/RESULTS.md]

Needs a Triton whose JIT has the binder API (triton.runtime.jit.create_function_from_signature and
JITFunction._pack_args, Triton >= 3.4); the kernels themselves support Triton >= 3.2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

try:
    from triton.runtime.jit import create_function_from_signature  # noqa: E402
except ImportError:  # pragma: no cover - older Triton
    sys.exit(f"triton {triton.__version__} lacks the JIT binder API this script uses; use Triton >= 3.4")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attncap.kernels import configs, forward, map_pass  # noqa: E402
from attncap.layouts import plan_range  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Variant:
    """One launch: a kernel at a model's shape. grid/pool are (t,) h, w of the image tokens."""
    name: str
    kind: str              # "fwd" or "map"
    dtype: str
    H: int
    Nq: int
    Nk: int
    D: int
    n_sel: int = 0
    stats: bool = False
    masks: bool = False    # boolean mask + key padding + causal
    qgrid: tuple | None = None
    kgrid: tuple | None = None
    pool: tuple | None = None
    colsum: bool = False   # map pass with the whole query range as one bin (colsum without a map)


WAN = (21, 30, 52)
FLUX = (64, 72)
VARIANTS = [
    Variant("fwd-wan480-self-bf16-d128-plain", "fwd", "bf16", 40, 32760, 32760, 128),
    Variant("fwd-wan480-self-bf16-d128-stats", "fwd", "bf16", 40, 32760, 32760, 128, stats=True),
    Variant("fwd-wan480-cross-bf16-d128-sel16", "fwd", "bf16", 40, 32760, 512, 128, n_sel=16),
    Variant("fwd-flux-joint-bf16-d128-sel128", "fwd", "bf16", 24, 4608, 4608, 128, n_sel=128, stats=True),
    Variant("fwd-sd15-self-fp16-d40-stats", "fwd", "fp16", 8, 4096, 4096, 40, stats=True),
    Variant("fwd-sdxl-cross-fp16-d64-sel8", "fwd", "fp16", 10, 16384, 77, 64, n_sel=8, stats=True),
    Variant("fwd-gen-fp16-d72-sel16", "fwd", "fp16", 16, 4096, 4096, 72, n_sel=16, stats=True),
    Variant("fwd-gen-bf16-d256-stats", "fwd", "bf16", 8, 4096, 4096, 256, stats=True),
    Variant("fwd-gen-fp32-d128-sel16", "fwd", "fp32", 8, 4096, 4096, 128, n_sel=16, stats=True),
    Variant("fwd-masked-bf16-d128-sel16", "fwd", "bf16", 8, 4096, 4096, 128, n_sel=16, stats=True, masks=True),
    Variant("map-wan480-self-bf16-d128-pool144", "map", "bf16", 40, 32760, 32760, 128, qgrid=WAN, kgrid=WAN,
            pool=(1, 4, 4)),
    Variant("map-wan480-cross-bf16-d128-poolq", "map", "bf16", 40, 32760, 512, 128, qgrid=WAN, pool=(1, 4, 4)),
    Variant("map-wan480-self-bf16-d128-colsum", "map", "bf16", 40, 32760, 32760, 128, colsum=True),
    Variant("map-flux-joint-bf16-d128-pool4", "map", "bf16", 24, 4608, 4608, 128, qgrid=FLUX, kgrid=FLUX, pool=(4, 4)),
    Variant("map-sd15-self-fp16-d40-pool4", "map", "fp16", 8, 4096, 4096, 40, qgrid=(64, 64), kgrid=(64, 64),
            pool=(4, 4)),
    Variant("map-gen-bf16-d256-pool4", "map", "bf16", 8, 4096, 4096, 256, qgrid=(64, 64), kgrid=(64, 64), pool=(4, 4)),
    Variant("map-gen-fp32-d128-pool4", "map", "fp32", 8, 4096, 4096, 128, qgrid=(64, 64), kgrid=(64, 64), pool=(4, 4)),
    Variant("map-masked-bf16-d128-unpooled", "map", "bf16", 8, 1024, 1024, 128, masks=True),
]


def _meta_plan(plan):
    """The AxisPlan on the meta device; its bin sizes stay host facts (nothing is read back)."""
    biggest = plan.max_bin_size()
    return types.SimpleNamespace(perm=plan.perm.to("meta"), bin_of_slot=plan.bin_of_slot.to("meta"),
                                 bin_start=plan.bin_start.to("meta"), counts=plan.counts.to("meta"),
                                 pooled=plan.pooled, nbins=plan.nbins, nslots=plan.nslots,
                                 max_bin_size=lambda: biggest)


def _plan(n: int, grid, pool):
    return plan_range(0, n, grid, pool) if pool is not None and grid is not None else plan_range(0, n, None, None)


def _record_launches(v: Variant, arch: int) -> list[tuple]:
    """Run the launcher of ``v`` on meta tensors (BSHD views, as diffusers passes q, k, v)."""
    dt = DTYPES[v.dtype]
    meta = dict(device="meta", dtype=dt)
    q = torch.empty(1, v.Nq, v.H, v.D, **meta).transpose(1, 2)
    k = torch.empty(1, v.Nk, v.H, v.D, **meta).transpose(1, 2)
    mask = torch.empty(1, 1, v.Nq, v.Nk, device="meta", dtype=torch.uint8).expand(1, v.H, v.Nq, v.Nk) \
        if v.masks else None
    kpm = torch.empty(1, v.Nk, device="meta", dtype=torch.uint8) if v.masks else None
    masks = dict(mask=mask, mask_kind=1 if v.masks else 0, key_padding=kpm, is_causal=v.masks)
    launches: list[tuple] = []
    with configs.compiling_for(arch, lambda *launch: launches.append(launch)):
        if v.kind == "fwd":
            sel = torch.empty(v.n_sel, device="meta", dtype=torch.int32) if v.n_sel else None
            forward(q, k, torch.empty_like(k), torch.empty_like(q), v.D ** -0.5, selected=sel,
                    want_stats=v.stats, **masks)
        else:
            qplan = plan_range(0, v.Nq, (v.Nq,), (v.Nq,)) if v.colsum else _plan(v.Nq, v.qgrid, v.pool)
            kplan = _plan(v.Nk, v.kgrid, v.pool)
            heads = torch.empty(1, v.H, device="meta", dtype=torch.int32)
            lse = torch.empty(1, v.H, v.Nq, device="meta", dtype=torch.float32)
            map_pass(q, k, lse, v.D ** -0.5, _meta_plan(qplan), _meta_plan(kplan), heads, **masks)
    return launches


def _compile(kernel, args: tuple, kwargs: dict, arch: int):
    """triton.compile with the signature, constants and attributes the runtime's binder derives."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


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


def _pipelining(ttgir: str, ptx: str) -> dict:
    """Loads Triton's software pipeliner turned into asynchronous copies (cp.async or TMA into
    shared memory) inside a loop body: those are issued for a later iteration while the current
    one computes, i.e. the loop's loads are pipelined. A loop whose loads stay plain ld.global
    waits for them at the top of every iteration."""
    depth, loop_depths, in_loop = 0, [], 0
    for line in ttgir.splitlines():
        if "scf.for" in line:
            loop_depths.append(depth)
        if re.search(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local", line) and loop_depths:
            in_loop += 1
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
    return {"loop_async_copies": in_loop, "pipelined": in_loop > 0, "wgmma": "wgmma.mma_async" in ptx}


def compile_all(arch: int, only: str | None = None) -> list[dict]:
    rows = []
    for v in VARIANTS:
        if only and only not in v.name:
            continue
        for kernel, grid, args, kwargs in _record_launches(v, arch):
            compiled = _compile(kernel, args, kwargs, arch)
            rows.append({"variant": v.name, "arch": f"sm_{arch}", "grid": list(grid),
                         "shared_bytes": compiled.metadata.shared, "num_warps": kwargs["num_warps"],
                         "num_stages": kwargs["num_stages"], "block_m": kwargs["BLOCK_M"], "block_n": kwargs["BLOCK_N"],
                         **_ptxas_usage(compiled.asm["ptx"], arch),
                         **_pipelining(compiled.asm["ttgir"], compiled.asm["ptx"])})
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
        print(f"{r['variant']:36s} {r['arch']} regs {r['registers']:3d} spill st/ld {r['spill_stores']}/{r['spill_loads']} "
              f"shared {r['shared_bytes']} tile {r['block_m']}x{r['block_n']} warps {r['num_warps']} "
              f"stages {r['num_stages']} pipelined {'yes' if r['pipelined'] else 'no'} wgmma {'yes' if r['wgmma'] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write_results:
        from attncap.report import replace_section

        replace_section(args.write_results, results_section(rows, args.arch))
    # Compiling succeeds past the shared-memory limit; the launch would fail on the GPU. Fail here.
    over = [r for r in rows if r["shared_bytes"] > configs.SHARED_LIMIT[args.arch]]
    for r in over:
        print(f"{r['variant']}: {r['shared_bytes']} bytes of shared memory, over sm_{args.arch}'s "
              f"{configs.SHARED_LIMIT[args.arch]}", file=sys.stderr)
    if over:
        sys.exit(1)


def results_section(rows: list[dict], arch: int) -> str:
    """Markdown: one row per variant."""
    lines = [f"## Kernel compile report (ptxas, sm_{arch}, no GPU needed)", "",
             f"{datetime.date.today().isoformat()}, triton {triton.__version__}, torch {torch.__version__}: "
             f"`python tools/compile_kernels.py --arch {arch} --write-results benchmarks/RESULTS.md` runs the real "
             "launchers on meta tensors at each shape (q, k, v as BSHD views, as diffusers passes them), compiles "
             "each launch with the runtime's own argument specialisation and launch config for this architecture, "
             "and reads ptxas -v. *pipelined*: Triton's software pipeliner turned the loop's loads into asynchronous "
             "copies issued ahead of the iteration that uses them (read from the TTGIR); *wgmma*: the dots use "
             "Hopper's warpgroup MMA. Compile facts, not timings.", "",
             "| variant | tile | warps | stages | registers | spills st/ld (B) | shared KiB | pipelined | wgmma |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['block_m']}x{r['block_n']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{'yes' if r['pipelined'] else 'no'} | {'yes' if r['wgmma'] else 'no'} |")
    flat = [r["variant"] for r in rows if not r["pipelined"]]
    lines += ["", f"Not pipelined: {', '.join(flat) if flat else 'none'}. (A head dim that is not a multiple of 16 "
              "elements, 40 or 72 in BSHD layout, gives the pointers no 16-byte alignment hint, so the forward's K/V "
              "loads stay synchronous; the map pass reads its own padded key copy and pipelines at every head dim.)"]
    spills = [r["variant"] for r in rows if r["spill_stores"] or r["spill_loads"]]
    over = [r["variant"] for r in rows if r["shared_bytes"] > configs.SHARED_LIMIT[arch]]
    lines += ["", f"Spilling variants: {', '.join(spills) if spills else 'none'}. Over sm_{arch}'s "
              f"{configs.SHARED_LIMIT[arch] // 1024} KiB of shared memory per block: {', '.join(over) if over else 'none'}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
