"""Capture of torch.compile'd models: what a capture block leaves in Dynamo's caches.

Inside a capture block a captured call compiles into the model's graph (attncap.traced): the trace
guards on the capture's stand-in processors and wrapped backends, so the model's code gets one more
compiled entry, and after the block (processors and backends restored) those guards fail and the
model's original entry runs again, as before; a later block finds the capture entry still valid
(the layers' routes are graph inputs) and compiles nothing. Nothing needs dropping then.

Some captured calls still leave the graph: classic processors, and traced calls that break it (a
flex BlockMask, a processor attncap cannot route). Dynamo then compiles the model's frames split at
those calls, and an entry whose graph ends before the first attention guards on nothing the capture
changed: after the block it would still match, checked before the model's original entry, and the
model would keep running in pieces; and a frame whose new compile failed inside the block keeps a
"run eagerly" mark that splits it after the block too. So a capture notes, on entry, how many
compiled entries each code object holds and how many graph breaks Dynamo has counted; on exit, if
the block broke a graph or failed a compile, it drops (Dynamo's reset_code) every code object whose
entries changed, and the forward code of every module of the captured target: the first call after
the block compiles the model once more, whole, as it was before the block. Other compiled code keeps
its entries.

This reads Dynamo's private cache lists and counters (torch._dynamo.convert_frame.input_codes,
eval_frame._debug_get_cache_entry_list, utils.counters); if a torch version lacks them, nothing is
dropped and the capture still works (the model then may stay split after the block).
"""
from __future__ import annotations

from types import CodeType
from typing import Any

import torch


def _entries(code: CodeType) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


def _codes() -> list[CodeType]:
    from torch._dynamo.convert_frame import input_codes

    return [code for code in (ref() for ref in input_codes.seen) if code is not None]  # weak references


def _module_codes(target: Any) -> set[CodeType]:
    """The forward code objects (decorators' wrappers included) of every module of ``target``
    (a module, a torch.compile'd module or a pipeline with modules among its components)."""
    roots = [target] if isinstance(target, torch.nn.Module) else \
        [c for c in (getattr(target, "components", None) or {}).values() if isinstance(c, torch.nn.Module)]
    codes = set()
    for root in roots:
        for module in getattr(root, "_orig_mod", root).modules():
            fn = type(module).forward
            while fn is not None:
                if hasattr(fn, "__code__"):
                    codes.add(fn.__code__)
                fn = getattr(fn, "__wrapped__", None)
    return codes


def _breaks() -> int:
    """Graph breaks and failed frame compiles Dynamo has counted in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values())


class CompiledCaches:
    """Dynamo's compiled entries per code object at the start of a capture block of ``target``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        try:
            self.before: dict[CodeType, int] | None = {code: _entries(code) for code in _codes()}
            self.breaks = _breaks()
        except (ImportError, AttributeError):
            self.before = None

    def drop_changed(self) -> int:
        """Where the block broke a graph or failed a compile: reset the target's module code and every
        code object whose compiled entries changed since __init__; return how many were reset."""
        if self.before is None or _breaks() == self.breaks:
            return 0
        from torch._dynamo.eval_frame import reset_code

        changed = [code for code in _codes() if _entries(code) != self.before.get(code, 0)]
        if not changed:
            return 0  # the model is not compiled, or the block compiled nothing
        changed = set(changed) | {code for code in _module_codes(self.target) if code in self.before}
        for code in changed:
            reset_code(code)
        return len(changed)
