"""The CPU path: chunked PyTorch computing exactly what the Triton kernels compute.

Same two entry points and signatures as attncap.kernels (forward, map_pass), so attncap.ops can
call either. Memory stays bounded: scores exist only for a chunk of queries at a time, sized so
a chunk's [B, H, chunk, Nk] float32 block fits in WORKSPACE_BYTES.

Shape legend: B batch, H query heads, Hk key heads, Nq, Nk, D, Dv, S selected keys, c chunk.
"""
from __future__ import annotations

import math

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
    # GQA without copying keys per query head: group query heads under their key head.
    s = torch.matmul(q_rows.float().reshape(B, Hk, H // Hk * c, D), k_cols.float().transpose(-1, -2))
    s = s.reshape(B, H, c, -1) * scale
    keep = torch.ones(1, 1, c, tn.numel(), dtype=torch.bool, device=s.device)
    if is_causal:
        keep = keep & (tn[None, :] <= tm[:, None])
    if mask_kind:
        m = mask[:, :, tm][:, :, :, tn]
        if mask_kind == 1:
            keep = keep & (m != 0)
        else:
            s = s + m.float()
    if key_padding is not None:
        keep = keep & (key_padding[:, tn] != 0)[:, None, None, :]
    return s.masked_fill(~keep, float("-inf"))


def forward(q, k, v, out, scale, mask=None, mask_kind=0, key_padding=None, is_causal=False,
            selected=None, want_stats=False):
    """Chunked twin of attncap.kernels.forward (same arguments, same returns)."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if mask_kind == 0 and key_padding is None and selected is None and not want_stats and H == Hk \
            and v.shape[-1] == D:
        # Nothing rides on this forward but the LSE: PyTorch's fused CPU flash kernel returns both,
        # several times faster than the chunked loop below.
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        out.copy_(o)
        return lse, None, None, None
    lse = torch.empty((B, H, Nq), dtype=torch.float32)
    n_sel = 0 if selected is None else selected.numel()
    tokens = torch.empty((B, H, Nq, n_sel)) if n_sel else None
    ent = torch.empty((B, H, Nq)) if want_stats else None
    peak = torch.empty((B, H, Nq)) if want_stats else None
    all_keys = torch.arange(Nk)
    vf = v.float()
    step = _chunk_rows(B * H * Nk * 4 * 3, Nq)
    for start in range(0, Nq, step):
        tm = torch.arange(start, min(Nq, start + step))
        c = tm.numel()
        s = _scores(q[:, :, tm], k, scale, tm, all_keys, mask, mask_kind, key_padding, is_causal)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        inv = torch.where(l > 0, 1.0 / l.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(l))
        o = torch.matmul(p.reshape(B, Hk, H // Hk * c, Nk), vf).reshape(B, H, c, -1) * inv
        out[:, :, tm] = o.to(out.dtype)
        lse[:, :, tm] = torch.where(l[..., 0] > 0, m[..., 0] + torch.log(l[..., 0]), float("-inf"))
        if want_stats:
            ps = torch.where(p > 0, p * (s - m), torch.zeros_like(p)).sum(-1, keepdim=True)
            ent[:, :, tm] = torch.where(l > 0, torch.log(l.clamp_min(1e-38)) - ps * inv, torch.zeros_like(l))[..., 0]
            peak[:, :, tm] = inv[..., 0]
        if n_sel:
            tokens[:, :, tm] = p[..., selected.long()] * inv
    return lse, tokens, ent, peak


def map_pass(q, k, lse, scale, qplan: AxisPlan, kplan: AxisPlan, heads_table, mask=None, mask_kind=0,
             key_padding=None, is_causal=False) -> torch.Tensor:
    """Chunked twin of attncap.kernels.map_pass: float32 [B, G, Qb, Kb]."""
    B, H, Nq, D = q.shape
    G, HPG = heads_table.shape
    tn = kplan.perm.long()
    k_sel = k[:, :, tn]
    table = heads_table.long()
    out = torch.zeros((B, G, qplan.nbins, kplan.nbins), dtype=torch.float32)
    step = _chunk_rows(B * H * tn.numel() * 4 * 3, qplan.nslots)
    for start in range(0, qplan.nslots, step):
        slots = torch.arange(start, min(qplan.nslots, start + step))
        tm = qplan.perm[slots].long()
        s = _scores(q[:, :, tm], k_sel, scale, tm, tn, mask, mask_kind, key_padding, is_causal)
        row_lse = lse[:, :, tm]
        row_lse = torch.where(torch.isinf(row_lse) & (row_lse < 0), math.inf, row_lse)
        p = torch.exp(s - row_lse[..., None])
        p = p[:, table].sum(2)  # [B, G, c, Lk]
        if kplan.pooled:
            p = torch.zeros(B, G, p.shape[2], kplan.nbins).index_add_(3, kplan.bin_of_slot.long(), p)
        out.index_add_(2, qplan.bin_of_slot[slots].long(), p)
    return out / (qplan.counts[:, None] * kplan.counts[None, :] * HPG)
