"""The capture processor: a stand-in for a diffusers attention processor.

diffusers drops every keyword a processor's __call__ does not declare, so the stand-in's __call__
carries the exact signature of the processor it replaces (a small subclass per processor class).
On a captured call it runs the original processor with SDPA intercepted: the original still does
its projections, norms, rotary embeddings and concatenations, and attncap computes the attention
once, output and maps together. On any other call it is the original processor, untouched.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from ...intercept import intercept_sdpa
from ...session import CallLayout, CaptureSession

LayoutFn = Callable[[int, int, int], "CallLayout | None"]  # (call index, Nq, Nk) -> layout


class CaptureProcessor:
    def __init__(self, original: Any, layer: str, session: CaptureSession, layout_fn: LayoutFn,
                 default_relations: tuple[str, ...]):
        self.original = original
        self.layer = layer
        self.session = session
        self.layout_fn = layout_fn
        self.default_relations = default_relations

    def __getattr__(self, name: str) -> Any:
        # Attributes diffusers reads or sets on processors (_attention_backend, ...) stay the original's.
        return getattr(self.__dict__["original"], name)

    def _run(self, attn, *args, **kwargs):
        if not self.session.state.active:
            return self.original(attn, *args, **kwargs)
        call_index = iter(range(1_000_000))

        def handler(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            index = next(call_index)
            if dropout_p:
                return None
            layout = self.layout_fn(index, query.shape[-2], key.shape[-2])
            if layout is None:
                return None
            return self.session.capture_call(self.layer, layout, self.default_relations, query, key, value,
                                             attn_mask=attn_mask, is_causal=is_causal, scale=scale)

        with intercept_sdpa(handler):
            return self.original(attn, *args, **kwargs)


_classes: dict[type, type] = {}


def make_capture_processor(original: Any, layer: str, session: CaptureSession, layout_fn: LayoutFn,
                           default_relations: tuple[str, ...]) -> CaptureProcessor:
    """A CaptureProcessor whose __call__ signature is that of ``original``'s class."""
    base = type(original)
    cls = _classes.get(base)
    if cls is None:
        def __call__(self, *args, **kwargs):
            return self._run(*args, **kwargs)

        __call__.__signature__ = inspect.signature(base.__call__)
        cls = type(f"Capture{base.__name__}", (CaptureProcessor,), {"__call__": __call__})
        _classes[base] = cls
    return cls(original, layer, session, layout_fn, default_relations)
