"""End-to-end denoising step of a WAN 2.1 14B-shaped transformer, with and without attention capture.

    python benchmarks/e2e_wan.py --device cuda --write-results   # the GPU run: 40 layers, bf16, 480p x 81 frames
    python benchmarks/e2e_wan.py --tiny                          # a tiny float32 model on CPU, a few seconds

Builds diffusers.WanTransformer3DModel from WAN 2.1 T2V 14B's config with random weights (nothing is
downloaded): bf16 on CUDA, created on the GPU itself, with the modules diffusers keeps in fp32 when it
loads the real checkpoint in bf16 (norm2, time_embedder, scale_shift_table) in fp32. Times one
transformer forward under torch.inference_mode (one denoising step, batch 1, no CFG) at 480p, 81
frames: latents [1, 16, 21, 60, 104] -> (1, 2, 2) patches -> 21x30x52 = 32,760 video tokens, text
[1, 512, 4096]. The shape flags scale it (--frames-latent, --height-latent, --width-latent, --text-len,
--layers). Modes, one after the other on the same model and inputs:

    off          no capture
    tokens       attncap.capture(model, relations="video->text", tokens=range(16), layers="*attn2*"):
                 maps of 16 text tokens in every cross-attention layer
    pooled_self  attncap.capture(model, relations="video->video", pool=(1, 4, 4), layers="*attn1*"):
                 pooled self-attention maps of every layer
    naive        every self-attention layer: SDPA for the output, then softmax(Q K^T * scale) in fp32 for
                 the head-mean map (what eager capture tools do), kept on the CPU. It holds two fp32
                 [B, H, N, N] tensors at once; where they do not fit, its row says "out of memory (would
                 need X GiB)" (caught on CUDA; refused beforehand on CPU, where the attempt could take
                 the machine's memory).

Each mode: 1 untimed warm-up call, then --repeats timed calls, each in a fresh capture block whose
store is the one step's maps (installing processors happens once per pipeline run, not per step, so
only the forward is timed). CUDA: CUDA events; peak extra = torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus the bytes allocated before the call. CPU: time.perf_counter, no peak.
Overhead: a mode's median against the median of "off" from the same run.

Writes benchmarks/results-e2e-<device>.json (results-e2e-<device>-tiny.json with --tiny; --out
overrides). --write-results replaces the "## End-to-end WAN 2.1 14B-shaped step" section of
benchmarks/RESULTS.md (--results overrides the path), or appends it; the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # last: the checkout's kernels/ must not hide Hugging Face's "kernels"

import attncap  # noqa: E402
from attncap.intercept import intercept_sdpa  # noqa: E402
from attncap.report import replace_section  # noqa: E402
from attncap.store import Record, Store  # noqa: E402

GiB, MiB = 2**30, 2**20
HEADING = "## End-to-end WAN 2.1 14B-shaped step"
REAL_LAYERS = 40
# WAN 2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json), checked against the
# WanTransformer3DModel constructor of diffusers 0.42.
WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=REAL_LAYERS, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
TINY = dict(WAN14B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2)
# 480x832, 81 frames: the VAE takes 4x temporal (1 + 80 / 4 = 21) and 8x spatial compression.
FULL_SHAPE = dict(frames_latent=21, height_latent=60, width_latent=104, text_len=512)
TINY_SHAPE = dict(frames_latent=3, height_latent=8, width_latent=8, text_len=16)  # the 16 token maps fit
TOKENS = list(range(16))
CROSS_LAYERS, SELF_LAYERS = "*attn2*", "*attn1*"
MODES = {
    "off": "no capture",
    "tokens": f'attncap.capture(relations="video->text", tokens=range(16), layers="{CROSS_LAYERS}")',
    "pooled_self": f'attncap.capture(relations="video->video", pool=(1, 4, 4), layers="{SELF_LAYERS}")',
    "naive": "SDPA + fp32 softmax(QK^T * scale), head-mean map kept, every self-attention layer",
}
# Room left for activations when suggesting --layers: a full-size step's largest live tensors
# (the FFN's [32760, 13824] bf16 intermediates, the residual stream) take a few GiB.
ACTIVATION_HEADROOM = 8 * GiB


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one; cpu with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny float32 config and shapes (a smoke run)")
    ap.add_argument("--layers", type=int, default=None, help=f"transformer blocks (WAN 2.1 14B has {REAL_LAYERS})")
    ap.add_argument("--frames-latent", type=int, default=None, help="latent frames (default 21: 81 frames)")
    ap.add_argument("--height-latent", type=int, default=None, help="latent height (default 60: 480 px)")
    ap.add_argument("--width-latent", type=int, default=None, help="latent width (default 104: 832 px)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 512)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per mode, after one warm-up")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results-e2e-<device>.json)")
    ap.add_argument("--write-results", action="store_true", help="replace this benchmark's RESULTS.md section")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"), help="the RESULTS.md to update")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    for key, value in (TINY_SHAPE if args.tiny else FULL_SHAPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def model_config(args: argparse.Namespace) -> dict:
    config = dict(TINY if args.tiny else WAN14B)
    if args.layers is not None:
        config["num_layers"] = args.layers
    return config


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight WanTransformer3DModel, its parameters created on ``device`` in ``dtype``: 14B
    parameters never pass through CPU memory, nor through an fp32 copy on the GPU."""
    from diffusers import WanTransformer3DModel

    with torch.device(device), default_dtype(dtype):
        model = WanTransformer3DModel(**config)
    # from_pretrained(torch_dtype=bf16) keeps these in fp32; the blocks' fp32 modulation relies on it.
    keep = set(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keep & set(name.split(".")):
                param.data = param.data.float()
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def available_bytes(device: str) -> int:
    """Free memory where the tensors go: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib * 1024


def check_weights_fit(meta_model: torch.nn.Module, device: str, layers: int) -> None:
    """Refuse, before building anything, a model whose weights alone pass the free memory, and say
    how many layers would fit."""
    need, free = weight_bytes(meta_model), available_bytes(device)
    if need <= free:
        return
    per_block = weight_bytes(meta_model.blocks[0])
    fit = max(1, int((free - ACTIVATION_HEADROOM - (need - layers * per_block)) // per_block))
    raise SystemExit(f"the weights of {layers} layers need {need / GiB:.1f} GiB but {device} has {free / GiB:.1f} GiB "
                     f"free; try --layers {fit}")


def make_inputs(args: argparse.Namespace, config: dict, device: str, dtype: torch.dtype) -> dict:
    latents = (1, config["in_channels"], args.frames_latent, args.height_latent, args.width_latent)
    return dict(hidden_states=torch.randn(latents, device=device, dtype=dtype),
                # The pipeline passes the scheduler's float32 timestep, expanded to the batch.
                timestep=torch.full((1,), 500.0, device=device),
                encoder_hidden_states=torch.randn(1, args.text_len, config["text_dim"], device=device, dtype=dtype),
                return_dict=False)


def attention_layers(model: torch.nn.Module, pattern: str) -> list[tuple[str, torch.nn.Module]]:
    """Attention modules matching a glob, named as attncap names a bare model's layers."""
    return [(f"transformer.{name}", m) for name, m in model.named_modules()
            if hasattr(m, "processor") and fnmatch.fnmatchcase(f"transformer.{name}", pattern)]


class NaiveMapProcessor:
    """The Wan processor with its SDPA call replaced by SDPA for the output plus the full fp32
    probabilities for the head-mean map, filed in a Store as a "map" record."""

    def __init__(self, original: Any, layer: str, store: Store):
        self.original = original
        self.layer = layer
        self.store = store

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        with intercept_sdpa(self._attend):
            return self.original(attn, *args, **kwargs)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        # Called inside the intercepting mode's handler, so this SDPA runs unintercepted.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        probs = torch.softmax(query.float() @ key.float().transpose(-1, -2) * scale, dim=-1)  # [B, H, Nq, Nk]
        self.store.add(Record(self.layer, 0, None, "video->video", "map", None, probs.mean(1, keepdim=True)))
        return out


@contextmanager
def naive_capture(model: torch.nn.Module, pattern: str) -> Iterator[Store]:
    store = Store(offload="cpu", max_bytes=None)
    swapped = [(module, module.processor) for _, module in attention_layers(model, pattern)]
    try:
        for layer, module in attention_layers(model, pattern):
            module.processor = NaiveMapProcessor(module.processor, layer, store)
        yield store
    finally:  # also after an out-of-memory error mid-forward: the next mode gets the original processors
        for module, original in swapped:
            module.processor = original


def open_mode(mode: str, model: torch.nn.Module) -> ContextManager[Store | None]:
    if mode == "tokens":
        return attncap.capture(model, relations="video->text", tokens=TOKENS, layers=CROSS_LAYERS)
    if mode == "pooled_self":
        return attncap.capture(model, relations="video->video", pool=(1, 4, 4), layers=SELF_LAYERS)
    if mode == "naive":
        return naive_capture(model, SELF_LAYERS)
    return nullcontext()


def mode_layers(mode: str) -> str | None:
    return {"tokens": CROSS_LAYERS, "pooled_self": SELF_LAYERS, "naive": SELF_LAYERS}.get(mode)


def naive_need(config: dict, tokens: int, layers: int) -> tuple[int, int]:
    """(working bytes, kept bytes) of the naive mode: two fp32 [1, H, N, N] tensors at once in one
    layer, and a [1, 1, N, N] fp32 map kept per self-attention layer."""
    working = 2 * config["num_attention_heads"] * tokens * tokens * 4
    return working, layers * tokens * tokens * 4


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory ...").
    return isinstance(error, RuntimeError) and "allocate" in str(error).lower()


def timed_call(fn: Callable[[], Any], device: str) -> tuple[float, int | None]:
    """(milliseconds, peak extra bytes on CUDA or None) of one call."""
    gc.collect()
    if not device.startswith("cuda"):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated() - base


def run_mode(mode: str, model: torch.nn.Module, inputs: dict, device: str, repeats: int) -> dict:
    """One warm-up and ``repeats`` timed forwards of one mode; the store of the last call is reported."""
    times: list[float] = []
    peaks: list[int] = []
    store = None
    with torch.inference_mode():
        for call in range(1 + repeats):
            with open_mode(mode, model) as store:
                ms, peak = timed_call(lambda: model(**inputs), device)
            if call:  # the first call compiles kernels and warms caches: untimed
                times.append(ms)
                peaks.append(peak)
    p20, median, p80 = np.percentile(times, [20, 50, 80])
    row = dict(mode=mode, status="ok", times_ms=[round(t, 3) for t in times], median_ms=round(float(median), 3),
               p20_ms=round(float(p20), 3), p80_ms=round(float(p80), 3),
               peak_extra_bytes=None if None in peaks else max(peaks))
    if store is not None:
        row.update(store_bytes=store.nbytes, records=len(store), relations=sorted({r.relation for r in store}))
    return row


def measure_mode(mode: str, model: torch.nn.Module, inputs: dict, device: str, repeats: int, config: dict,
                 tokens: int) -> dict:
    """run_mode, or the row of a mode that does not fit in memory."""
    layers = mode_layers(mode)
    row: dict = dict(mode=mode, description=MODES[mode])
    if layers is not None:
        row["layers"] = len(attention_layers(model, layers))
    need = None
    if mode == "naive":
        working, kept = naive_need(config, tokens, row["layers"])
        need = working if device.startswith("cuda") else working + kept  # the kept maps go to host memory
        row["need_bytes"] = need
        if not device.startswith("cuda") and need > available_bytes(device):
            return dict(row, status=f"out of memory (would need {need / GiB:.1f} GiB)")
    try:
        return dict(row, **run_mode(mode, model, inputs, device, repeats))
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
        if not is_oom(error):
            raise
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dict(row, status="out of memory" + (f" (would need {need / GiB:.1f} GiB)" if need else ""))


def add_overheads(rows: list[dict]) -> None:
    """Each measured mode's median against the "off" median of the same run, in percent."""
    off = next(r for r in rows if r["mode"] == "off")
    for row in rows:
        if row["status"] == "ok":
            row["overhead_pct"] = round(100.0 * (row["median_ms"] / off["median_ms"] - 1.0), 2)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return f"{model}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return dict(torch=torch.__version__, triton=triton_version, diffusers=diffusers.__version__,
                attncap=attncap.__version__)


def table(rows: list[dict]) -> list[str]:
    def gib(v: int | None) -> str:
        return "-" if v is None else f"{v / GiB:.2f}"

    lines = ["| mode | median ms | p20-p80 ms | overhead vs off | peak extra GiB | store MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        store = f"{r['store_bytes'] / MiB:.3g}" if "store_bytes" in r else "-"
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['status']} | - | - | - | - |")
            continue
        lines.append(f"| {r['mode']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
                     f"{r['overhead_pct']:+.1f}% | {gib(r['peak_extra_bytes'])} | {store} |")
    return lines


def describe(doc: dict) -> str:
    c = doc["config"]
    layers = c["model"]["num_layers"]
    used = f"{layers} of WAN 2.1 14B's {REAL_LAYERS} layers" if layers < REAL_LAYERS else f"{layers} layers"
    if c["tiny"]:
        used = f"a tiny config ({layers} layers, {c['model']['num_attention_heads']} heads of "
        used += f"{c['model']['attention_head_dim']}), not the 14B shapes"
    return (f"{used}, {c['params']:,} parameters ({c['weight_bytes'] / GiB:.3g} GiB, {c['dtype']}) on "
            f"{c['device']}; latents {c['latents']} -> {'x'.join(map(str, c['grid']))} = {c['video_tokens']:,} video "
            f"tokens, text {c['text']}")


def results_section(doc: dict) -> str:
    v = doc["versions"]
    lines = [HEADING, "",
             "One denoising step (the transformer forward, batch 1, no CFG) of `diffusers.WanTransformer3DModel` "
             f"with random weights: {describe(doc)}. Modes: `tokens` = {MODES['tokens']}; `pooled_self` = "
             f"{MODES['pooled_self']}; `naive` = {MODES['naive']}. Median and p20-p80 of "
             f"{doc['config']['repeats']} calls after one warm-up, each in a fresh capture block (only the forward "
             "is timed); overhead against `off` in the same run. Peak extra: max_memory_allocated after "
             "reset_peak_memory_stats minus the allocated bytes before the call (CUDA only). Store: bytes of the "
             "maps one step keeps (on the CPU).",
             "", *table(doc["rows"]), "",
             f"Device: {doc['device_name']} | torch {v['torch']} | triton {v['triton']} | diffusers {v['diffusers']} "
             f"| attncap {v['attncap']} | {doc['date']}", "",
             f"Command: `{doc['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = args.device
    # bf16 is the real model's inference dtype on the GPU; CPU matmuls are fp32 (bf16 is slow there).
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = model_config(args)
    meta = build_model(config, "meta", dtype)
    check_weights_fit(meta, device, config["num_layers"])
    if config["num_layers"] < REAL_LAYERS and not args.tiny:
        print(f"using {config['num_layers']} of WAN 2.1 14B's {REAL_LAYERS} layers (--layers)")

    torch.manual_seed(0)
    model = build_model(config, device, dtype)
    inputs = make_inputs(args, config, device, dtype)
    patch = config["patch_size"]
    grid = [args.frames_latent // patch[0], args.height_latent // patch[1], args.width_latent // patch[2]]
    tokens = math.prod(grid)
    doc = dict(device=device, device_name=device_name(device), versions=versions(),
               date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M UTC"),
               command=shlex.join(["python", "benchmarks/e2e_wan.py", *argv]),
               config=dict(model={**config, "patch_size": list(patch)}, tiny=args.tiny, device=device,
                           dtype=str(dtype).removeprefix("torch."), params=sum(p.numel() for p in meta.parameters()),
                           weight_bytes=weight_bytes(meta), latents=list(inputs["hidden_states"].shape),
                           text=list(inputs["encoder_hidden_states"].shape), grid=grid, video_tokens=tokens,
                           repeats=args.repeats))
    print(describe(doc))
    rows = []
    for mode in MODES:
        rows.append(measure_mode(mode, model, inputs, device, args.repeats, config, tokens))
        print(f"{mode}: {rows[-1]['status']}" + (f", median {rows[-1]['median_ms']:.1f} ms" if "median_ms" in rows[-1]
                                                   else ""), flush=True)
    add_overheads(rows)
    doc["rows"] = rows

    suffix = "-tiny" if args.tiny else ""
    out = args.out or os.path.join(HERE, f"results-e2e-{device.split(':')[0]}{suffix}.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print("\n".join(table(rows)))
    print("wrote", out)
    if args.write_results:
        print("updated", replace_section(args.results, results_section(doc)))
    return doc


if __name__ == "__main__":
    main()
