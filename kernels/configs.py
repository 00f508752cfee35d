"""Block sizes and launch settings.

Fixed heuristics instead of autotuning: the same choice must work under TRITON_INTERPRET=1 (where
autotuning would run every config through the slow interpreter) and on any GPU. Under the
interpreter small blocks keep the CPU tests quick while still crossing tile boundaries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def dot_in_f32(x: torch.Tensor) -> bool:
    """Upcast dot operands to fp32: only for bf16 under the interpreter, whose bf16 tl.dot returns
    garbage (Triton 3.9: numpy has no bfloat16). On GPUs bf16 dots run on the tensor cores as usual."""
    return x.dtype == torch.bfloat16 and interpreting(x.device)


# Shared memory per block: sm_80 allows 163 KiB, sm_90 227 KiB. fp32 tiles are twice as large as
# fp16/bf16 ones; the 16-bit configs below would need 256 KiB with fp32 inputs at D = 65..128.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def forward_config(d: int, dv: int, n_sel: int, device: torch.device, itemsize: int = 2) -> LaunchConfig:
    """Chosen from the sm_90 register and shared-memory report of tools/compile_kernels.py: no spills
    at D <= 128 for 16-bit inputs; fp32 inputs (itemsize 4) take smaller tiles to fit sm_80's shared memory."""
    if interpreting(device):
        return LaunchConfig(32, 32, 4, 1)
    if itemsize > 2:
        return LaunchConfig(64, 32, 8, 2)
    if max(d, dv) > 128:
        return LaunchConfig(64, 32, 8, 2)
    # A token-column accumulator of up to 128 fp32 columns sits beside the output accumulator:
    # halve the query block and the key block so both fit in registers.
    if n_sel > 32:
        return LaunchConfig(64, 32, 8, 3)
    return LaunchConfig(128, 64, 8, 3)


def map_config(d: int, pooled_q: bool, pooled_k: bool, device: torch.device) -> LaunchConfig:
    """block_m / block_n are query / key slots per tile; bins per tile are chosen by the launcher."""
    if interpreting(device):
        return LaunchConfig(32, 32, 4, 1)
    if d > 128:
        return LaunchConfig(64, 32, 8, 2)
    return LaunchConfig(64, 64, 8, 3)


def strides_or_zeros(x: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """Strides of an optional tensor argument; zeros stand in when it is absent."""
    return tuple(x.stride()) if x is not None else (0,) * n
