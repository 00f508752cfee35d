"""Token axes laid out for the map pass: bin-major slots, each bin padded to a fixed run.

An AxisPlan (attncap/layouts.py) lists an axis' tokens bin-major, bins of any size. The map pass
wants every tile of BLOCK slots to hold whole bins at fixed offsets, so that pooling is a product
with a one-hot matrix built from the slot number alone (no index loads in the key loop):

    bin_slots P = the largest bin (1 for an unpooled axis); bins_per_tile = BLOCK // P;
    bin b starts at slot (b // bins_per_tile) * BLOCK + (b % bins_per_tile) * P.
    A bin larger than a tile spans ``span`` = cdiv(P, BLOCK) whole tiles of its own.

Slots past a bin's count, and past the last bin, are padding: token -1. Built with device ops only
(no host reads of device values), from host sizes.

Shape legend: L padded slots (n_tiles * block), nb bins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class SlotLayout:
    tok: torch.Tensor    # int32 [L]: token of each slot, -1 for padding
    block: int           # slots per tile
    bin_slots: int       # slots of one bin inside a tile (= block when a bin spans tiles)
    bins_per_tile: int
    span: int            # tiles per bin
    n_tiles: int
    nbins: int
    padded: bool         # some slot is padding

    @property
    def pooled(self) -> bool:
        return self.bin_slots > 1

    @property
    def bins_width(self) -> int:
        """Columns of the pooled tile: a power of two >= 16 (tl.dot's smallest), or the tile itself."""
        return self.block if not self.pooled else max(16, triton.next_power_of_2(self.bins_per_tile))


def lay_out(plan, block: int) -> SlotLayout:
    """The SlotLayout of AxisPlan ``plan`` in tiles of ``block`` slots."""
    nbins, nslots = plan.nbins, plan.nslots
    biggest = plan.max_bin_size() if plan.pooled else 1
    if biggest <= block:
        per_tile, span, bin_slots = block // biggest, 1, biggest
    else:
        per_tile, span, bin_slots = 1, triton.cdiv(biggest, block), block
    n_tiles = triton.cdiv(nbins, per_tile) * span
    bins = plan.bin_of_slot.long()
    rank = torch.arange(nslots, device=bins.device) - plan.bin_start.long()[bins]
    pos = (bins // per_tile) * (span * block) + (bins % per_tile) * biggest + rank
    tok = torch.full((n_tiles * block,), -1, dtype=torch.int32, device=bins.device)
    tok[pos] = plan.perm.to(torch.int32)
    return SlotLayout(tok, block, bin_slots, per_tile, span, n_tiles, nbins, n_tiles * block != nslots)
