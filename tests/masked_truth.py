"""Records of calls that carry an attention mask (padded text), against a float64 masked softmax.

family_harness compares unmasked calls only; the video families pass key-padding masks whenever a
prompt is shorter than its encoder's length. Here P = softmax(S + mask) over ALL keys, a query row
whose keys are all masked is zeros (as attncap and SDPA define it), then sliced, head-averaged and
pooled exactly as test_capture_families.expected does for kind "map".
"""
from __future__ import annotations

import torch

from test_capture_families import factors, pooled


def masked_map(q, k, scale, mask, qseg, kseg, pool=None) -> torch.Tensor:
    """[B, 1, Qb, Kb] of the head-mean map of queries qseg over keys kseg (segments (start, stop, grid))."""
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        mask = torch.as_tensor(mask)
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)          # all-masked rows: zeros
    x = p[:, :, qseg[0]:qseg[1], kseg[0]:kseg[1]].mean(1, keepdim=True)
    x = pooled(x, 2, qseg[2], factors(qseg[2], pool))
    return pooled(x, 3, kseg[2], factors(kseg[2], pool))


def check_masked_maps(store, truth: dict, segments, pool=None, atol: float = 2e-5) -> int:
    """Every "map" record against masked_map of its call; segments(layer, index) -> (qsegs, ksegs)."""
    checked = 0
    for r in store.get(kind="map"):
        a, b = r.relation.split("->")
        index = r.meta.get("sample", 0)
        q, k, scale, mask = truth[(r.layer, index)]
        qsegs, ksegs = segments(r.layer, index)
        assert r.meta["query_segment"] == list(qsegs[a][:2]) and r.meta["key_segment"] == list(ksegs[b][:2])
        want = masked_map(q, k, scale, mask, qsegs[a], ksegs[b], pool)
        torch.testing.assert_close(r.data.double(), want, atol=atol, rtol=1e-4,
                                   msg=lambda m: f"{r.layer} {r.relation}: {m}")
        checked += 1
    return checked
