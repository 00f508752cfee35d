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

Eagerly the active handler lives in a context variable (per thread). Dynamo cannot trace a context
variable, so while torch.compile traces a captured call (attncap.traced) the handler lives in a
plain module attribute instead: the trace sees it set and read like any Python state.
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


class _Traced:
    """The handler of the captured call that torch.compile is tracing (see the module docstring)."""

    def __init__(self) -> None:
        self.current: Handler | None = None  # an instance attribute from the start: traces guard on it


traced = _Traced()


def active_handler() -> Handler | None:
    """The handler of the captured call running on this thread (or being traced), if any."""
    if torch.compiler.is_compiling():
        return traced.current
    return _active.get()


@contextmanager
def handling(handler: Handler | None) -> Iterator[None]:
    """Make ``handler`` the active handler inside the block (None: nothing is intercepted)."""
    token = _active.set(handler)
    try:
        yield
    finally:
        _active.reset(token)


def passthrough() -> object:
    """Mark the original of an intercepted call as running: inner SDPA calls are left alone until
    ``end_passthrough`` with the token this returns."""
    if torch.compiler.is_compiling():
        token, traced.current = traced.current, None
        return token
    return _active.set(None)


def end_passthrough(token: object) -> None:
    """The original has returned: the handler ``passthrough`` put aside is active again."""
    if torch.compiler.is_compiling():
        traced.current = token
    else:
        _active.reset(token)


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
