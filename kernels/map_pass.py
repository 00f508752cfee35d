"""Second pass: reductions of P given the final log-sum-exp (DESIGN.md, mathematics 3 and 4).

P is recomputed tile by tile as exp2(S*log2e - LSE*log2e), exactly as flash-attention's backward
does, and reduced in registers; every output element is written once by one program, so results
are deterministic and need no atomics.

Each program owns a tile of output bins [BLOCK_QB query bins, BLOCK_KB key bins] for one
(batch, head group). Tokens arrive through AxisPlans (attncap/layouts.py): slots sorted bin-major,
so the program's bins are one contiguous run of slots, which it walks in blocks. Pooling is a
product with one-hot matrices built in registers, Aq^T P Ak, so bins may hold any number of tokens
(grids that pooling factors do not divide need no padding). Unpooled axes skip that product.
The pooling dots take fp16 operands: one-hot tiles are exact, P and its key-pooled sums keep an
11-bit significand (tf32's precision), and fp16 tiles halve the registers fp32 ones would hold.
The head loop sits inside the program: head means need no atomics either.

Shape legend: B batch, H query heads, G head groups (output heads), HPG heads per group,
Qb/Kb query/key bins, Ls slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_in_f32, map_config, strides_or_zeros
from .masking import LOG2E, masked_scores


@triton.jit
def attn_map_kernel(
    Q, K, LSE, MASK, KPM, OUT, HEADS,
    QPERM, QBIN, QSTART, QCOUNT, KPERM, KBIN, KSTART, KCOUNT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_pb, stride_pk,
    stride_ob, stride_og, stride_oq, stride_ok,
    H, N_Q, GROUP, G, HPG, N_QBINS, N_KBINS, scale_log2,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_QB: tl.constexpr, BLOCK_KB: tl.constexpr, POOL_Q: tl.constexpr, POOL_K: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    qb0 = pid_q * BLOCK_QB
    kb0 = pid_k * BLOCK_KB
    if POOL_Q:
        q_lo = tl.load(QSTART + qb0)
        q_hi = tl.load(QSTART + tl.minimum(qb0 + BLOCK_QB, N_QBINS))
    else:
        q_lo = qb0
        q_hi = tl.minimum(qb0 + BLOCK_QB, N_QBINS)
    if POOL_K:
        k_lo = tl.load(KSTART + kb0)
        k_hi = tl.load(KSTART + tl.minimum(kb0 + BLOCK_KB, N_KBINS))
    else:
        k_lo = kb0
        k_hi = tl.minimum(kb0 + BLOCK_KB, N_KBINS)

    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_D
    o_qb = tl.arange(0, BLOCK_QB)
    o_kb = tl.arange(0, BLOCK_KB)
    b_acc = tl.zeros([BLOCK_QB, BLOCK_KB], tl.float32)
    for hh in range(0, HPG):
        h = tl.load(HEADS + g * HPG + hh).to(tl.int64)
        p_q0 = Q + b * stride_qb + h * stride_qh
        p_k0 = K + b * stride_kb + (h // GROUP) * stride_kh
        for qs in range(q_lo, q_hi, BLOCK_M):
            s_m = qs + tl.arange(0, BLOCK_M)
            m_m = s_m < q_hi
            t_m = tl.load(QPERM + s_m, mask=m_m, other=0).to(tl.int64)
            b_q = tl.load(p_q0 + t_m[:, None] * stride_qn + o_d[None, :] * stride_qd,
                          mask=m_m[:, None] & m_d[None, :], other=0.0)
            if DOT_F32:
                b_q = b_q.to(tl.float32)
            b_lse = tl.load(LSE + (b * H + h) * N_Q + t_m, mask=m_m, other=float("inf")) * 1.4426950408889634
            # A fully masked row has LSE = -inf; +inf makes its probabilities exp2(-inf) = 0.
            b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
            if POOL_Q:
                b_qbin = tl.load(QBIN + s_m, mask=m_m, other=-1) - qb0
                b_aq = (b_qbin[:, None] == o_qb[None, :]).to(tl.float16)
            for ks in range(k_lo, k_hi, BLOCK_N):
                s_n = ks + tl.arange(0, BLOCK_N)
                m_n = s_n < k_hi
                t_n = tl.load(KPERM + s_n, mask=m_n, other=0).to(tl.int64)
                b_k = tl.load(p_k0 + t_n[None, :] * stride_kn + o_d[:, None] * stride_kd,
                              mask=m_d[:, None] & m_n[None, :], other=0.0)
                if DOT_F32:
                    b_k = b_k.to(tl.float32)
                b_s = tl.dot(b_q, b_k) * scale_log2
                b_s = masked_scores(b_s, t_m, t_n, m_m, m_n, b, h, MASK, stride_mb, stride_mh, stride_mq,
                                    stride_mk, KPM, stride_pb, stride_pk, IS_CAUSAL, MASK_KIND, HAS_KPM)
                b_p = tl.exp2(b_s - b_lse[:, None])
                if POOL_K:
                    b_kbin = tl.load(KBIN + s_n, mask=m_n, other=-1) - kb0
                    b_ak = (b_kbin[:, None] == o_kb[None, :]).to(tl.float16)
                    b_p = tl.dot(b_p.to(tl.float16), b_ak)
                if POOL_Q:
                    b_acc += tl.dot(tl.trans(b_aq), b_p.to(tl.float16))
                else:
                    b_acc += b_p

    o_q = qb0 + o_qb
    o_k = kb0 + o_kb
    m_q = o_q < N_QBINS
    m_k = o_k < N_KBINS
    b_cq = tl.load(QCOUNT + o_q, mask=m_q, other=1.0)
    b_ck = tl.load(KCOUNT + o_k, mask=m_k, other=1.0)
    b_out = b_acc / (b_cq[:, None] * b_ck[None, :] * HPG)
    p_o = OUT + b * stride_ob + g * stride_og + o_q[:, None] * stride_oq + o_k[None, :] * stride_ok
    tl.store(p_o, b_out, mask=m_q[:, None] & m_k[None, :])


def _bins_per_tile(plan_pooled: bool, max_bin: int, slots_per_block: int) -> int:
    """Bins per program tile: unpooled axes use one slot block; pooled ones ~4 slot blocks of bins,
    16 to 32 (more spills registers at D=128 on sm_90, see tools/compile_kernels.py)."""
    if not plan_pooled:
        return slots_per_block
    return max(16, min(32, triton.next_power_of_2(max(1, 4 * slots_per_block // max(1, max_bin)))))


def map_pass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, qplan, kplan,
             heads_table: torch.Tensor, mask: torch.Tensor | None = None, mask_kind: int = 0,
             key_padding: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Mean probability over (query bin, key bin) blocks, averaged over each head group.

    q [B,H,Nq,D], k [B,Hk,Nk,D] views; lse [B,H,Nq] fp32 from the forward; qplan/kplan AxisPlans
    on q's device; heads_table int32 [G, HPG]: the query heads averaged into output head g.
    Returns float32 [B, G, Qb, Kb].
    """
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    G, HPG = heads_table.shape
    cfg = map_config(D, qplan.pooled, kplan.pooled, q.device)
    block_qb = _bins_per_tile(qplan.pooled, qplan.max_bin_size(), cfg.block_m)
    block_kb = _bins_per_tile(kplan.pooled, kplan.max_bin_size(), cfg.block_n)
    out = torch.empty((B, G, qplan.nbins, kplan.nbins), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(qplan.nbins, block_qb), triton.cdiv(kplan.nbins, block_kb), B * G)
    attn_map_kernel[grid](
        q, k, lse, mask if mask is not None else q, key_padding if key_padding is not None else q, out,
        heads_table, qplan.perm, qplan.bin_of_slot, qplan.bin_start, qplan.counts,
        kplan.perm, kplan.bin_of_slot, kplan.bin_start, kplan.counts,
        *q.stride(), *k.stride(), *strides_or_zeros(mask, 4), *strides_or_zeros(key_padding, 2), *out.stride(),
        H, Nq, H // Hk, G, HPG, qplan.nbins, kplan.nbins, scale * LOG2E,
        HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=cfg.block_m if qplan.pooled else block_qb,
        BLOCK_N=cfg.block_n if kplan.pooled else block_kb, BLOCK_QB=block_qb, BLOCK_KB=block_kb,
        POOL_Q=qplan.pooled, POOL_K=kplan.pooled, IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
        HAS_KPM=key_padding is not None, DOT_F32=dot_in_f32(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
