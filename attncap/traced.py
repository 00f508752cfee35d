"""A captured attention call inside a torch.compile'd graph: one custom op, ``attncap::captured_call``.

Eager capture routes a layer's attention through Python (a context variable, the SDPA mode, the
dispatcher's wrappers) and files the products into the store: nothing of that can be a graph
node. Under torch.compile the routing is traced instead (attncap.intercept keeps the traced
handler in a plain attribute), and where the model would call its attention backend the trace
records one call of this op: q, k, v, the mask and a small integer tensor naming the captured
layer. At run time the op's implementation, which the compiler never traces, finds the layer's
route by that number and does what the eager capture does: attncap.attention (output and
products in one call), filing into the store, the coverage ledger; it returns the output. So the
attention stays in the graph, the projections and everything around it compile with it, filing
happens once per call outside the graph, and a layer number that is a tensor, not a constant,
lets identical blocks (regional compilation) share one graph. The fake implementation gives the
output's shape: q's with v's head dim, in q's layout.

Shape legend: B batch, H heads, N tokens, D q/k head dim, Dv v head dim; "bhsd" [B, H, N, D] as
torch SDPA, "bshd" [B, N, H, D] as diffusers' dispatcher.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable, Optional

import torch

# route(index, q, k, v, mask, dropout_p, is_causal, scale, layout, cp) -> output, or None: the call is
# not captured (the route has noted why) and runs as plain SDPA.
Route = Callable[..., Optional[torch.Tensor]]

_routes: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_numbers = itertools.count(1)
# Compiled captured calls hold host-side effects (filing): a CUDA graph replay would skip them.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def register(owner: object) -> torch.Tensor:
    """A number for ``owner`` (an object with a ``route`` method, kept by weak reference) as the int64
    scalar tensor a traced call passes to the op: a graph input, so the graph does not depend on it."""
    number = next(_numbers)
    _routes[number] = owner
    return torch.tensor(number, dtype=torch.int64)


def call(ident: torch.Tensor, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None, layout: str,
         cp: bool) -> torch.Tensor:
    """What a traced captured call records: call ``index`` of the processor call of route ``ident``."""
    return torch.ops.attncap.captured_call(q, k, v, attn_mask, ident, index, float(dropout_p), bool(is_causal),
                                           scale, layout, bool(cp))


@torch.library.custom_op("attncap::captured_call", mutates_args=(), tags=_TAGS)
def _captured_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   ident: torch.Tensor, index: int, dropout_p: float, is_causal: bool, scale: Optional[float],
                   layout: str, cp: bool) -> torch.Tensor:
    owner = _routes.get(int(ident))  # a CPU scalar: reading it waits on no device
    out = None
    if owner is not None:
        out = owner.route(index, q, k, v, attn_mask, dropout_p, is_causal, scale, layout, cp)
    if out is None:
        out = _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, layout)
    return out.contiguous()  # the fake's strides: compiled code after the op may view it as contiguous


@_captured_call.register_fake
def _(q, k, v, attn_mask, ident, index, dropout_p, is_causal, scale, layout, cp):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, layout: str) -> torch.Tensor:
    """A call the route left alone: torch SDPA, as diffusers' native backend computes it."""
    if layout == "bshd":  # a dispatcher call: its [B, Nk] mask is key padding
        from .integrations.diffusers.dispatch import dispatch_mask

        attn_mask = dispatch_mask(attn_mask, q, k)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                           is_causal=is_causal, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2) if layout == "bshd" else out
