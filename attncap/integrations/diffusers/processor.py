"""The capture processor: a stand-in for a diffusers attention processor.

diffusers drops every keyword a processor's __call__ does not declare, so the stand-in's __call__
carries the exact signature of the processor it replaces (a small subclass per processor class).
On a captured call it runs the original processor with its attention routed to attncap: the
original still does its projections, norms, rotary embeddings and concatenations, and attncap
computes the attention once, output and maps together, whether the processor calls torch SDPA,
diffusers' dispatch_attention_fn with any backend, or the classic get_attention_scores. On any
other call it is the original processor, untouched.

Under torch.compile a captured call is traced like the original (projections, norms, rotary
embeddings compile as before) and each of its attention calls becomes one attncap::captured_call
node (attncap.traced) that runs this module's CallHandler at run time. Classic processors, whose
probabilities come from a method attncap wraps per call, run eagerly between graphs instead.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ... import traced
from ...intercept import _SDPAMode, handling, intercept_sdpa
from ...intercept import traced as traced_route
from ...session import CallLayout, CaptureSession
from .. import parallel
from .dispatch import classic_scores, classic_to_heads, dispatch_mask

# (call index, Nq, Nk) -> layout, or a string saying why this call has none
LayoutFn = Callable[[int, int, int], "CallLayout | str"]


class CallHandler:
    """The attention calls of one captured processor call, in the order they happen."""

    def __init__(self, proc: "CaptureProcessor"):
        self.proc = proc
        self.index = 0

    def _capture(self, query, key, value, attn_mask, dropout_p, is_causal, scale, layout: str):
        session, layer = self.proc.session, self.proc.layer
        index = self.index
        self.index += 1
        if dropout_p:
            session.note(layer, "attention dropout is on (attncap computes attention without dropout)")
            return None
        nq, nk = (query.shape[1], key.shape[1]) if layout == "bshd" else (query.shape[-2], key.shape[-2])
        mesh = parallel.cp_mesh(getattr(self.proc.original, "_parallel_config", None))
        if mesh is not None and not is_causal:
            # Under context parallelism a call the processor keeps local may still see sharded queries.
            return self._sharded(index, query, key, value, attn_mask, scale, layout, mesh, cp_call=False)
        call_layout = self.proc.layout_fn(index, nq, nk)
        if isinstance(call_layout, str):
            session.note(layer, call_layout)
            return None
        return session.capture_call(layer, call_layout, self.proc.default_relations, query, key, value,
                                    attn_mask=attn_mask, is_causal=is_causal, scale=scale, layout_name=layout)

    def _sharded(self, index, query, key, value, attn_mask, scale, layout: str, mesh, cp_call: bool):
        """A call of a context-parallel rank: find which axes are sharded, then attncap.integrations.parallel."""
        if layout == "bhsd":
            out = self._sharded(index, *(x.transpose(1, 2) for x in (query, key, value)), attn_mask, scale, "bshd",
                                mesh, cp_call)
            return None if out is None else out.transpose(1, 2)
        nq, nk, w = query.shape[1], key.shape[1], mesh.world
        options = [(True, True)] if cp_call else [(True, False), (False, False), (True, True)]
        for q_split, k_split in options:
            call_layout = self.proc.layout_fn(index, nq * w if q_split else nq, nk * w if k_split else nk)
            if not isinstance(call_layout, str):
                break
        else:
            self.proc.session.note(self.proc.layer, call_layout + f" (a context-parallel rank of {w})")
            return None
        if k_split and not cp_call:
            self.proc.session.note(self.proc.layer, "sharded keys in a call diffusers does not run context-parallel")
            return None
        call = parallel.ShardedCall(self.proc.session, self.proc.layer, call_layout, self.proc.default_relations,
                                    mesh, cp_call, q_split, k_split, self.proc.session.cp_store)
        return call.run(query, key, value, scale, attn_mask)

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        """torch SDPA's call: [B, H, N, D]."""
        if query.dim() != 4:
            self.proc.session.note(self.proc.layer, f"an SDPA call with {query.dim()}-d q (attncap takes [B, H, N, D])")
            self.index += 1
            return None
        return self._capture(query, key, value, attn_mask, dropout_p, is_causal, scale, "bhsd")

    def from_dispatch(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, _parallel_config=None, **backend_kwargs):
        """A diffusers backend's call: [B, N, H, D]; a [B, Nk] mask is key padding."""
        if _parallel_config is not None:
            mesh = parallel.cp_mesh(_parallel_config)
            if is_causal:
                self.proc.session.note(self.proc.layer, "causal attention under context parallelism")
                self.index += 1
                return None
            if mesh is not None:
                index = self.index
                self.index += 1
                if dropout_p:
                    self.proc.session.note(self.proc.layer, "attention dropout is on")
                    return None
                return self._sharded(index, query, key, value, attn_mask, scale, "bshd", mesh, cp_call=True)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            self.proc.session.note(self.proc.layer, f"a {type(attn_mask).__name__} mask (attncap takes tensor masks)")
            self.index += 1
            return None
        attn_mask = dispatch_mask(attn_mask, query, key)
        return self._capture(query, key, value, attn_mask, dropout_p, is_causal, scale, "bshd")

    def from_classic(self, attn, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        """get_attention_scores' q, k [BH, N, D]: products only (the processor keeps its own probabilities)."""
        q, k, mask = classic_to_heads(attn, query, key, mask)
        # A one-column value: the output is discarded, the products come from the same softmax.
        self._capture(q, k, k[..., :1], mask, 0.0, False, attn.scale, "bhsd")


class TracedCalls:
    """The attention calls of one captured processor call while torch.compile traces it: each becomes
    an attncap::captured_call node naming this layer's route and the call's index (attncap.traced)."""

    def __init__(self, proc: "CaptureProcessor"):
        self.proc = proc
        self.index = 0

    def _record(self, query, key, value, attn_mask, dropout_p, is_causal, scale, layout: str, cp: bool):
        index = self.index
        self.index += 1
        return traced.call(self.proc.ident, index, query, key, value, attn_mask, dropout_p, is_causal, scale,
                           layout, cp)

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        """torch SDPA's call: [B, H, N, D]."""
        if query.dim() != 4:
            self.index += 1
            _note(self.proc, f"an SDPA call with {query.dim()}-d q (attncap takes [B, H, N, D])")
            return None
        return self._record(query, key, value, attn_mask, dropout_p, is_causal, scale, "bhsd", False)

    def from_dispatch(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, _parallel_config=None, **backend_kwargs):
        """A diffusers backend's call: [B, N, H, D]."""
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
            self.index += 1
            _note(self.proc, f"a {type(attn_mask).__name__} mask (attncap takes tensor masks)")
            return None
        return self._record(query, key, value, attn_mask, dropout_p, is_causal, scale, "bshd",
                            _parallel_config is not None)


@torch.compiler.disable
def _note(proc: "CaptureProcessor", reason: str | None) -> None:
    """At run time, for a traced call that records no captured_call: the layer ran, and why its call is
    left alone (reason None: none of its attention reached attncap). One graph break, only there."""
    proc.session.entered(proc.layer)
    if reason is not None:
        proc.session.note(proc.layer, reason)


class CaptureProcessor:
    _OWN = ("original", "layer", "session", "layout_fn", "default_relations", "ident", "traceable", "calls_sdpa")

    def __init__(self, original: Any, layer: str, session: CaptureSession, layout_fn: LayoutFn,
                 default_relations: tuple[str, ...]):
        self.original = original
        self.layer = layer
        self.session = session
        self.layout_fn = layout_fn
        self.default_relations = default_relations
        # the number a traced call names this layer by: a tensor, so identical blocks share one graph
        self.ident = traced.register(self)
        # classic processors compute their probabilities in get_attention_scores, wrapped per call
        names = type(original).__call__.__code__.co_names
        self.traceable = "get_attention_scores" not in names
        # The SDPA mode sees every torch call while it is on (eagerly ~40 us each, attncap's own compute
        # included; traced, Tensor.unflatten breaks the graph): only processors that do not call the
        # dispatcher get it (no diffusers processor calls both).
        self.calls_sdpa = "dispatch_attention_fn" not in names

    def __getattr__(self, name: str) -> Any:
        # Attributes diffusers reads or sets on processors (_attention_backend, ...) stay the original's.
        return getattr(self.__dict__["original"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # enable_parallelism / set_attention_backend set attributes on the processor they find: the original's.
        if name in CaptureProcessor._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__["original"], name, value)

    def _run(self, attn, *args, **kwargs):
        if not self.session.state.active:
            return self.original(attn, *args, **kwargs)
        if self.traceable and torch.compiler.is_compiling():
            return self._traced(attn, *args, **kwargs)
        return self._captured(attn, *args, **kwargs)

    @torch.compiler.disable
    def _captured(self, attn, *args, **kwargs):
        """A captured call run eagerly (under torch.compile only for classic processors: between two graphs)."""
        handler = CallHandler(self)
        self.session.entered(self.layer)
        with handling(handler), intercept_sdpa() if self.calls_sdpa else nullcontext(), classic_scores(attn, handler):
            return self.original(attn, *args, **kwargs)

    def _traced(self, attn, *args, **kwargs):
        """A captured call as torch.compile traces it: the original processor with its attention calls
        recorded as attncap::captured_call nodes (the handler in a plain attribute: attncap.intercept)."""
        calls = TracedCalls(self)
        outer, traced_route.current = traced_route.current, calls
        try:
            if self.calls_sdpa:
                with _SDPAMode(None):
                    out = self.original(attn, *args, **kwargs)
            else:
                out = self.original(attn, *args, **kwargs)
        finally:
            traced_route.current = outer
        if calls.index == 0:
            _note(self, None)
        return out

    def route(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, dropout_p: float,
              is_causal: bool, scale: float | None, layout: str, cp: bool) -> torch.Tensor | None:
        """Run time of a traced call (attncap::captured_call): call ``index`` of a processor call, as the
        eager handler would run it; None leaves it to plain SDPA (the reason is noted)."""
        if index == 0:
            self.session.entered(self.layer)
        handler = CallHandler(self)
        handler.index = index
        if layout == "bhsd":
            return handler(q, k, v, attn_mask, dropout_p, is_causal, scale)
        config = getattr(self.original, "_parallel_config", None) if cp else None
        return handler.from_dispatch(q, k, v, attn_mask, dropout_p, is_causal, scale, _parallel_config=config)


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
