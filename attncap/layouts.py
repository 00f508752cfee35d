"""Token axes as the kernels see them: which tokens, in which order, grouped into which bins.

An AxisSpec names an axis in plain numbers (a token range or a list of indices, an optional grid,
an optional pool): hashable, cheap, and traceable by torch.compile. Its AxisPlan holds the index
arrays the kernels read; attncap.ops builds each plan once per device and caches it. Slots are the tokens the product covers, sorted bin-major, so every bin is one
contiguous run of slots; a kernel program owning a run of bins reads a contiguous run of slots and
needs no atomics. Bins may hold different numbers of tokens (grids that pooling factors do not
divide), so a pooled value is a sum divided by the bin's count.

Shape legend: L slots (tokens covered), nb bins.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

Pool = int | Sequence[int] | None


def as_int(x, name: str) -> int:
    """``x`` as a plain int. operator.index, not int(): under torch.compile an int that Dynamo traces
    symbolically (a size, or a closure's int with dynamic=True) is specialised here, since plans
    hold plain numbers; int() would keep it symbolic."""
    if isinstance(x, (float, str, bool)):
        raise TypeError(f"{name} takes integers; got {x!r}")
    return operator.index(x)


def normalize_grid(grid: Sequence[int] | None, length: int, name: str) -> tuple[int, ...] | None:
    """Check that a (t,) h, w grid covers exactly ``length`` tokens and return it as a tuple."""
    if grid is None:
        return None
    dims = tuple(as_int(g, name) for g in grid)
    if not 1 <= len(dims) <= 3 or any(g < 1 for g in dims):
        raise ValueError(f"{name} must be 1 to 3 positive sizes such as (h, w) or (t, h, w); got {tuple(grid)}")
    if math.prod(dims) != length:
        raise ValueError(
            f"{name}={dims} holds {math.prod(dims)} tokens but its range holds {length}; "
            f"give a grid whose sizes multiply to {length}"
        )
    return dims


def normalize_pool(grid: tuple[int, ...] | None, pool: Pool, name: str) -> tuple[int, ...] | None:
    """Per-axis pool factors. An int pools the last two axes (h, w) and leaves t alone."""
    if pool is None:
        return None
    if grid is None:
        raise ValueError(f"{name} needs a grid for its axis (query_grid / key_grid), e.g. (h, w)")
    if isinstance(pool, int):
        factors = tuple([1] * max(0, len(grid) - 2) + [as_int(pool, name)] * min(2, len(grid)))
    else:
        factors = tuple(as_int(p, name) for p in pool)
    if len(factors) != len(grid) or any(f < 1 for f in factors):
        raise ValueError(
            f"{name}={pool!r} does not fit grid {grid}: give a positive int or {len(grid)} positive factors"
        )
    return factors


def pooled_grid(grid: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-g // f) for g, f in zip(grid, factors))


@dataclass(frozen=True)
class AxisPlan:
    """One token axis of a product.

    perm        int32 [L]     absolute token index of each slot, bin-major
    bin_of_slot int32 [L]     bin of each slot (non-decreasing)
    bin_start   int32 [nb+1]  first slot of each bin; bin b is slots bin_start[b]:bin_start[b+1]
    counts      float32 [nb]  tokens per bin
    pooled      False when every bin is one token (the kernels then skip the pooling step)
    grid        the bin grid ((t,) h, w after pooling) or None for a flat axis
    max_bin     tokens in the largest bin, as a Python int: launchers size tiles by it without
                reading a device tensor (no host sync)
    """

    perm: torch.Tensor
    bin_of_slot: torch.Tensor
    bin_start: torch.Tensor
    counts: torch.Tensor
    pooled: bool
    grid: tuple[int, ...] | None
    max_bin: int

    @property
    def nbins(self) -> int:
        return self.counts.numel()

    @property
    def nslots(self) -> int:
        return self.perm.numel()

    def max_bin_size(self) -> int:
        return self.max_bin


class AxisSpec(NamedTuple):
    """One token axis in plain numbers: the tokens start:stop, row-major on ``grid`` and pooled by
    per-axis ``factors`` (None: unpooled), or explicit tokens ``indices`` (selected queries, unpooled).
    A tuple of ints, so it hashes, prints as a literal (attncap.ops passes it to its custom ops as
    text) and costs torch.compile no graph break."""

    start: int
    stop: int
    grid: tuple[int, ...] | None = None
    factors: tuple[int, ...] | None = None
    indices: tuple[int, ...] | None = None

    @property
    def pooled(self) -> bool:
        return self.indices is None and self.factors is not None and any(f > 1 for f in self.factors)

    @property
    def nbins(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        return math.prod(pooled_grid(self.grid, self.factors)) if self.pooled else self.stop - self.start

    @property
    def nslots(self) -> int:
        return len(self.indices) if self.indices is not None else self.stop - self.start

    def plan(self) -> AxisPlan:
        """The index arrays, on the CPU."""
        if self.indices is not None:
            return plan_indices(self.indices)
        return plan_range(self.start, self.stop, self.grid, self.factors)


def sum_bins(x: torch.Tensor, index: torch.Tensor, nbins: int) -> torch.Tensor:
    """x [B, G, L, ...] summed into bins along dim 2: [B, G, nbins, ...], slot l into bin index[l]
    (int32 or int64 [L]), each bin summed in slot order. On the CPU by scatter_add_: index_add_ there
    adds slice by slice when the binned dim is the innermost, many times slower for thousands of
    slots, and scatter_add_ adds in the same order, so the sums are the same bits. Elsewhere by
    index_add_ (deterministic under torch.use_deterministic_algorithms)."""
    out = x.new_zeros(x.shape[:2] + (nbins,) + x.shape[3:])
    if x.device.type != "cpu":
        return out.index_add_(2, index, x)
    shape = (1, 1, -1) + (1,) * (x.dim() - 3)
    return out.scatter_add_(2, index.long().reshape(shape).expand(x.shape), x)


def plan_indices(indices: Sequence[int]) -> AxisPlan:
    """An unpooled axis over explicit token indices (selected queries)."""
    idx = torch.tensor(list(indices), dtype=torch.int32)
    n = idx.numel()
    slots = torch.arange(n, dtype=torch.int32)
    return AxisPlan(idx, slots, torch.arange(n + 1, dtype=torch.int32), torch.ones(n), False, None, 1)


def plan_range(start: int, stop: int, grid: tuple[int, ...] | None, factors: tuple[int, ...] | None) -> AxisPlan:
    """The tokens start:stop, laid out row-major on ``grid``, pooled by ``factors`` (or not)."""
    length = stop - start
    if factors is None or all(f == 1 for f in factors):
        return AxisPlan(torch.arange(start, stop, dtype=torch.int32), torch.arange(length, dtype=torch.int32),
                        torch.arange(length + 1, dtype=torch.int32), torch.ones(length), False, grid, 1)
    coords = torch.unravel_index(torch.arange(length), grid)
    bins_per_axis = pooled_grid(grid, factors)
    bin_id = torch.zeros(length, dtype=torch.int64)
    for coord, f, nb in zip(coords, factors, bins_per_axis):
        bin_id = bin_id * nb + torch.div(coord, f, rounding_mode="floor")
    order = torch.sort(bin_id, stable=True).indices
    counts = torch.bincount(bin_id, minlength=math.prod(bins_per_axis))
    bin_start = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    bin_start[1:] = torch.cumsum(counts, 0)
    # The first bin along each axis is the largest: min(f, g) tokens per axis.
    max_bin = math.prod(min(f, g) for f, g in zip(factors, grid))
    return AxisPlan((order + start).to(torch.int32), bin_id[order].to(torch.int32), bin_start.to(torch.int32),
                    counts.to(torch.float32), True, bins_per_axis, max_bin)
