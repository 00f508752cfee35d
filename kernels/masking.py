"""Score masking shared by the forward and the map pass.

Scores are in log2 units (scale * log2(e) * q.k) so the kernels can use exp2. A masked score is
-inf; a row whose every key is masked is handled by the callers (zeros, never NaN).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def score_factors(scale: float, softcap: float | None) -> tuple[float, float, float]:
    """(scale_log2, cap_in, cap_out), the kernels' score arguments: q.k * scale_log2 is the log2 score,
    after softcapped(q.k, cap_in, cap_out) when softcap is set (the cap then carries the scale)."""
    if softcap is None:
        return scale * LOG2E, 1.0, 1.0
    return 1.0, scale / softcap, softcap * LOG2E


@triton.jit
def masked_scores(s, tok_m, tok_n, valid_m, valid_n, b, h,
                  MASK, stride_mb, stride_mh, stride_mq, stride_mk,
                  KPM, stride_pb, stride_pk,
                  IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr):
    """Apply causal / boolean / additive / key-padding masks to a [M, N] tile of log2 scores.

    tok_m [M], tok_n [N]: absolute query and key token indices (int64) of the tile's rows/columns.
    MASK_KIND: 0 none, 1 boolean (nonzero = attend), 2 additive (natural-log units).
    """
    keep = valid_m[:, None] & valid_n[None, :]
    if IS_CAUSAL:
        # Top-left alignment, as torch SDPA: query i sees keys j <= i, also when Nq != Nk.
        keep = keep & (tok_n[None, :] <= tok_m[:, None])
    if MASK_KIND != 0:
        m_ptrs = (MASK + b * stride_mb + h * stride_mh
                  + tok_m[:, None] * stride_mq + tok_n[None, :] * stride_mk)
        if MASK_KIND == 1:
            keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
        else:
            s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_pb + tok_n * stride_pk, mask=valid_n, other=0)
        keep = keep & (kp[None, :] != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def softcapped(qk, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """q.k as it enters the scores: unchanged, or with SOFTCAP the log2 scores of logit softcapping,
    cap * tanh(scale * q.k / cap) * log2(e) with cap_in = scale / cap, cap_out = cap * log2(e) (the
    launcher then passes scale_log2 = 1). tanh(x) = 1 - 2 / (exp(2x) + 1) in fp32, as tl has no tanh:
    +-1 at large |x| (exp gives inf or 0, never NaN); absolute error ~1 ulp of 1, i.e. ~cap * 6e-8
    in the score, the size of the fp32 rounding of a score of that magnitude."""
    if SOFTCAP:
        return cap_out * (1.0 - 2.0 / (tl.exp(2.0 * cap_in * qk) + 1.0))
    else:
        return qk
