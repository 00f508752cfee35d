"""What to capture from one attention call: the MapRequest.

Shape legend (used across attncap):
    B   batch                         H   query heads        Hk  key/value heads (GQA: H % Hk == 0)
    Nq  queries                       Nk  keys               D   head dim
    G   heads kept by the request: 1 for heads="mean", H for "all", len(list) for a list
    Qb  query bins: tokens of the query range, pooled over the query grid when query_pool is set
    Kb  key bins, likewise for keys
    Ks  selected key columns (``keys``)          Qs  selected query rows (``queries``)

Products (all float32, normalised over ALL keys the call attends to, never renormalised):
    "map"      [B, G, Qb, Kb]  mean probability over each (query bin, key bin) block
    "tokens"   [B, G, Qb, Ks]  probability of the selected keys (one-pass, exact), query-pooled
    "rows"     [B, G, Qs, Kb]  full probability rows of the selected queries, key-pooled
    "colsum"   [B, G, Kb]      attention received per key: sum over the query range, mean over key bin
    "entropy"  [B, G, Qb]      per-query entropy in nats, mean over query bin
    "peak"     [B, G, Qb]      per-query max probability, mean over query bin
A query whose keys are all masked has an all-zero probability row: its map, tokens, rows, colsum
contributions, entropy and peak are 0 (never NaN), as SDPA returns zeros for its output.
Non-finite inputs (attncap.nonfinite, the same on every backend): a query row whose scores are built
from NaN or inf (in its q row, in any key of its key head, NaN / +inf in its float-mask row) is NaN
in out and in every product it enters (its bins, rows, entropy, peak, its head group's colsum);
NaN / inf in v reaches out only. An empty batch (B = 0) gives empty out and products.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence, Union

HeadSpec = Union[str, Sequence[int]]
Grid = Union[Sequence[int], None]
Pool = Union[int, Sequence[int], None]

STATS = ("entropy", "peak", "colsum")
DEFAULT_MAX_BYTES = 4 * 2**30


@dataclass(frozen=True)
class MapRequest:
    """Which reductions of the attention probabilities to return with the output.

    heads:        "mean" (average over all query heads), "all", or a list of query-head indices kept.
    map:          compute products["map"]. None (default) means: yes, unless ``keys``, ``queries``
                  or ``stats`` already ask for something more specific.
    query_range:  (start, stop) of the query tokens the products cover (a segment of a joint
                  sequence, e.g. the image tokens); None = all queries.
    key_range:    (start, stop) likewise for keys; normalisation still runs over ALL keys.
    query_grid:   (h, w) or (t, h, w) layout of the tokens in the query range, row-major.
    key_grid:     likewise for the key range.
    query_pool:   int or per-axis factors (same length as the grid): average bins of that many
                  tokens per axis. Factors need not divide the grid; edge bins hold fewer tokens.
    key_pool:     likewise for keys.
    keys:         absolute key indices (at most 128) for token-selected maps, products["tokens"].
    queries:      absolute query indices for full rows, products["rows"].
    stats:        any of "entropy", "peak", "colsum".
    max_bytes:    products larger than this in total raise ValueError before any work.
    """

    heads: HeadSpec = "mean"
    map: bool | None = None
    query_range: tuple[int, int] | None = None
    key_range: tuple[int, int] | None = None
    query_grid: Grid = None
    key_grid: Grid = None
    query_pool: Pool = None
    key_pool: Pool = None
    keys: Sequence[int] | None = None
    queries: Sequence[int] | None = None
    stats: Sequence[str] = field(default_factory=tuple)
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def wants_map(self) -> bool:
        if self.map is not None:
            return bool(self.map)
        return self.keys is None and self.queries is None and not self.stats



_BOOLS = {True: object(), False: object()}  # bools as tokens no int equals (True == 1 in Python)
_SEQUENCE = object()                        # tags a list or tuple: (1, 2) is not the int 1 and 2


class _Uncacheable(Exception):
    pass


def _frozen(x: Any) -> Any:
    """``x`` as a hashable key equal to another's only when validation reads both alike."""
    t = type(x)
    if t is int or t is str or x is None:
        return x
    if t is bool:
        return _BOOLS[x]
    if t is tuple or t is list:  # validation reads a list as the tuple of its items
        return _SEQUENCE, tuple(_frozen(i) for i in x)
    raise _Uncacheable  # tensors, numpy values, floats, ranges, iterators, subclasses: no cheap promise


def request_key(request: Any) -> tuple | None:
    """A key for caching ``request``'s validation: two requests have equal keys only when their fields
    hold equal values of the same types, so the Plan validated for one is the other's Plan. None for a
    request to validate afresh every time: not exactly a MapRequest, or a field of another type (a
    tensor of keys, numpy ints, a float max_bytes...)."""
    if type(request) is not MapRequest:
        return None
    try:
        return tuple(_frozen(getattr(request, name)) for name in _FIELDS)
    except _Uncacheable:
        return None


_FIELDS = tuple(f.name for f in fields(MapRequest))
