"""What transformers' attention functions do besides softmax(QK^T)V, done exactly or refused.

- Calls attncap leaves alone (steps, layers or relations not asked for) run on the attention the model
  was configured with: its own eager_attention_forward when that is what it used (models that do
  not support SDPA default to it) or when the call carries something SDPA ignores (sinks), else
  transformers' sdpa_attention_forward. Capture never switches a model onto different math.
- Attention sinks (GPT-OSS and others pass ``s_aux``, one logit per query head that joins the
  softmax's normaliser and carries no value) are captured exactly: one extra key whose score is the
  sink (two extra head dims: q gets sink / scale split into a high and a low part so low precision
  keeps it, the sink key gets ones there, real keys zeros) and whose value is zero. Every product
  is then normalised over the real keys and the sink, as eager's weights are; the sink's own
  column is a "sink" key segment.
- Logit softcapping (Gemma 2 passes ``softcap``: scores = cap * tanh(scores / cap) after the scaling,
  before the mask) is captured exactly: attncap.attention takes the same ``softcap``. Calls left
  alone soft-cap on the model's eager attention as before (SDPA would refuse them).

Shape legend: B batch, H query heads, Hk key heads, Nq queries, Nk keys, D head dim, Dv value dim.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ..validate import MAX_HEAD_DIM

SINK_KWARGS = ("s_aux", "sinks")


def sinks_of(kwargs: dict) -> torch.Tensor | None:
    for key in SINK_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    """Bool [1, 1, Nq, Nk] mask of torch SDPA's is_causal (top-left aligned)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()[None, None]


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = attend) as the additive float mask eager attention functions add."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
              sinks: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv], sinks [H] -> q [B, H, Nq, D+2],
    k [B, Hk, Nk+1, D+2], v [B, Hk, Nk+1, Dv] and a mask [.., Nq, Nk+1] that always lets the sink in
    (is_causal folded into it; None when there was no mask at all). scale * q'.k'_sink = sinks[h]; q'.k'_j = q.k_j for every real key."""
    b, h, nq, d = q.shape
    if d + 2 > MAX_HEAD_DIM:
        raise ValueError(f"attention sinks need head dim + 2 <= {MAX_HEAD_DIM} in attncap; this layer has {d}")
    if sinks.numel() != h:
        raise ValueError(f"attention sinks: expected one sink logit per query head ({h}); got shape "
                         f"{tuple(sinks.shape)}")
    target = (sinks.detach().double() / scale).reshape(1, h, 1, 1).expand(b, h, nq, 1)
    hi = target.to(q.dtype)
    lo = (target - hi.double()).to(q.dtype)
    q2 = torch.cat([q, hi, lo], dim=-1)
    k2 = torch.cat([k, k.new_zeros(*k.shape[:3], 2)], dim=-1)
    sink_key = k.new_zeros(*k.shape[:2], 1, d + 2)
    sink_key[..., d:] = 1
    k2 = torch.cat([k2, sink_key], dim=2)
    v2 = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
    nk = k.shape[2]
    if mask is None and not is_causal:  # the sink is one more key nothing masks
        return q2, k2, v2, None
    if mask is None:
        mask = causal_mask(nq, nk, q.device)
    while mask.dim() < 4:
        mask = mask[None]
    open_ = torch.ones(*mask.shape[:3], 1, dtype=mask.dtype, device=mask.device)
    if mask.dtype != torch.bool:
        open_ = torch.zeros_like(open_)
    return q2, k2, v2, torch.cat([mask.expand(*mask.shape[:2], nq, nk), open_], dim=-1)


def original_forward(module: torch.nn.Module, impl: str | None, query, key, value, attention_mask, scaling,
                     dropout, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """The model's own attention for a call attncap leaves alone (see the module docstring)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None and (impl == "eager" or sinks_of(kwargs) is not None or kwargs.get("softcap") is not None):
        mask = attention_mask
        if mask is None and query.shape[2] > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True)):
            # sdpa's mask builder leaves a pure causal mask to SDPA's is_causal; eager needs it spelled out
            # (bottom-right aligned, as transformers' causal masks are).
            nq, nk = query.shape[2], key.shape[2]
            mask = torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril(nk - nq)[None, None]
        kw = {k: v for k, v in kwargs.items() if k != "is_causal"}
        if scaling is None:  # SDPA's default, which the modules that pass None (Llama 4's tower) use eagerly too
            scaling = query.shape[-1] ** -0.5
        return eager(module, query, key, value, additive(mask, query.dtype), scaling=scaling, dropout=dropout, **kw)
    if sinks_of(kwargs) is not None:
        raise ValueError(f"{type(module).__name__} passes attention sinks but its modeling file has no "
                         "eager_attention_forward to run them; attncap will not drop them silently")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)
