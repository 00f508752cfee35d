"""Flash-attention forward with one-pass products.

Per (batch, head, block of queries) the kernel streams over keys with the online softmax (scores
in log2 units, exp2) and returns, besides the output O and the log-sum-exp, three reductions:

* entropy: H = ln2 * (log2 l - sum_j p_j (s_j - m) / l), accumulated relative to the running max
  m so large scores do not cancel (DESIGN.md, mathematics 2);
* peak probability: max_j P_j = exp(m - LSE) = 1 / l in the m-relative form;
* token columns, in the epilogue: once the key loop has the final m and l, S_sel = Q K_sel^T for
  up to 128 selected keys and P_sel = exp2(S_sel - m) / l, all in fp32 and masked at those
  columns. Exact for every input dtype (no low-precision P), and nothing rides in the key loop,
  so the loop keeps the tile size of the plain forward.

The key loop is split: interior tiles (whole tiles every query row of the block may see, when no
mask applies) run without any masking, with the exp2 argument as one FMA and the entropy term
without a select; the boundary tiles (the last partial tile, the causal diagonal, or every tile
when a mask is given) apply the masks.

Shape legend: B batch, H query heads, Hk key heads (GROUP = H // Hk), Nq, Nk, D head dim,
Dv value dim, S selected keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import load, mma
from .configs import dot_in_f32, forward_config, launch, strides_or_zeros
from .masking import masked_scores, score_factors, softcapped


@triton.jit
def _fwd_step(b_q, b_k, b_v, b_acc, b_m, b_l, b_ent, o_m, o_n, m_m, m_n, b, h, scale_log2, cap_in, cap_out,
              MASK, stride_mb, stride_mh, stride_mq, stride_mk, KPM, stride_pb, stride_pk,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
              WANT_STATS: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One key tile of the online softmax: returns the updated (acc, m, l, ent)."""
    b_qk = softcapped(mma(b_q, b_k, IEEE), cap_in, cap_out, SOFTCAP)
    if MASKED:
        b_s = masked_scores(b_qk * scale_log2, o_m, o_n, m_m, m_n, b, h, MASK, stride_mb, stride_mh, stride_mq,
                            stride_mk, KPM, stride_pb, stride_pk, IS_CAUSAL, MASK_KIND, HAS_KPM)
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # Rows with no visible key yet keep m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_t = b_s - b_shift[:, None]
        b_p = tl.exp2(b_t)
        if WANT_STATS:
            b_pt = b_p * tl.where(b_p > 0, b_t, 0.0)  # masked entries: 0, not 0 * -inf
    else:
        # Every score is finite here, so m_new is too; scale > 0 commutes with the max.
        b_m_new = tl.maximum(b_m, tl.max(b_qk, 1) * scale_log2)
        b_shift = b_m_new
        b_t = tl.fma(b_qk, scale_log2, -b_shift[:, None])
        b_p = tl.exp2(b_t)
        if WANT_STATS:
            b_pt = b_p * b_t
    b_alpha = tl.exp2(b_m - b_shift)
    if WANT_STATS:
        # A per-row select only: before the first visible key, ent and l are 0 and m - shift is -inf.
        b_dm = tl.where(b_m == float("-inf"), 0.0, b_m - b_shift)
        b_ent = b_alpha * (b_ent + b_dm * b_l) + tl.sum(b_pt, 1)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + mma(b_p.to(b_v.dtype), b_v, IEEE)
    return b_acc, b_m_new, b_l, b_ent


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, MASK, KPM, SEL, TOK, ENT, PEAK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_pb, stride_pk,
    H, N_Q, N_K, GROUP, N_SEL, scale_log2, cap_in, cap_out,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEL: tl.constexpr, WANT_STATS: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit offsets: at 75,600 tokens x 40 heads x 128 dims a flat index overflows int32.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    PAD_D: tl.constexpr = HEAD_D != BLOCK_D
    PAD_DV: tl.constexpr = HEAD_DV != BLOCK_DV

    o_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < N_Q
    m_d = o_d < HEAD_D
    m_dv = o_dv < HEAD_DV

    p_q = Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
    if DOT_F32:
        b_q = b_q.to(tl.float32)
    p_k0 = K + b * stride_kb + hk * stride_kh
    p_v0 = V + b * stride_vb + hk * stride_vh

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    b_ent = tl.zeros([BLOCK_M], tl.float32)

    # Keys [0, full_end) come in whole tiles that every row of this query block sees.
    hi = N_K
    if IS_CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    if MASK_KIND == 0 and not HAS_KPM:
        full_end = (N_K // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            full_end = tl.minimum(full_end, ((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
    else:
        full_end = 0
    for start_n in range(0, full_end, BLOCK_N):
        o_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        b_k = load(p_k0 + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd, m_d[:, None], PAD_D)
        b_v = load(p_v0 + o_n[:, None] * stride_vn + o_dv[None, :] * stride_vd, m_dv[None, :], PAD_DV)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_acc, b_m, b_l, b_ent = _fwd_step(b_q, b_k, b_v, b_acc, b_m, b_l, b_ent, o_m, o_n, m_m, o_n < N_K, b, h,
                                           scale_log2, cap_in, cap_out, MASK, stride_mb, stride_mh, stride_mq,
                                           stride_mk, KPM, stride_pb, stride_pk, False, IS_CAUSAL, MASK_KIND,
                                           HAS_KPM, WANT_STATS, IEEE, SOFTCAP)
    for start_n in range(full_end, hi, BLOCK_N):
        o_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < N_K
        b_k = tl.load(p_k0 + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd,
                      mask=m_d[:, None] & m_n[None, :], other=0.0)
        b_v = tl.load(p_v0 + o_n[:, None] * stride_vn + o_dv[None, :] * stride_vd,
                      mask=m_n[:, None] & m_dv[None, :], other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_acc, b_m, b_l, b_ent = _fwd_step(b_q, b_k, b_v, b_acc, b_m, b_l, b_ent, o_m, o_n, m_m, m_n, b, h,
                                           scale_log2, cap_in, cap_out, MASK, stride_mb, stride_mh, stride_mq,
                                           stride_mk, KPM, stride_pb, stride_pk, True, IS_CAUSAL, MASK_KIND,
                                           HAS_KPM, WANT_STATS, IEEE, SOFTCAP)

    b_empty = b_l == 0.0
    b_inv = tl.where(b_empty, 0.0, 1.0 / tl.where(b_empty, 1.0, b_l))
    p_o = O + b * stride_ob + h * stride_oh + o_m[:, None] * stride_on + o_dv[None, :] * stride_od
    tl.store(p_o, (b_acc * b_inv[:, None]).to(O.dtype.element_ty), mask=m_m[:, None] & m_dv[None, :])
    # LSE in natural-log units, -inf for a fully masked row (the map pass turns that row to zeros).
    b_log2l = tl.log2(tl.where(b_empty, 1.0, b_l))
    b_lse = tl.where(b_empty, float("-inf"), (b_m + b_log2l) / 1.4426950408889634)
    row = (b * H + h) * N_Q + o_m
    tl.store(LSE + row, b_lse, mask=m_m)
    if WANT_STATS:
        tl.store(ENT + row, tl.where(b_empty, 0.0, 0.6931471805599453 * (b_log2l - b_ent * b_inv)), mask=m_m)
        tl.store(PEAK + row, b_inv, mask=m_m)
    if HAS_SEL:
        # Token columns from the final m and l: one [BLOCK_M, BLOCK_S] score tile, in fp32.
        o_s = tl.arange(0, BLOCK_S)
        b_sel = tl.load(SEL + o_s, mask=o_s < N_SEL, other=-1).to(tl.int64)
        m_s = b_sel >= 0
        b_ks = tl.load(p_k0 + tl.where(m_s, b_sel, 0)[None, :] * stride_kn + o_d[:, None] * stride_kd,
                       mask=m_d[:, None] & m_s[None, :], other=0.0)
        if DOT_F32:
            b_ks = b_ks.to(tl.float32)
        b_ss = masked_scores(softcapped(mma(b_q, b_ks, IEEE), cap_in, cap_out, SOFTCAP) * scale_log2, o_m, b_sel, m_m, m_s, b, h, MASK, stride_mb,
                             stride_mh, stride_mq, stride_mk, KPM, stride_pb, stride_pk, IS_CAUSAL, MASK_KIND,
                             HAS_KPM)
        b_shift = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_tok = tl.exp2(b_ss - b_shift[:, None]) * b_inv[:, None]
        tl.store(TOK + row[:, None] * N_SEL + o_s[None, :], b_tok, mask=m_m[:, None] & m_s[None, :])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
            mask: torch.Tensor | None = None, mask_kind: int = 0, key_padding: torch.Tensor | None = None,
            is_causal: bool = False, selected: torch.Tensor | None = None, want_stats: bool = False,
            softcap: float | None = None):
    """Launch the forward. All tensors are [B, heads, N, D] views (any strides: BHSD and BSHD alike).

    q [B,H,Nq,D], k [B,Hk,Nk,D], v [B,Hk,Nk,Dv], out [B,H,Nq,Dv] (written).
    mask: [B,H,Nq,Nk] view (broadcast dims with stride 0), uint8 for mask_kind 1, float for 2.
    key_padding: uint8 [B,Nk], nonzero = keep. selected: int32 [S] key indices, S <= 128.
    softcap: logit cap (scores = softcap * tanh(scale * q.k / softcap), before the masks) or None.
    Returns (lse [B,H,Nq], tokens [B,H,Nq,S] or None, entropy [B,H,Nq] or None, peak or None), fp32.
    """
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    lse = torch.empty((B, H, Nq), device=dev, dtype=torch.float32)
    n_sel = 0 if selected is None else selected.numel()
    tokens = torch.empty((B, H, Nq, n_sel), device=dev, dtype=torch.float32) if n_sel else None
    ent = torch.empty((B, H, Nq), device=dev, dtype=torch.float32) if want_stats else None
    peak = torch.empty((B, H, Nq), device=dev, dtype=torch.float32) if want_stats else None
    cfg = forward_config(D, Dv, want_stats, dev, q.element_size())
    grid = (triton.cdiv(Nq, cfg.block_m), B * H)
    args = (q, k, v, out, lse, mask if mask is not None else q, key_padding if key_padding is not None else q,
            selected if n_sel else lse, tokens if n_sel else lse, ent if want_stats else lse,
            peak if want_stats else lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *strides_or_zeros(mask, 4),
            *strides_or_zeros(key_padding, 2), H, Nq, Nk, H // Hk, n_sel, *score_factors(scale, softcap))
    launch(attn_fwd_kernel, grid, args, dict(
        HEAD_D=D, HEAD_DV=Dv, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_S=max(16, triton.next_power_of_2(max(n_sel, 1))),
        IS_CAUSAL=is_causal, MASK_KIND=mask_kind, HAS_KPM=key_padding is not None, HAS_SEL=n_sel > 0,
        WANT_STATS=want_stats, DOT_F32=dot_in_f32(q), IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return lse, tokens, ent, peak
