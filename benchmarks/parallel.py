"""Capture under context parallelism: bytes communicated and overhead, measured on gloo ranks.

Two local gloo ranks (one thread each) run a Wan-shaped transformer under diffusers' Ulysses and
ring CP, without capture and with capture of every layer (video->video pooled (1, 4, 4) head-mean
map + colsum + entropy; video->text map), and one process runs the same model with and without
capture. attncap's collectives are counted by wrapping torch.distributed in its parallel module:
the bytes of the products' reduce per captured call, and the bytes of the attention's own
exchange of q, k, v (Ulysses all-to-all, ring all-gather), which replaces the backend's own one
for captured calls. Then the same counts are computed for 8 GPUs at WAN 2.1 14B 480p and 720p.

    python benchmarks/parallel.py [--write-results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

GRID = (4, 16, 16)      # latent frames x (h, w) tokens after the (1, 2, 2) patch: 1024 tokens
HEADS, HEAD_DIM, TEXT, LAYERS = 4, 32, 64, 2
OPTIONS = dict(relations=("video->video", "video->text"), pool=(1, 4, 4), stats=("colsum", "entropy"))
REPEATS = 5


def _model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=64).eval()


def _call(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=g)
    text = torch.randn(1, TEXT, 32, generator=g)
    return lambda: model(x, torch.tensor([600.0]), text, return_dict=False)[0]


def _timed(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class _Counter:
    """Counts the bytes attncap's parallel module hands to torch.distributed, by collective."""

    def __init__(self, dist):
        self.dist, self.bytes = dist, {}

    def __getattr__(self, name):
        real = getattr(self.dist, name)
        if name not in ("reduce", "all_reduce", "all_gather", "all_to_all_single"):
            return real

        def counted(*args, **kwargs):
            tensor = args[1] if name in ("all_gather", "all_to_all_single") else args[0]
            self.bytes[name] = self.bytes.get(name, 0) + tensor.numel() * tensor.element_size()
            return real(*args, **kwargs)

        return counted


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import attncap
    from attncap.integrations import parallel

    torch.accelerator.device_count = lambda: 1   # CPU ranks (see tests/test_parallel.py)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    counter = _Counter(dist)
    parallel.dist = counter
    rows = {}
    for name, ulysses, ring in (("ulysses", world, 1), ("ring", 1, world)):
        model = _model()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        call = _call(model)
        with torch.no_grad():
            plain = _timed(call) if ring == 1 else None   # diffusers' native ring needs an LSE (none on CPU)
            counter.bytes = {}
            with attncap.capture(model, **OPTIONS) as store:
                captured = _timed(call)
        calls = (REPEATS + 1) * LAYERS * 2
        rows[name] = {"plain_s": plain, "captured_s": captured,
                      "bytes_per_call": {k: v / calls for k, v in counter.bytes.items()},
                      "records": len(store.records)}
    if rank == 0:
        model = _model()
        call = _call(model)
        with torch.no_grad():
            single = _timed(call)
            with attncap.capture(model, **OPTIONS):
                single_captured = _timed(call)
        rows["single"] = {"plain_s": single, "captured_s": single_captured}
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def wan_figures(tokens_grid: tuple[int, int, int], ranks: int = 8, heads: int = 40, head_dim: int = 128,
                text: int = 512) -> dict:
    """Bytes per rank and captured layer call at a WAN shape (bf16 activations, fp32 products)."""
    n = math.prod(tokens_grid)
    bins = math.prod(-(-g // f) for g, f in zip(tokens_grid, (1, 4, 4)))
    self_products = (bins * bins + 2 * bins) * 4           # pooled head-mean map + colsum + entropy
    cross_products = bins * text * 4                        # video->text map over all text keys
    qkv_a2a = 3 * (n // ranks) * heads * head_dim * 2 * (ranks - 1) / ranks   # what Ulysses sends per rank
    return {"tokens": n, "bins": bins, "self_products_MiB": self_products / 2**20,
            "cross_products_MiB": cross_products / 2**20, "ulysses_qkv_MiB": qkv_a2a / 2**20}


def _section(rows: dict) -> str:
    import diffusers

    mib = lambda b: f"{b / 2**20:.3f}"
    lines = ["## Capture under context parallelism (gloo, CPU)", "",
             f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores, shared with other work), torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}, `python benchmarks/parallel.py --write-results`: 2 gloo ranks of one thread, "
             f"a Wan transformer of {LAYERS} blocks, {HEADS} heads x {HEAD_DIM}, video grid {GRID} "
             f"({math.prod(GRID)} tokens), {TEXT} text tokens; capture of every layer: video->video pooled (1, 4, 4) "
             "head-mean map + colsum + entropy, video->text map. Median of 5 forwards.", "",
             "| run | forward (s) | captured (s) | captured / plain | attncap bytes per captured call |",
             "|---|---|---|---|---|"]
    single = rows["single"]
    lines.append(f"| one process | {single['plain_s']:.4f} | {single['captured_s']:.4f} | "
                 f"{single['captured_s'] / single['plain_s']:.2f}x | 0 |")
    for name in ("ulysses", "ring"):
        r = rows[name]
        per = ", ".join(f"{k} {mib(v)} MiB" for k, v in sorted(r["bytes_per_call"].items()))
        plain = f"{r['plain_s']:.4f}" if r["plain_s"] else "n/a (no CPU LSE)"
        ratio = f"{r['captured_s'] / r['plain_s']:.2f}x" if r["plain_s"] else \
            f"{r['captured_s'] / single['captured_s']:.2f}x of one process captured"
        lines.append(f"| 2 ranks, {name} | {plain} | {r['captured_s']:.4f} | {ratio} | {per} |")
    lines += ["", "`reduce` is the products (to rank 0); `all_to_all_single` / `all_gather` move q, k, v as the "
              "backend would have for that call (Ulysses all-to-all, ring all-gather), not in addition to it. "
              "Gloo on one CPU measures correctness and bytes, not GPU interconnect time.", "",
              "Computed for 8 GPUs, WAN 2.1 14B (40 heads x 128, bf16), per rank and captured layer call:", "",
              "| shape | tokens | pooled (1,4,4) bins | self products (map+colsum+entropy) | cross products "
              "(video->text, 512) | Ulysses' own q,k,v all-to-all |", "|---|---|---|---|---|---|"]
    for label, grid in (("480p, 81 frames", (21, 30, 52)), ("720p, 81 frames", (21, 45, 80))):
        f = wan_figures(grid)
        lines.append(f"| {label} | {f['tokens']} | {f['bins']} | {f['self_products_MiB']:.1f} MiB | "
                     f"{f['cross_products_MiB']:.1f} MiB | {f['ulysses_qkv_MiB']:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-results", action="store_true", help="put the section into benchmarks/RESULTS.md")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "rows.json"))
        mp.start_processes(_worker, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
        rows = json.loads(Path(out).read_text())
    section = _section(rows)
    print(section)
    if args.write_results:
        sys.path.append(str(Path(__file__).resolve().parent.parent))
        from attncap.report import replace_section

        replace_section(Path(__file__).resolve().parent / "RESULTS.md", section)


if __name__ == "__main__":
    main()
