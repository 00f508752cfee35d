"""The NaN / inf policy of attncap.attention and attncap.maps_from_lse, the same on every backend.

A query row is *poisoned* when anything its scores are made of is not finite: NaN or +-inf in its
query vector q[b, h, i], in any key of its key head k[b, h // (H / Hk)] (masked keys too), or NaN or
+inf in its row of a float attn_mask (-inf there masks a key, as in SDPA); for maps_from_lse also
a NaN or +inf in its lse. A poisoned row is NaN in ``out`` and in every product it enters: its map
and tokens bins, its rows, its entropy and peak bins, and the colsum of its head group (a sum over
the query range). Nothing else is NaN because of it, and nothing is turned into 0. NaN or inf in v
reaches ``out`` only (the probabilities never see v). A fully masked row (every key masked) is not
poisoned: it gives zeros, never NaN.

Why: the kernels' online softmax would otherwise make poisoned rows NaN, 0 or finite depending on
the backend and the path (an fp32 max that drops NaN on the GPU, a guard for fully masked rows that
reads NaN as "no keys"). The rows are found from the inputs with a few elementwise reductions on the
device (no host synchronisation, so compiled graphs and CUDA graphs are unaffected) and the products
poisoned with masked_fill, O(size of the inputs and products), small beside the attention itself.
On the CPU, where reading a value costs no synchronisation, one sum over q and k first tells
whether anything is non-finite at all; only then are the rows found (the same result, a few ops
per call instead of a few dozen).

Shape legend: B batch, H query heads, Hk key heads, Nq queries, Nk keys, D head dim, G head groups,
Qb query bins, Qs selected query rows.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .layouts import sum_bins


def poisoned_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, mask_kind: int,
                  lse: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, H, Nq]: the rows the policy poisons. q [B, H, Nq, D], k [B, Hk, Nk, D] (BHSD views),
    mask a [B, H, Nq, Nk] view (mask_kind 2: float scores added), lse [B, H, Nq] or None.

    Only reductions (max and min propagate NaN): no temporary of the inputs' size, and a broadcast
    mask is reduced over its own extent, not over the [B, H, Nq, Nk] it stands for."""
    inf = float("inf")
    H, Hk = q.shape[1], k.shape[1]
    bad = ~((q.amax(-1) < inf) & (q.amin(-1) > -inf))
    bad_keys = ~((k.amax((-2, -1)) < inf) & (k.amin((-2, -1)) > -inf))            # [B, Hk]
    bad = bad | bad_keys.repeat_interleave(H // Hk, dim=1)[:, :, None]
    if mask is not None and mask_kind == 2:
        # the broadcast axes of the view: reduce one slice, broadcast the result
        bad = bad | ~(_own(mask).amax(-1) < inf)  # NaN or +inf; -inf masks a key
    if lse is not None:
        bad = bad | torch.isnan(lse) | torch.isposinf(lse)
    return bad


def all_finite(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, mask_kind: int,
               lse: torch.Tensor | None = None) -> bool:
    """True when no row is poisoned (arguments as poisoned_rows), read on the host: for CPU tensors,
    where that costs no synchronisation. Sufficient, not necessary: NaN and inf make a sum non-finite,
    and a sum of finite values that overflows only says False (the exact path then decides)."""
    if not math.isfinite((q.sum(dtype=torch.float32) + k.sum(dtype=torch.float32)).item()):
        return False
    if mask is not None and mask_kind == 2 and mask.numel() and not _own(mask).amax().item() < math.inf:
        return False  # NaN or +inf (amax propagates NaN); -inf masks a key
    return lse is None or not lse.numel() or lse.amax().item() < math.inf


def _own(mask: torch.Tensor) -> torch.Tensor:
    """A broadcast [B, H, Nq, Nk] view narrowed to one slice along its broadcast (stride 0) axes."""
    for d in range(3):
        if mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    return mask


def _bins(bad: torch.Tensor, axis, heads: torch.Tensor) -> torch.Tensor:
    """bool [B, G, bins]: which (head group, bin) of an axis plan holds a poisoned (head, query)."""
    x = bad[:, :, axis.perm][:, heads].any(2).to(torch.float32)   # [B, G, slots]
    return sum_bins(x, axis.bin_of_slot, axis.nbins) > 0


def poison(bad: torch.Tensor, out: torch.Tensor | None, plans: Sequence, tables: Sequence,
           products: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply the policy: ``out`` (a [B, H, Nq, Dv] view, written in place) and ``products`` (each plan's
    tensors in product_shapes' order, flattened) with poisoned rows NaN. ``tables`` hold each plan's
    axis plans on the device (.query, .rows, .heads as in attncap.ops)."""
    from .validate import product_shapes

    if out is not None:
        out.masked_fill_(bad[..., None], float("nan"))
    done, items = [], iter(products)
    for plan, t in zip(plans, tables):
        per_query = None
        for kind in product_shapes(plan, 1):
            x = next(items)
            if kind == "rows":
                hit = _bins(bad, t.rows, t.heads)[..., None]
            else:
                per_query = _bins(bad, t.query, t.heads) if per_query is None else per_query
                if kind == "colsum":  # a sum over every query of the range
                    hit = per_query.any(-1)[..., None]
                else:  # map, tokens, entropy, peak: per query bin
                    hit = per_query if x.dim() == 3 else per_query[..., None]
            done.append(x.masked_fill(hit, float("nan")))
    return done


def enforce(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, mask_kind: int, lse: torch.Tensor | None,
            out: torch.Tensor | None, call, products: list[torch.Tensor]) -> list[torch.Tensor]:
    """The policy for one call of attncap's ops: poisoned_rows, then poison (``call`` holds the plans
    and their tables, as attncap.ops builds them). On the CPU, all_finite decides on the host first
    whether there is anything to poison; on other devices a call never reads a value on the host."""
    if q.device.type == "cpu" and all_finite(q, k, mask, mask_kind, lse):
        return products
    return poison(poisoned_rows(q, k, mask, mask_kind, lse), out, call.plans, call.tables, products)
