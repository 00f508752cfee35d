"""Catch the attention of a captured call wherever it is computed.

Two routes lead to the same handler:
- torch.nn.functional.scaled_dot_product_attention, however it was imported: a TorchFunctionMode
  sees the call (intercept_sdpa);
- attention functions that never call SDPA (diffusers' flash, sage, flex, xformers backends, ...):
  an integration wraps them for the duration of a capture and asks ``active_handler()`` whether a
  captured call is running on this thread (attncap.integrations.diffusers.dispatch).

A handler returns the attention output, or None to let the original run. While the original of an
intercepted function runs (``passthrough``), SDPA calls it makes itself are not a second attention
call of the layer and go straight through.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

SDPA = torch._C._nn.scaled_dot_product_attention
Handler = Callable[..., "torch.Tensor | None"]

_active: contextvars.ContextVar[Handler | None] = contextvars.ContextVar("attncap_handler", default=None)


def active_handler() -> Handler | None:
    """The handler of the captured call running on this thread, if any."""
    return _active.get()


@contextmanager
def handling(handler: Handler | None) -> Iterator[None]:
    """Make ``handler`` the active handler inside the block (None: nothing is intercepted)."""
    token = _active.set(handler)
    try:
        yield
    finally:
        _active.reset(token)


def passthrough() -> contextvars.Token:
    """Mark the original of an intercepted call as running: inner SDPA calls are left alone."""
    return _active.set(None)


class _SDPAMode(TorchFunctionMode):
    def __init__(self, handler: Handler | None):
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            handler = active_handler() if self.handler is None else self.handler
            if handler is not None:
                out = handler(*args, **kwargs)
                if out is not None:
                    return out
        return func(*args, **kwargs)


@contextmanager
def intercept_sdpa(handler: Handler | None = None) -> Iterator[None]:
    """Inside the block, every SDPA call goes to handler(query, key, value, attn_mask=None,
    dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) first; with handler=None, to
    the active handler of the thread (see ``handling``) when there is one."""
    with _SDPAMode(handler):
        yield
