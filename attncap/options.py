"""Checks of attncap.capture's options, all made before anything is installed or run.

Each check returns the option in its normal form or raises TypeError (wrong type) / ValueError (a
value that cannot work), naming the argument, what it got and what would work. Checks that need
the model (relation names against a family's segments, steps against a run's step count, token
indices against the text, heads against a layer's heads) happen later, at the first denoiser call
(attncap.session), still before that call does any work.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Sequence

import torch

from .request import STATS
from .validate import MAX_SELECTED_KEYS

RELATION_WORDS = ("auto", "all", "full")


def _what(x: Any) -> str:
    return f"{x!r} ({type(x).__name__})"


def _index(x: Any, name: str, what: str) -> int:
    """x as a non-negative int (numpy ints too, never bools or floats)."""
    if isinstance(x, bool):
        raise TypeError(f"{name} holds {what}; got {_what(x)}")
    try:
        i = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} holds {what}; got {_what(x)}") from None
    if i < 0:
        raise ValueError(f"{name} holds {what}; got {i}"
                         + ("; steps='last' takes the final step" if name == "steps" else ""))
    return i


def _items(x: Any, name: str, form: str) -> list:
    """x as a list: a string or an int-like scalar becomes a one-item list; else it must be a sequence."""
    if isinstance(x, str) or hasattr(x, "__index__") and not isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (Sequence, torch.Tensor)) and not isinstance(x, bytes):
        items = x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else list(x)
        if not items:
            raise ValueError(f"{name} is empty; give {form}")
        return items
    raise TypeError(f"{name} must be {form}; got {_what(x)}")


def check_relations(relations: Any) -> str | tuple[str, ...]:
    """'auto', 'all', 'full', 'A->B', or a list of those (segment names are checked per family later)."""
    items = _items(relations, "relations", "'auto', 'all', 'full', 'A->B' or a list of 'A->B'")
    for r in items:
        if not isinstance(r, str):
            raise TypeError(f"relations entries are strings like 'image->text'; got {_what(r)}")
        if r in RELATION_WORDS:
            continue
        parts = r.split("->")
        if len(parts) != 2 or not all(parts) or r != r.strip() or " " in r:
            raise ValueError(f"relations entries look like 'image->text' (query segment->key segment, no spaces) "
                             f"or are one of {RELATION_WORDS}; got {r!r}")
    return relations if isinstance(relations, str) else tuple(dict.fromkeys(items))


def check_layers(layers: Any) -> str | tuple[str, ...]:
    """'all', a glob, or a list of layer names / globs."""
    items = _items(layers, "layers", "'all', a glob or a list of layer names")
    bad = [x for x in items if not isinstance(x, str) or not x]
    if bad:
        raise TypeError(f"layers is 'all', a glob such as '*attn2*', or a list of layer names; got entries {bad!r}")
    return layers if isinstance(layers, str) else tuple(items)


def check_steps(steps: Any) -> str | tuple[int, ...]:
    """'all', 'last', a step index or a list of them (denoising steps from 0)."""
    if isinstance(steps, str):
        if steps not in ("all", "last"):
            raise ValueError(f"steps must be 'all', 'last', a step index or a list of them; got {steps!r}")
        return steps
    items = _items(steps, "steps", "'all', 'last', a step index or a list of step indices")
    return tuple(sorted({_index(s, "steps", "step indices (ints >= 0)") for s in items}))


def check_heads(heads: Any) -> str | tuple[int, ...]:
    """'mean', 'all', a head index or a list of distinct head indices."""
    if isinstance(heads, str):
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean', 'all' or a list of head indices; got {heads!r}")
        return heads
    form = "'mean', 'all' or a list of head indices"
    items = [_index(h, "heads", "head indices (ints >= 0)") for h in _items(heads, "heads", form)]
    if len(set(items)) != len(items):
        raise ValueError(f"heads lists a head twice: {items}; give each head index once")
    return tuple(items)


def check_tokens(tokens: Any) -> tuple[int | str, ...] | None:
    """None, or text key indices / prompt words (at most MAX_SELECTED_KEYS entries)."""
    if tokens is None:
        return None
    out: list[int | str] = []
    for t in _items(tokens, "tokens", "text key indices or prompt words"):
        if isinstance(t, str):
            if not t.strip():
                raise ValueError(f"tokens holds prompt words or key indices; got the empty word {t!r}")
            out.append(t)
        else:
            out.append(_index(t, "tokens", "text key indices (ints >= 0) or prompt words"))
    if len(out) > MAX_SELECTED_KEYS:
        raise ValueError(f"tokens holds {len(out)} entries; the one-pass kernel takes at most {MAX_SELECTED_KEYS} "
                         "keys: pick fewer, or drop tokens= for whole maps")
    return tuple(dict.fromkeys(out))


def check_pool(pool: Any) -> int | tuple[int, ...] | None:
    """None, a positive int (h and w), or (h, w) / (t, h, w) positive factors."""
    if pool is None:
        return None
    scalar = hasattr(pool, "__index__") and not isinstance(pool, torch.Tensor)
    if isinstance(pool, (str, bytes)) or not scalar and not isinstance(pool, Sequence):
        raise TypeError(f"pool must be a positive int or (h, w) / (t, h, w) ints; got {_what(pool)}")
    factors = []
    for p in [pool] if scalar else pool:
        if isinstance(p, bool) or not hasattr(p, "__index__"):
            raise TypeError(f"pool factors are ints; got {_what(p)} in pool={pool!r}")
        if operator.index(p) < 1:
            raise ValueError(f"pool factors are >= 1 (1 = no pooling on that axis); got pool={pool!r}")
        factors.append(operator.index(p))
    if scalar:
        return factors[0]
    if len(factors) not in (2, 3):
        raise ValueError(f"pool must be an int or 2 / 3 factors (h, w) / (t, h, w); got {pool!r}")
    return tuple(factors)


def check_stats(stats: Any) -> tuple[str, ...]:
    """A stat name or a list of them, from attncap.request.STATS."""
    if isinstance(stats, Sequence) and not isinstance(stats, str) and not stats:
        return ()
    items = _items(stats, "stats", f"a name or a list of names from {STATS}")
    bad = [s for s in items if not isinstance(s, str)]
    if bad:
        raise TypeError(f"stats holds names from {STATS}; got {bad!r}")
    unknown = [s for s in items if s not in STATS]
    if unknown:
        raise ValueError(f"stats {unknown} unknown; choose from {STATS}, e.g. stats=('entropy',)")
    return tuple(dict.fromkeys(items))


def check_offload(offload: Any) -> str | None:
    """None (keep maps where they were computed) or a device that can hold them now."""
    if offload is None:
        return None
    if not isinstance(offload, (str, torch.device)):
        raise TypeError(f"offload must be a device such as 'cpu' or 'cuda:0', or None; got {_what(offload)}")
    try:
        device = torch.device(offload)
    except RuntimeError:
        raise ValueError(f"offload={offload!r} is not a device; use 'cpu', 'cuda', 'cuda:<index>' or None") from None
    if device.type == "meta":
        raise ValueError("offload='meta' keeps no data, so every map would be lost; use 'cpu' or None")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"offload={offload!r} but CUDA is not available here; use 'cpu', or None to keep maps "
                             "on the device that computed them")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"offload={offload!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"offload={offload!r}: maps can go to 'cpu' or a CUDA device, or stay put with None")
    return str(device)


def check_max_bytes(max_bytes: Any) -> int:
    """A positive byte count (ints or integral floats such as 8e9)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)):
        raise TypeError(f"max_bytes must be a positive number of bytes; got {_what(max_bytes)}")
    if not max_bytes > 0 or max_bytes != max_bytes or max_bytes == float("inf"):
        raise ValueError(f"max_bytes must be a positive, finite number of bytes; got {max_bytes!r}")
    return int(max_bytes)


def check_spill_dir(spill_dir: Any) -> str | os.PathLike | None:
    if spill_dir is not None and not isinstance(spill_dir, (str, os.PathLike)):
        raise TypeError(f"spill_dir must be a folder path or None; got {_what(spill_dir)}")
    return spill_dir


def check_workspace_bytes(workspace_bytes: Any) -> int | None:
    """The torch path's bound on working memory (bytes), or None for its default."""
    if workspace_bytes is None:
        return None
    try:
        n = None if isinstance(workspace_bytes, bool) else operator.index(workspace_bytes)
    except TypeError:
        n = None
    if n is None:
        raise TypeError(f"workspace_bytes must be a number of bytes (an int, e.g. 16 * 2**20) or None "
                        f"(attncap.cpu_path.WORKSPACE_BYTES, 64 MiB); got {_what(workspace_bytes)}")
    if n <= 0:
        raise ValueError(f"workspace_bytes must be positive (e.g. 16 * 2**20 for 16 MiB) or None (64 MiB); got {n}")
    return n


def check_backend(backend: Any) -> str:
    from .ops import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend
