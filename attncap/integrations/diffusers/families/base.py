"""What a model-family adapter is: a table of where each attention call's tokens come from.

An adapter says, for each attention module of the denoiser (a glob over its layer name), the
attention calls its processor makes, in order, as specs over named segments:

    "video -> text"            queries are the video tokens, keys the text tokens
    "text+image"               a joint sequence: the same segments, in this order, on both axes
    "video -> image_ctx+text"  keys: image context tokens, then text tokens

Each call may list alternatives (tried in order; the first whose sizes equal the call's Nq and Nk
wins), and a spec that names a segment of length 0 in this run does not exist (Wan T2V has no
image context). The segment lengths and grids come from ``observe``, which reads the denoiser's
inputs in its forward pre-hook. A segment observed with length None takes what is left of its
axis, and a callable grid is given that length (the UNet's per-resolution image tokens).

A segment observed under "name#piece" is part of segment "name" split over calls (diffusers' Wan
I2V split of its context); it is observed as (length, grid, offset of its first token in "name")
and filed as "name" with the tag "tokens a:b of name".

Layers whose attention has no softmax (Sana's linear attention) are listed in ``no_softmax`` with
the reason: they are left out of ``layers="all"`` and refused when named.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ....session import CallLayout, Segment

Grid = "tuple[int, ...] | Callable[[int], tuple[int, ...] | None] | None"
Observed = dict  # segment name -> (length or None, grid)


def arg(args, kwargs, index: int | None, name: str):
    """A forward argument given by keyword or at position ``index``."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if index is not None and len(args) > index else None


def scalar(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return float(t)


def length(x) -> int:
    """Tokens of a [B, N, C] sequence input (0 when absent)."""
    return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0


def patched_grid(shape, patch) -> tuple[int, ...]:
    """The token grid of a latent's trailing dims after patchifying (floor, as Conv patch embeds do)."""
    patch = (patch,) * len(shape) if isinstance(patch, int) else tuple(patch)
    return tuple(int(s) // p for s, p in zip(shape, patch))


def image_and_text(text_index: int):
    """observe for the common case: a [B, C, H, W] latent patchified by config.patch_size ("image", its
    (h, w) grid) and the text sequence encoder_hidden_states at forward position ``text_index``."""
    def observe(model, args, kwargs) -> Observed:
        latent = arg(args, kwargs, 0, "hidden_states")
        grid = patched_grid(latent.shape[-2:], model.config.patch_size)
        return {"image": (math.prod(grid), grid),
                "text": (length(arg(args, kwargs, text_index, "encoder_hidden_states")), None)}

    return observe


@dataclass(frozen=True)
class Timestep:
    """Where the denoiser's forward takes its timestep; scale turns it into the scheduler's units."""
    index: int | None = 1
    name: str = "timestep"
    scale: float = 1.0
    reduce: str = "first"   # "max": per-token timesteps (Wan 2.2 TI2V: 0 on the conditioning frame)

    def read(self, args, kwargs) -> float | None:
        t = arg(args, kwargs, self.index, self.name)
        if isinstance(t, torch.Tensor) and t.numel() and self.reduce == "max":
            value = float(t.max())
        else:
            value = scalar(t)
        return None if value is None else value * self.scale


@dataclass(frozen=True)
class CallSpec:
    queries: tuple[str, ...]
    keys: tuple[str, ...]

    @staticmethod
    def parse(spec: str) -> "CallSpec":
        q, _, k = spec.partition("->")
        queries = tuple(s.strip() for s in q.split("+"))
        keys = tuple(s.strip() for s in (k if k else q).split("+"))
        return CallSpec(queries, keys)

    def __str__(self) -> str:
        return f"{'+'.join(self.queries)} -> {'+'.join(self.keys)}"


@dataclass(frozen=True)
class Family:
    """One model family: its denoiser classes, how to read their inputs and the table of calls."""
    name: str
    denoisers: tuple[str, ...]
    observe: Callable[[torch.nn.Module, tuple, dict], Observed]
    attention: tuple[tuple[str, tuple[str | tuple[str, ...], ...]], ...]   # (layer glob, calls)
    default_relations: tuple[str, ...] = ("image->text",)
    timestep: Timestep = Timestep()
    separate_cfg_calls: bool = False   # the pipeline calls the denoiser once per guidance branch
    batched_cfg_order: tuple[str, str] = ("uncond", "cond")   # batch halves when guidance is batched
    no_softmax: tuple[tuple[str, str], ...] = ()   # (layer glob, why it cannot be captured)
    sizes: Callable[[str, Observed], Observed] | None = None   # per-layer segment sizes (UNet levels)
    segments: tuple[str, ...] = field(default=())   # every segment name the family can have

    def __post_init__(self):
        names = {n for _, calls in self.attention for call in calls
                 for spec in ((call,) if isinstance(call, str) else call)
                 for side in (CallSpec.parse(spec).queries, CallSpec.parse(spec).keys) for n in side}
        object.__setattr__(self, "segments", tuple(sorted({_base(n) for n in names})))

    def relations(self) -> list[str]:
        """Every "A->B" relation some call of this family can offer."""
        out = []
        for _, calls in self.attention:
            for call in calls:
                for spec in (call,) if isinstance(call, str) else call:
                    c = CallSpec.parse(spec)
                    out += [r for a in c.queries for b in c.keys
                            if (r := f"{_base(a)}->{_base(b)}") not in out]
        return out

    def unsupported(self, layer: str) -> str | None:
        """Why this layer's attention cannot be captured (None: it can)."""
        return next((why for pattern, why in self.no_softmax if fnmatch.fnmatchcase(layer, pattern)), None)

    def _calls(self, layer: str, observed: Observed) -> list[list[CallSpec]]:
        for pattern, calls in self.attention:
            if fnmatch.fnmatchcase(layer, pattern):
                seen = self.sizes(layer, observed) if self.sizes else observed
                out = []
                for call in calls:
                    alts = [CallSpec.parse(s) for s in ((call,) if isinstance(call, str) else call)]
                    alts = [a for a in alts if all(seen.get(n, (0, None))[0] != 0 for n in a.queries + a.keys)]
                    if alts:
                        out.append(alts)
                return out
        return []

    def token_counts(self, layer: str, observed: Observed) -> list[tuple[int, int]]:
        """(Nq, Nk) of each attention call the layer makes, for the byte estimate before the run."""
        seen = self.sizes(layer, observed) if self.sizes else observed
        counts = []
        for alts in self._calls(layer, observed):
            spec = alts[0]
            nq, nk = (sum(seen[n][0] or 0 for n in side) for side in (spec.queries, spec.keys))
            counts.append((nq, nk))
        return counts

    def layout(self, layer: str, observed: Observed, call: int, nq: int, nk: int) -> CallLayout | str:
        """The segments of this call, or why the call matches none of the layer's specs."""
        seen = self.sizes(layer, observed) if self.sizes else observed
        calls = self._calls(layer, observed)
        order = (calls[call] if call < len(calls) else []) + [a for alts in calls for a in alts]
        for spec in order:
            queries = _axis(spec.queries, seen, nq)
            keys = _axis(spec.keys, seen, nk)
            if queries is not None and keys is not None:
                return CallLayout(queries, keys)
        if nk == 0 or nq == 0:
            return f"an attention call with no {'keys' if nk == 0 else 'queries'} (Nq={nq}, Nk={nk})"
        expected = ", ".join(f"{s} ({_sizes(s, seen)})" for s in dict.fromkeys(str(a) for a in order)) or "none"
        return (f"a {self.name} attention call of Nq={nq}, Nk={nk} matches none of this layer's layouts "
                f"[{expected}]")


def _axis(names: tuple[str, ...], seen: Observed, total: int) -> tuple[Segment, ...] | None:
    """Consecutive segments of ``names`` filling exactly ``total`` tokens, or None."""
    known = sum(seen[n][0] for n in names if n in seen and seen[n][0] is not None)
    free = [n for n in names if n not in seen or seen[n][0] is None]
    if any(n not in seen for n in names) or len(free) > 1 or known > total or (not free and known != total):
        return None
    out, start = [], 0
    for name in names:
        n, grid, *piece = seen[name]
        n = total - known if n is None else n
        if n == 0:
            return None
        grid = grid(n) if callable(grid) else grid
        if grid is not None and math.prod(grid) != n:
            grid = None
        if "#" in name:
            offset = piece[0] if piece else 0
            out.append(Segment(_base(name), start, start + n, grid, tag=f"tokens {offset}:{offset + n} of {_base(name)}",
                               offset=offset))
        else:
            out.append(Segment(name, start, start + n, grid))
        start += n
    return tuple(out)


def _base(name: str) -> str:
    """The segment a piece ("text#1") belongs to."""
    return name.split("#")[0]


def _sizes(spec: str, seen: Observed) -> str:
    """"77+1024 x 77+1024": the lengths a spec expects ("*": whatever is left of the axis)."""
    def side(names):
        return "+".join("*" if seen.get(n, (None,))[0] is None else str(seen[n][0]) for n in names)

    c = CallSpec.parse(spec)
    return f"{side(c.queries)} x {side(c.keys)}"


def family_table(*families: Family) -> dict[str, Family]:
    """Denoiser class name -> family, refusing a class claimed twice."""
    table: dict[str, Family] = {}
    for family in families:
        for cls in family.denoisers:
            if cls in table:
                raise ValueError(f"{cls} is claimed by both {table[cls].name} and {family.name}")
            table[cls] = family
    return table


def config_of(model: Any, *names: str, default=None):
    """The first of ``names`` present in the model's config."""
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default
