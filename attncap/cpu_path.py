"""The CPU path: chunked PyTorch computing exactly what the Triton kernels compute.

forward() takes the arguments of attncap.kernels.forward (and maps=), so attncap.ops calls either
the same way. Memory stays bounded: scores exist only for a chunk of queries at a time, sized so a
chunk's [B, H, chunk, Nk] float32 block fits in WORKSPACE_BYTES.

Unlike a GPU kernel, a CPU chunk holds every key of its queries, so the probabilities are final
there: forward(maps=[...]) reduces them into the requested maps in the same pass, where the GPU
kernels recompute Q K^T in a second pass (kernels.map_pass) from the LSE.

Shape legend: B batch, H query heads, Hk key heads, Nq, Nk, D, Dv, S selected keys, c chunk.
"""
from __future__ import annotations

import torch

from .layouts import AxisPlan

WORKSPACE_BYTES = 256 * 2**20


def _chunk_rows(per_row_bytes: int, n: int) -> int:
    return max(1, min(n, WORKSPACE_BYTES // max(1, per_row_bytes)))


def _scores(q_rows: torch.Tensor, k_cols: torch.Tensor, scale: float, tm: torch.Tensor, tn: torch.Tensor,
            mask, mask_kind: int, key_padding, is_causal: bool) -> torch.Tensor:
    """Masked natural-log scores [B, H, c, n] for query tokens tm and key tokens tn (fp32)."""
    B, H, c, D = q_rows.shape
    Hk = k_cols.shape[1]
    # GQA without copying keys per query head: group query heads under their key head. The scale
    # goes on the queries, c x D numbers instead of the c x n scores.
    s = torch.matmul((q_rows.float() * scale).reshape(B, Hk, H // Hk * c, D), k_cols.float().transpose(-1, -2))
    s = s.reshape(B, H, c, -1)
    if mask_kind == 2:
        s += mask[:, :, tm][:, :, :, tn].float()
    drop = None
    if is_causal:
        drop = tn[None, :] > tm[:, None]
    if mask_kind == 1:
        off = mask[:, :, tm][:, :, :, tn] == 0
        drop = off if drop is None else drop | off
    if key_padding is not None:
        off = (key_padding[:, tn] == 0)[:, None, None, :]
        drop = off if drop is None else drop | off
    return s if drop is None else s.masked_fill_(drop, float("-inf"))


class _MapJob:
    """One map accumulated during the forward: float32 [B, G, Qb, Kb] from normalised chunk rows."""

    def __init__(self, qplan: AxisPlan, kplan: AxisPlan, heads_table: torch.Tensor, B: int, Nq: int, Nk: int):
        self.qplan, self.kplan = qplan, kplan
        self.table = heads_table.long()
        self.hpg = heads_table.shape[1]
        self.bin_of_query = torch.full((Nq,), -1, dtype=torch.long)
        self.bin_of_query[qplan.perm.long()] = qplan.bin_of_slot.long()
        kperm = kplan.perm.long()
        lo, hi = int(kperm.min()), int(kperm.max()) + 1
        # Key axes are ranges: slice them (a view) and pool by each key's bin, no gather of the chunk.
        contiguous = hi - lo == kperm.numel()
        self.keys = slice(lo, hi) if contiguous else kperm
        key_bins = torch.empty(Nk, dtype=torch.long)
        key_bins[kperm] = kplan.bin_of_slot.long()
        self.key_bins = key_bins[lo:hi] if contiguous else kplan.bin_of_slot.long()
        # Columns come out in bin order: only an unpooled, ascending key range is already in it.
        ascending = contiguous and bool((kperm == torch.arange(lo, hi)).all())
        self.bin_keys = kplan.pooled or not ascending
        self.total = torch.zeros((B, heads_table.shape[0], qplan.nbins, kplan.nbins), dtype=torch.float32)

    def add(self, probs: torch.Tensor, tm: torch.Tensor) -> None:
        """probs [B, H, c, Nk]: the normalised probabilities of query tokens tm."""
        bins = self.bin_of_query[tm]
        inside = bins >= 0
        if not bool(inside.any()):
            return
        p = probs[..., self.keys]
        if not bool(inside.all()):
            p = p[:, :, inside]
        p = p.sum(1, keepdim=True) if self.table.shape[0] == 1 and self.hpg == p.shape[1] else p[:, self.table].sum(2)
        if self.bin_keys:
            p = torch.zeros(p.shape[:3] + (self.kplan.nbins,)).index_add_(3, self.key_bins, p)
        self.total.index_add_(2, bins[inside], p)

    def result(self) -> torch.Tensor:
        return self.total / (self.qplan.counts[:, None] * self.kplan.counts[None, :] * self.hpg)


def forward(q, k, v, out, scale, mask=None, mask_kind=0, key_padding=None, is_causal=False,
            selected=None, want_stats=False, maps=()):
    """Chunked twin of attncap.kernels.forward (same arguments, same returns), plus ``maps``: a list
    of (qplan, kplan, heads_table) whose maps (as kernels.map_pass returns them) come back as a fifth item."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if mask_kind == 0 and key_padding is None and selected is None and not want_stats and not maps and H == Hk \
            and v.shape[-1] == D:
        # Nothing rides on this forward but the LSE: PyTorch's fused CPU flash kernel returns both,
        # several times faster than the chunked loop below.
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        out.copy_(o)
        return lse, None, None, None, []
    lse = torch.empty((B, H, Nq), dtype=torch.float32)
    n_sel = 0 if selected is None else selected.numel()
    tokens = torch.empty((B, H, Nq, n_sel)) if n_sel else None
    ent = torch.empty((B, H, Nq)) if want_stats else None
    peak = torch.empty((B, H, Nq)) if want_stats else None
    all_keys = torch.arange(Nk)
    vf = v.float()
    jobs = [_MapJob(qp, kp, table, B, Nq, Nk) for qp, kp, table in maps]
    step = _chunk_rows(B * H * Nk * 4 * (3 if want_stats else 2), Nq)
    for start in range(0, Nq, step):
        tm = torch.arange(start, min(Nq, start + step))
        c = tm.numel()
        s = _scores(q[:, :, tm], k, scale, tm, all_keys, mask, mask_kind, key_padding, is_causal)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        s -= m                                        # in place: chunks are the big tensors here
        p = torch.exp(s) if want_stats else s.exp_()  # entropy still needs s - m
        l = p.sum(-1, keepdim=True)
        inv = torch.where(l > 0, 1.0 / l.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(l))
        p *= inv                                      # the probabilities, final: every key is in the chunk
        o = torch.matmul(p.reshape(B, Hk, H // Hk * c, Nk), vf).reshape(B, H, c, -1)
        out[:, :, tm] = o.to(out.dtype)
        lse[:, :, tm] = torch.where(l[..., 0] > 0, m[..., 0] + torch.log(l[..., 0]), float("-inf"))
        if want_stats:
            ps = (p * s.clamp_(min=-3e38)).sum(-1)  # masked keys: p = 0 and s = -inf; 0 * -3e38 = 0
            ent[:, :, tm] = torch.where(l[..., 0] > 0, torch.log(l[..., 0].clamp_min(1e-38)) - ps, 0.0)
            peak[:, :, tm] = inv[..., 0]
        if n_sel:
            tokens[:, :, tm] = p[..., selected.long()]
        for job in jobs:
            job.add(p, tm)
    return lse, tokens, ent, peak, [job.result() for job in jobs]


def maps_from_lse(q, k, lse, scale, maps, mask=None, mask_kind=0, key_padding=None, is_causal=False):
    """The maps of ``maps`` ((qplan, kplan, heads_table) each) from a given natural-log LSE [B, H, Nq]:
    P = exp(S - LSE) over query chunks of only the queries the maps need."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    jobs = [_MapJob(qp, kp, table, B, Nq, Nk) for qp, kp, table in maps]
    needed = torch.unique(torch.cat([qp.perm.long() for qp, _, _ in maps]))
    all_keys = torch.arange(Nk)
    # A fully masked row has LSE = -inf and every score -inf: +inf turns its probabilities to exp(-inf) = 0.
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    step = _chunk_rows(B * H * Nk * 4 * 2, needed.numel())
    for start in range(0, needed.numel(), step):
        tm = needed[start:start + step]
        s = _scores(q[:, :, tm], k, scale, tm, all_keys, mask, mask_kind, key_padding, is_causal)
        p = s.sub_(lse[:, :, tm, None]).exp_()
        for job in jobs:
            job.add(p, tm)
    return [job.result() for job in jobs]
