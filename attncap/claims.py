"""Which modules are being captured right now, so overlapping captures fail plainly.

A capture swaps processors, hooks modules and intercepts SDPA on the modules of its target. A second
capture over any of those modules (nested in the first, or from another thread) would see its
calls twice or not at all, so attncap.capture claims the target's modules on entry and refuses a
claim that overlaps one still held. The registry is shared by all threads, behind a lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

_LOCK = threading.Lock()
_HELD: dict[int, "Claim"] = {}  # id(module) -> the claim holding it


@dataclass(eq=False)
class Claim:
    what: str                 # the target's class name
    where: str                # file:line of the attncap.capture(...) call
    thread: str               # the thread that entered the block
    modules: list[torch.nn.Module]


def modules_of(target: Any) -> list[torch.nn.Module]:
    """Every module a capture of ``target`` may touch: a pipeline's module components, or the module."""
    components = getattr(target, "components", None)
    roots = [c for c in components.values() if isinstance(c, torch.nn.Module)] if isinstance(components, dict) \
        else [target] if isinstance(target, torch.nn.Module) else []
    seen: dict[int, torch.nn.Module] = {}
    for root in roots:
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


def claim(target: Any, where: str) -> Claim:
    """Hold the modules of ``target`` for one capture block; RuntimeError if another block holds any."""
    mods = modules_of(target)
    new = Claim(type(target).__name__, where, threading.current_thread().name, mods)
    with _LOCK:
        other = next((_HELD[id(m)] for m in mods if id(m) in _HELD), None)
        if other is not None:
            same = other.thread == new.thread
            raise RuntimeError(
                f"this {new.what} is already being captured by the attncap.capture block entered at {other.where}"
                + (" (still open: capture blocks on one model do not nest)" if same else
                   f" in thread {other.thread!r}, while thread {new.thread!r} asks for a second capture") +
                ". One block captures every layer, relation and step you need: pass them together "
                "(layers=[...], relations=[...]); calls from two threads need two copies of the model")
        for m in mods:
            _HELD[id(m)] = new
    return new


def release(held: Claim) -> None:
    with _LOCK:
        for m in held.modules:
            if _HELD.get(id(m)) is held:
                del _HELD[id(m)]
        held.modules = []
