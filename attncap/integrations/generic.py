"""Capture any torch.nn.Module that calls scaled_dot_product_attention (PartCrafter, the original Wan
code, your own DiT), however it imported the function.

The SDPA calls are caught by a TorchFunctionMode (attncap.intercept), and, when diffusers is loaded,
its dispatcher's attention backends too (a diffusers model captured with layout=, on flex or flash
alike: attncap.integrations.diffusers.dispatch); forward pre-hooks on every
submodule track the innermost module running, whose path ("blocks.0.attn") names the layer. Each
call of the top module's forward is one step. The token layout of a call comes from the user:

    layout=None                        one segment "tokens" on each axis
    layout=[("part0", 64, (4, 4, 4)),  consecutive (name, length, grid) runs; an axis whose length is
            ("part1", 64, (4, 4, 4)),  the total takes them all, an axis whose length is the total of
            ("text", 16, None)]        one contiguous run of them takes that run (cross-attention
                                       parts -> text), any other axis is one "tokens" segment
    layout={"queries": [...], "keys": [...]}   the same, per axis
    layout=callable(layer, q, k) -> attncap.session.CallLayout | None   (None: leave the call to SDPA)

relations="auto" means every pair of segments of a call.
"""
from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from typing import Any, Callable, Sequence

import torch

from ..intercept import handling, intercept_sdpa
from ..session import CallLayout, CaptureSession, Segment

ROOT = "root"  # the layer name of SDPA calls made by the top module's own forward
AXES = ("queries", "keys")


# --------------------------------------------------------------------------------- layouts
def _entry(entry: Any, where: str) -> tuple[str, int, tuple[int, ...] | None]:
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise ValueError(f"{where}: each layout segment is (name, length) or (name, length, grid); got {entry!r}")
    name, length = entry[0], entry[1]
    grid = entry[2] if len(entry) == 3 else None
    if not isinstance(name, str) or not name or "->" in name:
        raise ValueError(f"{where}: segment names are non-empty strings without '->'; got {name!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"{where}: segment {name!r} needs a positive int length; got {length!r}")
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if not 1 <= len(grid) <= 3 or min(grid) < 1 or math.prod(grid) != length:
            raise ValueError(f"{where}: segment {name!r} has grid {grid} of {math.prod(grid)} tokens but length "
                             f"{length}; give 1 to 3 sizes (t, h, w) whose product is the length, or None")
    return name, length, grid


def _entries(spec: Any, where: str) -> list[tuple[str, int, tuple[int, ...] | None]]:
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"{where} must be a non-empty list of (name, length, grid) segments; got {spec!r}")
    out = [_entry(e, where) for e in spec]
    names = [e[0] for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: segment names must be distinct on an axis; got {names}")
    return out


def check_layout(layout: Any) -> Any:
    """Validate a layout= argument before anything is installed; returns it normalised."""
    if layout is None or callable(layout):
        return layout
    if isinstance(layout, dict):
        extra = set(layout) - set(AXES)
        if extra or not layout:
            raise ValueError(f"a layout dict has the keys 'queries' and/or 'keys'; got {sorted(map(str, layout))}")
        return {axis: _entries(layout[axis], f"layout[{axis!r}]") for axis in AXES if axis in layout}
    return _entries(layout, "layout")


def _axis(entries, n: int) -> tuple[Segment, ...]:
    """The segments of an axis of n tokens: all entries, else the one contiguous run of them that sums
    to n, else one "tokens" segment."""
    lengths = [e[1] for e in entries]
    runs = [(i, j) for i in range(len(entries)) for j in range(i + 1, len(entries) + 1)
            if sum(lengths[i:j]) == n]
    if (0, len(entries)) in runs:
        runs = [(0, len(entries))]
    if len(runs) != 1:
        return (Segment("tokens", 0, n),)
    i, j = runs[0]
    segs, start = [], 0
    for name, length, grid in entries[i:j]:
        segs.append(Segment(name, start, start + length, grid))
        start += length
    return tuple(segs)


def layout_for(layout: Any, layer: str, q: torch.Tensor, k: torch.Tensor) -> CallLayout | None:
    """The CallLayout of one SDPA call under a (checked) layout= argument."""
    nq, nk = q.shape[-2], k.shape[-2]
    if layout is None:
        return CallLayout((Segment("tokens", 0, nq),), (Segment("tokens", 0, nk),))
    if callable(layout):
        out = layout(layer, q, k)
        if out is not None and not isinstance(out, CallLayout):
            raise TypeError(f"a layout callable returns an attncap.session.CallLayout or None; got "
                            f"{type(out).__name__} for layer {layer!r}")
        if out is not None:
            for axis, segs, n in (("queries", out.queries, nq), ("keys", out.keys, nk)):
                bad = [s for s in segs if not 0 <= s.start < s.stop <= n]
                if bad:
                    raise ValueError(f"layout callable for layer {layer!r}: {axis} segments {bad} do not fit the "
                                     f"{n} tokens of this call")
        return out
    if isinstance(layout, dict):
        qs = _axis(layout["queries"], nq) if "queries" in layout else (Segment("tokens", 0, nq),)
        ks = _axis(layout["keys"], nk) if "keys" in layout else (Segment("tokens", 0, nk),)
        return CallLayout(qs, ks)
    return CallLayout(_axis(layout, nq), _axis(layout, nk))


def all_relations(layout: CallLayout) -> tuple[str, ...]:
    return tuple(f"{a.name}->{b.name}" for a, b in layout.relations())


def check_steps(session: CaptureSession, what: str) -> None:
    if session.config.steps == "last":
        raise ValueError(f"steps='last' needs the number of steps up front, which {what} does not know; "
                         "give step indices (steps=[0, 3]) or 'all'")


# --------------------------------------------------------------------------------- capture
class GenericCapture:
    """SDPA interception plus module-path and step hooks on one module; restore() undoes all of it."""

    def __init__(self, module: torch.nn.Module, session: CaptureSession, layout: Any = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"generic capture needs a torch.nn.Module; got {type(module).__name__}")
        self.module = module
        self.session = session
        self.layout = check_layout(layout)
        self._hooks: list[Any] = []
        self._stack: list[str] = []
        self._exit = ExitStack()

    def install(self) -> None:
        check_steps(self.session, "a plain module")
        try:
            self._hooks.append(self.module.register_forward_pre_hook(self._step_hook))
            for name, sub in self.module.named_modules():
                layer = name or ROOT
                self._hooks.append(sub.register_forward_pre_hook(self._push(layer)))
                self._hooks.append(sub.register_forward_hook(self._pop(layer), always_call=True))
            self._exit.enter_context(intercept_sdpa(self._handler))
            if "diffusers" in sys.modules:
                from .diffusers.dispatch import dispatcher_routed

                self._exit.enter_context(dispatcher_routed())
                self._exit.enter_context(handling(self))
        except Exception:
            self.restore()
            raise

    def restore(self) -> None:
        self._exit.close()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._stack.clear()

    def _step_hook(self, module, args) -> None:
        st = self.session.state
        if self._stack:  # a re-entrant call of the top module inside its own forward: same step
            return None
        st.advance(None)
        st.active = self.session.config.wants_step(st.step, None)
        return None

    def _push(self, layer: str) -> Callable:
        def hook(module, args):
            self._stack.append(layer)

        return hook

    def _pop(self, layer: str) -> Callable:
        def hook(module, args, output):
            if self._stack and self._stack[-1] == layer:
                self._stack.pop()
            elif layer in self._stack:  # unbalanced after an exception deeper down
                del self._stack[len(self._stack) - 1 - self._stack[::-1].index(layer):]

        return hook

    def from_dispatch(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, _parallel_config=None, **backend_kwargs):
        """A diffusers backend's call ([B, N, H, D]; a [B, Nk] mask is key padding): the SDPA handler's."""
        from .diffusers.dispatch import dispatch_mask

        if _parallel_config is not None or (attn_mask is not None and not isinstance(attn_mask, torch.Tensor)):
            return None
        attn_mask = dispatch_mask(attn_mask, query, key)
        out = self._handler(*(x.transpose(1, 2) for x in (query, key, value)), attn_mask=attn_mask,
                            dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return None if out is None else out.transpose(1, 2)

    def _handler(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        st = self.session.state
        if not self._stack or not st.active or dropout_p:
            return None
        layer = self._stack[-1]
        if not self.session.config.wants_layer(layer):
            return None
        if not all(isinstance(t, torch.Tensor) for t in (query, key, value)) or query.dim() not in (3, 4) \
                or key.dim() != query.dim() or value.dim() != query.dim():
            return None
        squeeze = query.dim() == 3
        if squeeze:  # [B, N, D]: one head
            query, key, value = query[:, None], key[:, None], value[:, None]
            if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 3:
                attn_mask = attn_mask[:, None]
        if key.shape[1] != query.shape[1] and not enable_gqa:
            return None  # SDPA raises its own error for this
        layout = layout_for(self.layout, layer, query, key)
        if layout is None:
            return None
        out = self.session.capture_call(layer, layout, all_relations(layout), query, key, value,
                                        attn_mask=attn_mask, is_causal=bool(is_causal), scale=scale)
        if out is not None and squeeze:
            out = out[:, 0]
        return out
