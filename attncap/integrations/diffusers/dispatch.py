"""diffusers' attention dispatcher and classic processors, routed to the active capture handler.

``dispatch_attention_fn`` looks its backend function up in ``_AttentionBackendRegistry._backends``
(a plain dict, read on every call). While any capture is open, every registered backend is replaced
by a thin wrapper: on a captured call of this thread it hands q, k, v ([B, N, H, D], the
dispatcher's layout) to the capture handler, whose exact attention replaces the backend's; every
other call goes to the user's backend untouched. The wrappers are installed once however many
captures are open (reference count) and the originals are put back when the last one closes.

Classic processors (AttnProcessor, AttnAddedKVProcessor, ...) compute the probabilities themselves
through ``Attention.get_attention_scores``; ``classic_scores`` wraps that method on one module for the
duration of one call. The processor keeps its own probabilities (its output is unchanged) and the
handler computes the products from the same q and k.

Shape legend: B batch, N tokens, H heads, D head dim, BH = B * H (classic processors' batch of heads).
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ...intercept import active_handler, end_passthrough, passthrough

_lock = threading.Lock()
_open = 0
_originals: dict[Any, Callable] = {}


def _registry():
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # a diffusers without the dispatcher: processors call SDPA directly
        return None
    return _AttentionBackendRegistry


def _wrap_backend(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def backend(*args, **kwargs):
        handler = active_handler()
        if handler is not None and not args and not kwargs.get("return_lse", False):
            out = handler.from_dispatch(**kwargs)
            if out is not None:
                return out
        token = passthrough()
        try:
            return fn(*args, **kwargs)
        finally:
            end_passthrough(token)

    backend.__attncap_original__ = fn
    return backend


@contextmanager
def dispatcher_routed() -> Iterator[None]:
    """Route every diffusers attention backend through the active capture handler inside the block."""
    global _open
    registry = _registry()
    if registry is None:
        yield
        return
    with _lock:
        if _open == 0:
            _originals.clear()
            for name, fn in list(registry._backends.items()):
                _originals[name] = fn
                registry._backends[name] = _wrap_backend(fn)
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                for name, fn in _originals.items():
                    # a backend registered or replaced by someone else meanwhile stays theirs
                    if getattr(registry._backends.get(name), "__attncap_original__", None) is fn:
                        registry._backends[name] = fn
                _originals.clear()


@contextmanager
def classic_scores(attn: torch.nn.Module, handler: Any) -> Iterator[None]:
    """Inside the block, ``attn.get_attention_scores`` also hands its q and k to the handler."""
    original = getattr(attn, "get_attention_scores", None)
    if original is None or "get_attention_scores" in vars(attn):
        yield
        return

    def get_attention_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None):
        token = passthrough()
        try:
            probs = original(query, key, attention_mask)
        finally:
            end_passthrough(token)
        handler.from_classic(attn, query, key, attention_mask)
        return probs

    attn.get_attention_scores = get_attention_scores
    try:
        yield
    finally:
        vars(attn).pop("get_attention_scores", None)


def dispatch_mask(attn_mask, query: torch.Tensor, key: torch.Tensor):
    """A dispatcher call's mask as attncap takes it: a [B, Nk] key-padding mask becomes [B, 1, 1, Nk] (as
    diffusers' native backend reshapes it); None when it is not a tensor attncap can use (a flex BlockMask)."""
    if attn_mask is None or not isinstance(attn_mask, torch.Tensor):
        return None
    if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (query.shape[0], key.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


def classic_to_heads(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[BH, N, D] q, k and a [BH, 1 | Nq, Nk] additive mask as [B, H, N, D] and [B, H, 1 | Nq, Nk]."""
    heads = attn.heads
    bh = query.shape[0]
    if bh % heads:
        raise ValueError(f"classic attention: {bh} rows of q are not a multiple of the module's {heads} heads")
    q = query.reshape(bh // heads, heads, *query.shape[1:])
    k = key.reshape(bh // heads, heads, *key.shape[1:])
    if mask is not None:
        mask = mask.reshape(bh // heads, heads, *mask.shape[1:]) if mask.shape[0] == bh else mask
    return q, k, mask
