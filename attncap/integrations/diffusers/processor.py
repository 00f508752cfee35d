"""The capture processor: a stand-in for a diffusers attention processor.

diffusers drops every keyword a processor's __call__ does not declare, so the stand-in's __call__
carries the exact signature of the processor it replaces (a small subclass per processor class).
On a captured call it runs the original processor with its attention routed to attncap: the
original still does its projections, norms, rotary embeddings and concatenations, and attncap
computes the attention once, output and maps together, whether the processor calls torch SDPA,
diffusers' dispatch_attention_fn with any backend, or the classic get_attention_scores. On any
other call it is the original processor, untouched.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ...intercept import handling, intercept_sdpa
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

    def __setattr__(self, name: str, value: Any) -> None:
        # enable_parallelism / set_attention_backend set attributes on the processor they find: the original's.
        if name in ("original", "layer", "session", "layout_fn", "default_relations"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__["original"], name, value)

    def _run(self, attn, *args, **kwargs):
        if not self.session.state.active:
            return self.original(attn, *args, **kwargs)
        return self._captured(attn, *args, **kwargs)

    @torch.compiler.disable
    def _captured(self, attn, *args, **kwargs):
        """A captured call. Under torch.compile it runs eagerly, between two graphs (one graph break on
        each side): its routing (context variables, the SDPA mode, the dispatcher's wrappers) and the
        filing into the store are Python that Dynamo cannot trace; attncap.attention itself compiles
        (fullgraph=True) wherever it is called from traced code. See attncap.compiled."""
        handler = CallHandler(self)
        self.session.entered(self.layer)
        with handling(handler), intercept_sdpa(), classic_scores(attn, handler):
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
