"""Launch settings per GPU architecture, and the one place the kernels are launched.

Tables instead of autotuning at run time: the same choice must work under TRITON_INTERPRET=1
(where autotuning would run every config through the slow interpreter) and must not time anything
inside a captured call. Under the interpreter one small config keeps the CPU tests quick while
still crossing tile boundaries. The GPU rows were chosen from the ptxas report of
tools/compile_kernels.py (registers, spills, shared memory, pipelined loads; benchmarks/RESULTS.md)
and are re-timed by benchmarks/gpu_kernels.py --sweep on a GPU (see the "GPU kernels" section).

Every launch goes through launch(): tools/compile_kernels.py records the launches the real
launchers make (on meta tensors, for a named target) and compiles exactly those, with the
runtime's own argument specialisation.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Shared memory per block (bytes): sm_80 163 KiB, sm_86/sm_89 99 KiB, sm_90 227 KiB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
INTERPRETER = LaunchConfig(32, 32, 4, 1)

# Forward, 16-bit inputs: (arch, head dim <= 128, entropy/peak) -> config. Hopper: BLOCK_N 128
# feeds wgmma long tiles (244-250 registers, no spills, 224 KiB of shared memory at 3 stages);
# the entropy term needs one more [BLOCK_M, BLOCK_N] value per thread, so with stats the key tile
# halves (with 128 it spills). Token columns live in the epilogue and change no tile size.
# fp32 inputs use exact (ieee, FMA) dots, which need small tiles.
FORWARD = {
    (90, True, False): LaunchConfig(128, 128, 8, 3),
    (90, True, True): LaunchConfig(128, 64, 8, 3),
    (90, False, False): LaunchConfig(128, 32, 8, 2),
    (90, False, True): LaunchConfig(128, 32, 8, 2),
    (80, True, False): LaunchConfig(128, 64, 8, 3),
    (80, True, True): LaunchConfig(128, 64, 8, 3),
    (80, False, False): LaunchConfig(64, 64, 4, 2),
    (80, False, True): LaunchConfig(64, 64, 4, 2),
    (89, True, False): LaunchConfig(128, 64, 8, 2),
    (89, True, True): LaunchConfig(128, 64, 8, 2),
    (89, False, False): LaunchConfig(64, 32, 4, 1),
    (89, False, True): LaunchConfig(64, 32, 4, 1),
}
FORWARD_FP32 = {90: LaunchConfig(32, 16, 4, 2), 80: LaunchConfig(32, 16, 4, 2), 89: LaunchConfig(32, 16, 4, 1)}
# Map pass: (arch, 16-bit inputs, head dim <= 128) -> config; block_m / block_n are query / key
# slots per tile.
MAP = {
    (90, True, True): LaunchConfig(128, 128, 8, 3),
    (90, True, False): LaunchConfig(128, 64, 8, 2),
    (90, False, True): LaunchConfig(32, 32, 4, 2),
    (90, False, False): LaunchConfig(32, 32, 4, 2),
    (80, True, True): LaunchConfig(128, 64, 8, 3),
    (80, True, False): LaunchConfig(64, 64, 4, 2),
    (80, False, True): LaunchConfig(32, 32, 4, 2),
    (80, False, False): LaunchConfig(32, 32, 4, 2),
    (89, True, True): LaunchConfig(128, 64, 8, 2),
    (89, True, False): LaunchConfig(64, 32, 4, 2),
    (89, False, True): LaunchConfig(32, 32, 4, 1),
    (89, False, False): LaunchConfig(32, 32, 4, 1),
}

_target: int | None = None  # set by compiling_for(): the architecture launches are planned for


def interpreting(device: torch.device) -> bool:
    return _target is None and (device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@lru_cache(maxsize=None)
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def arch_of(device: torch.device) -> int | None:
    """The row of the launch tables for ``device``: 90 for sm_90 and newer, 80 for sm_80, 89 for the
    rest (sm_86 and sm_89 share 99 KiB of shared memory per block); None under the interpreter."""
    if _target is not None:
        return _target
    if interpreting(device):
        return None
    arch = _device_arch(device.index if device.index is not None else torch.cuda.current_device())
    if arch >= 90:
        return 90
    return 80 if arch == 80 else 89


def forward_config(d: int, dv: int, stats: bool, device: torch.device, itemsize: int = 2) -> LaunchConfig:
    arch = arch_of(device)
    if arch is None:
        return INTERPRETER
    if itemsize > 2:
        return FORWARD_FP32[arch]
    return FORWARD[(arch, max(d, dv) <= 128, stats)]


def map_config(d: int, masked: bool, device: torch.device, itemsize: int = 2) -> LaunchConfig:
    """masked: a boolean/additive mask or causal masking; their index and mask loads need the
    registers of half a key tile (at 128 keys the sm_90 tile spills)."""
    arch = arch_of(device)
    if arch is None:
        return INTERPRETER
    cfg = MAP[(arch, itemsize == 2, d <= 128)]
    return LaunchConfig(cfg.block_m, 64, cfg.num_warps, cfg.num_stages) if masked and cfg.block_n > 64 else cfg


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors to fill (132 on H100 SXM / H200); 2 under the interpreter and for planned
    compiles, so the CPU tests exercise split reductions at small sizes."""
    if _target is not None or interpreting(device):
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_in_f32(x: torch.Tensor) -> bool:
    """Upcast dot operands to fp32: only for bf16 under the interpreter, whose bf16 tl.dot returns
    garbage (numpy has no bfloat16). On GPUs bf16 dots run on the tensor cores as usual."""
    return x.dtype == torch.bfloat16 and interpreting(x.device)


def strides_or_zeros(x: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """Strides of an optional tensor argument; zeros stand in when it is absent."""
    return tuple(x.stride()) if x is not None else (0,) * n


Recorder = Callable[[object, tuple, tuple, dict], None]
_recorder: Recorder | None = None


def launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs), or hand the launch to the recorder of compiling_for()."""
    if _recorder is not None:
        _recorder(kernel, grid, args, kwargs)
        return
    kernel[grid](*args, **kwargs)


@contextmanager
def compiling_for(arch: int, recorder: Recorder) -> Iterator[None]:
    """Plan launches for GPU architecture ``arch`` and pass them to ``recorder`` instead of running
    them (tools/compile_kernels.py: the launchers run on meta tensors, nothing executes)."""
    global _target, _recorder
    saved = _target, _recorder
    _target, _recorder = (90 if arch >= 90 else 80 if arch == 80 else 89), recorder
    try:
        yield
    finally:
        _target, _recorder = saved
