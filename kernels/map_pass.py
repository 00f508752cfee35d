"""Second pass: reductions of P given the final log-sum-exp (DESIGN.md, mathematics 3 and 4).

P is recomputed tile by tile as exp2(S*log2e - LSE*log2e), as flash-attention's backward does,
and pooled in registers. The pass streams like a forward:

* keys are gathered once into a contiguous, bin-padded, bin-major copy (kernels/slots.py), so the
  key loop reads whole 128-slot tiles without predicates or index loads and pipelines them;
  padding and key-padding masks become one additive bias per key slot (-inf);
* each program owns one query tile (>= 128 slots on GPUs: whole query bins) and a group of heads;
  per head it gathers its query rows and their LSE once (padding and fully masked rows get
  LSE = +inf, so their P is 0), then loops over every key tile;
* pooling is a product with constant one-hot matrices built from the slot number alone:
  pooled = Aq^T P Ak (an unpooled axis skips its product). With 16-bit inputs these operands are
  fp16, and P is scaled by 2^14 inside the exp2 argument (undone with the bin counts): the mean
  probability at 32k keys (3e-5) is below fp16's smallest normal (6.1e-5), 2^14 P is not, and
  a row's pooled sums stay <= 2^14 (< 65504). fp32 inputs pool in fp32 (ieee);
* each program adds its heads' share into its own rows of a partial output (read-modify-write by
  the one program that owns them, no atomics); when the heads are split over several programs
  (to fill the GPU), their partials are summed afterwards in a fixed order: deterministic.

Memory besides the output: the key copy [B, Hk, Lk, D padded to a power of two] in k's dtype
(320 MiB at WAN 480p, 40 heads) and the split partials (at most PARTIAL_BYTES).

Shape legend: B batch, H query heads, Hk key heads, G head groups (output heads), HPG heads per
group, Qb/Kb query/key bins, Lq/Lk padded slots, S partial splits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .blocks import mma
from .configs import dot_in_f32, launch, map_config, sm_count, strides_or_zeros
from .masking import masked_scores, score_factors, softcapped
from .slots import SlotLayout, lay_out

P_SCALE_LOG2 = 14.0  # P enters the pooling products as 2^14 P
PARTIAL_BYTES = 256 * 2**20  # split partials may take this much (or the output's size, if larger)


@triton.jit
def attn_map_kernel(
    Q, KG, LSE, QTOK, KTOK, KBIAS, QSCALE, KSCALE, MASK, OUT, HEADS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_biasb,
    stride_os, stride_ob, stride_og, stride_oq,
    H, N_Q, GROUP, G, HPG, HPS, QSPLIT, N_KT, N_QBINS, N_KBINS, scale_log2, cap_in, cap_out,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_BIN_SLOTS: tl.constexpr, Q_BINS: tl.constexpr, Q_SPAN: tl.constexpr, QW: tl.constexpr,
    K_BIN_SLOTS: tl.constexpr, K_BINS: tl.constexpr, K_SPAN: tl.constexpr, KW: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KBIAS: tl.constexpr,
    POOL_F16: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_q = tl.program_id(0)
    hs = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    q_prog = pid_q // QSPLIT           # the query bin run this program reduces into
    qs = pid_q % QSPLIT                # which of its tiles (every QSPLIT-th) when a bin spans tiles
    split = hs * QSPLIT + qs
    h_lo = hs * HPS
    h_hi = tl.minimum(h_lo + HPS, HPG)
    n_it = (Q_SPAN - qs + QSPLIT - 1) // QSPLIT
    POOL_Q: tl.constexpr = Q_BIN_SLOTS > 1
    POOL_K: tl.constexpr = K_BIN_SLOTS > 1
    POOL_DT: tl.constexpr = tl.float16 if POOL_F16 else tl.float32
    MASKED: tl.constexpr = IS_CAUSAL or MASK_KIND != 0

    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_D
    o_qw = tl.arange(0, QW)
    o_kw = tl.arange(0, KW)
    o_qb = q_prog * Q_BINS + o_qw
    m_qb = (o_qw < Q_BINS) & (o_qb < N_QBINS)
    b_qsc = tl.load(QSCALE + o_qb, mask=m_qb, other=0.0)
    p_out0 = OUT + split * stride_os + b * stride_ob + g * stride_og + o_qb[:, None] * stride_oq
    # One-hot pooling matrices from slot numbers alone: slot i of a tile belongs to bin i // BIN_SLOTS.
    if POOL_Q:
        b_aq = (o_qw[:, None] == tl.arange(0, BLOCK_M)[None, :] // Q_BIN_SLOTS).to(POOL_DT)   # [QW, BLOCK_M]
    if POOL_K:
        b_ak = (tl.arange(0, BLOCK_N)[:, None] // K_BIN_SLOTS == o_kw[None, :]).to(POOL_DT)   # [BLOCK_N, KW]

    for hh in range(h_lo, h_hi):
        h = tl.load(HEADS + g * HPG + hh).to(tl.int64)
        p_q0 = Q + b * stride_qb + h * stride_qh
        p_k0 = KG + b * stride_kb + (h // GROUP) * stride_kh
        for it in range(0, n_it):
            tile = q_prog * Q_SPAN + qs + it * QSPLIT
            later = (hh + it) > h_lo  # this program wrote its rows before: add to them
            # The read-modify-writes below read what other threads of this program stored for an
            # earlier head or tile: a barrier orders those global accesses within the block.
            tl.debug_barrier()
            b_tq = tl.load(QTOK + tile * BLOCK_M + tl.arange(0, BLOCK_M))
            m_q = b_tq >= 0
            t_q = tl.where(m_q, b_tq, 0).to(tl.int64)
            b_q = tl.load(p_q0 + t_q[:, None] * stride_qn + o_d[None, :] * stride_qd,
                          mask=m_q[:, None] & m_d[None, :], other=0.0)
            if DOT_F32:
                b_q = b_q.to(tl.float32)
            b_lse = tl.load(LSE + (b * H + h) * N_Q + t_q, mask=m_q, other=float("-inf"))
            # Padding and fully masked rows (LSE -inf): +inf makes their P exp2(-inf) = 0.
            b_lse2 = tl.where(b_lse == float("-inf"), float("inf"),
                               b_lse * 1.4426950408889634 - 14.0)  # 14: P_SCALE_LOG2
            b_run = tl.zeros([QW, KW], tl.float32)
            for j in range(0, N_KT):
                o_sk = j * BLOCK_N + tl.arange(0, BLOCK_N)
                b_k = tl.load(p_k0 + o_sk[None, :] * BLOCK_D + o_d[:, None])   # [BLOCK_D, BLOCK_N]
                if DOT_F32:
                    b_k = b_k.to(tl.float32)
                b_qk = softcapped(mma(b_q, b_k, IEEE), cap_in, cap_out, SOFTCAP)
                if MASKED:
                    b_tk = tl.load(KTOK + o_sk)
                    m_k = b_tk >= 0
                    b_s = masked_scores(b_qk * scale_log2, t_q, tl.where(m_k, b_tk, 0).to(tl.int64), m_q, m_k, b, h,
                                        MASK, stride_mb, stride_mh, stride_mq, stride_mk, KTOK, 0, 0,
                                        IS_CAUSAL, MASK_KIND, False)
                    b_t = b_s - b_lse2[:, None]
                else:
                    b_t = tl.fma(b_qk, scale_log2, -b_lse2[:, None])
                if HAS_KBIAS:
                    b_t += tl.load(KBIAS + b * stride_biasb + o_sk)[None, :]
                b_p = tl.exp2(b_t)
                if POOL_K:
                    b_x = mma(b_p.to(POOL_DT), b_ak, IEEE)        # [BLOCK_M, KW]
                else:
                    b_x = b_p
                if POOL_Q:
                    # A poisoned row's NaN / inf (attncap.nonfinite) would reach every bin of the tile through
                    # the one-hot dot's 0 x NaN: drop it here; the policy marks that row's own bins NaN after.
                    b_x = tl.where(b_x <= 3.0e38, b_x, 0.0)
                    b_y = mma(b_aq, b_x.to(POOL_DT), IEEE)        # [QW, KW]
                else:
                    b_y = b_x
                o_kb = (j // K_SPAN) * K_BINS + o_kw
                m_kb = (o_kw < K_BINS) & (o_kb < N_KBINS)
                if K_SPAN > 1:  # a key bin spans K_SPAN tiles: sum them, write after the last
                    b_run += b_y
                    b_y = b_run
                    m_kb = m_kb & ((j % K_SPAN) == K_SPAN - 1)
                    b_run = tl.where((j % K_SPAN) == K_SPAN - 1, 0.0, b_run)
                b_ksc = tl.load(KSCALE + o_kb, mask=m_kb, other=0.0)
                p_out = p_out0 + o_kb[None, :]
                m_out = m_qb[:, None] & m_kb[None, :]
                b_old = tl.where(later, tl.load(p_out, mask=m_out, other=0.0), 0.0)
                tl.store(p_out, b_old + b_y * b_qsc[:, None] * b_ksc[None, :], mask=m_out)


def _splits(work: int, span_q: int, hpg: int, out_bytes: int, n_sm: int) -> tuple[int, int]:
    """(head splits, query-tile splits): enough programs for ~4 per multiprocessor, partials within
    PARTIAL_BYTES (or one output's size)."""
    target = 4 * n_sm
    q_split = max(1, min(span_q, triton.cdiv(target, work)))
    h_split = max(1, min(hpg, triton.cdiv(target, work * q_split)))
    budget = max(PARTIAL_BYTES, out_bytes)
    while h_split * q_split > 1 and h_split * q_split * out_bytes > budget:
        if h_split > 1:
            h_split = (h_split + 1) // 2
        else:
            q_split = (q_split + 1) // 2
    return h_split, q_split


def _key_bias(kl: SlotLayout, key_padding: torch.Tensor | None) -> torch.Tensor | None:
    """0 / -inf per key slot [B or 1, Lk]: padding slots and padded-out keys contribute nothing."""
    if key_padding is None and not kl.padded:
        return None
    keep = (kl.tok >= 0)[None, :]
    if key_padding is not None:
        keep = keep & (key_padding[:, kl.tok.clamp(min=0).long()] != 0)
    zero = torch.zeros((), device=kl.tok.device)
    return torch.where(keep, zero, zero - float("inf"))


def map_pass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, qplan, kplan,
             heads_table: torch.Tensor, mask: torch.Tensor | None = None, mask_kind: int = 0,
             key_padding: torch.Tensor | None = None, is_causal: bool = False,
             softcap: float | None = None) -> torch.Tensor:
    """Mean probability over (query bin, key bin) blocks, averaged over each head group.

    q [B,H,Nq,D], k [B,Hk,Nk,D] views (any strides); lse [B,H,Nq] fp32, natural log, -inf for a
    fully masked row (from the forward or another flash kernel); qplan/kplan AxisPlans on q's
    device; heads_table int32 [G, HPG]: the query heads averaged into output head g; mask and
    key_padding and softcap as kernels.forward takes them. Returns float32 [B, G, Qb, Kb].
    """
    B, H, Nq, D = q.shape
    Hk = k.shape[1]
    G, HPG = heads_table.shape
    dev = q.device
    cfg = map_config(D, is_causal or mask is not None, dev, q.element_size())
    block_d = max(16, triton.next_power_of_2(D))
    # Small unpooled axes (selected query rows) take a small tile instead of a mostly empty one.
    block_m = cfg.block_m if qplan.pooled else min(cfg.block_m, max(16, triton.next_power_of_2(qplan.nslots)))
    ql, kl = lay_out(qplan, block_m), lay_out(kplan, cfg.block_n)
    kg = k.index_select(2, kl.tok.clamp(min=0).long())                     # [B, Hk, Lk, D], bin-major
    kg = (F.pad(kg, (0, block_d - D)) if block_d != D else kg).contiguous()
    bias = _key_bias(kl, key_padding)
    qscale = 2.0 ** -P_SCALE_LOG2 / (qplan.counts * HPG)
    kscale = 1.0 / kplan.counts
    work = ql.n_tiles // ql.span * B * G
    h_split, q_split = _splits(work, ql.span, HPG, B * G * ql.nbins * kl.nbins * 4, sm_count(dev))
    hps = triton.cdiv(HPG, h_split)
    h_split = triton.cdiv(HPG, hps)
    partial = torch.empty((h_split * q_split, B, G, ql.nbins, kl.nbins), device=dev, dtype=torch.float32)
    grid = (ql.n_tiles // ql.span * q_split, h_split, B * G)
    args = (q, kg, lse.contiguous(), ql.tok, kl.tok, bias if bias is not None else kscale, qscale, kscale,
            mask if mask is not None else q, partial, heads_table,
            *q.stride(), kg.stride(0), kg.stride(1), *strides_or_zeros(mask, 4),
            bias.stride(0) if bias is not None and bias.shape[0] > 1 else 0, *partial.stride()[:4],
            H, Nq, H // Hk, G, HPG, hps, q_split, kl.n_tiles, ql.nbins, kl.nbins, *score_factors(scale, softcap))
    launch(attn_map_kernel, grid, args, dict(
        HEAD_D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        Q_BIN_SLOTS=ql.bin_slots, Q_BINS=ql.bins_per_tile, Q_SPAN=ql.span, QW=ql.bins_width,
        K_BIN_SLOTS=kl.bin_slots, K_BINS=kl.bins_per_tile, K_SPAN=kl.span, KW=kl.bins_width,
        IS_CAUSAL=is_causal, MASK_KIND=mask_kind, HAS_KBIAS=bias is not None,
        POOL_F16=q.element_size() == 2, DOT_F32=dot_in_f32(q), IEEE=q.dtype == torch.float32,
        SOFTCAP=softcap is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)
