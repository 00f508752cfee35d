"""Analysis of captured maps: statistics, token importance, evolution over steps, aggregation at one
resolution, query-point self-attention and LEDITS++-style masks.

Text maps come from "map" records whose keys are a text segment (key_grid None, query grid set; by
default relations ending in "->text") or from "tokens" records (capture with tokens=[...]). Unless a
branch is given, the "cond" branch is used where one exists (the prompt, not the negative prompt).
Maps are averaged over the heads kept. Words resolve through store.tokens (see attncap.prompts).

    agg = aggregate(store, size=(16, 16))          # prompt-to-prompt's aggregate: [16, 16, K]
    agg.word(keys_of(store, "cat"))                 # [16, 16]
    token_importance(store)[:3]                      # [TokenScore(index, label, score), ...]
    mask = word_mask(store, "cat", size=(64, 64))    # bool [64, 64], LEDITS++ style
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .prompts import Alignment
from .store import Record, Store, _resize

EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# statistics of distributions and maps
# ----------------------------------------------------------------------------------------------

def entropy(p: torch.Tensor, dim: int = -1, normalize: bool = True) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``; with normalize, p is first divided by its sum there."""
    p = p.float().clamp_min(0)
    if normalize:
        p = p / p.sum(dim, keepdim=True).clamp_min(EPS)
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def gini(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gini coefficient of non-negative values along ``dim``: 0 uniform, -> 1 all mass on one entry."""
    x = x.float().clamp_min(0).movedim(dim, -1)
    n = x.shape[-1]
    s = x.sort(-1).values
    i = torch.arange(1, n + 1, dtype=s.dtype, device=s.device)
    total = s.sum(-1)
    g = (2 * (i * s).sum(-1) / (n * total.clamp_min(EPS))) - (n + 1) / n
    return torch.where(total > 0, g, torch.zeros_like(g))


def topk_mass(x: torch.Tensor, k: int | None = None, frac: float = 0.1, dim: int = -1) -> torch.Tensor:
    """Fraction of the total mass along ``dim`` held by its k largest entries (k = frac * n)."""
    x = x.float().clamp_min(0).movedim(dim, -1)
    k = max(1, min(x.shape[-1], k if k is not None else round(frac * x.shape[-1])))
    return x.topk(k, -1).values.sum(-1) / x.sum(-1).clamp_min(EPS)


def peak(m: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """The largest value of a map and its index (row, col) / (t, row, col)."""
    i = int(m.argmax())
    return float(m.reshape(-1)[i]), tuple(int(v) for v in torch.unravel_index(torch.tensor(i), m.shape))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of one shape."""
    a, b = a.bool(), b.bool()
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


# ----------------------------------------------------------------------------------------------
# selecting records and resolving words
# ----------------------------------------------------------------------------------------------

def cond_first(recs: list[Record], branch: str | None) -> list[Record]:
    if branch is None and any(r.branch == "cond" for r in recs):
        return [r for r in recs if r.branch == "cond"]
    return recs


def is_text_record(r: Record) -> bool:
    """Spatial queries attending to a non-spatial key segment (text tokens)."""
    return r.query_grid is not None and r.key_grid is None and r.kind in ("map", "tokens")


def text_records(store: Store, relation: str | None = None, layer=None, step=None, branch: str | None = None,
                 kind: str | None = None) -> list[Record]:
    """Records of text maps ("map", else "tokens"), relation default: those ending in "->text"."""
    recs = [r for r in store.get(layer=layer, step=step, relation=relation, kind=None, branch=branch)
            if is_text_record(r)]
    if relation is None and any(r.relation.endswith("->text") for r in recs):
        recs = [r for r in recs if r.relation.endswith("->text")]
    recs = cond_first(recs, branch)
    if kind is not None:
        return [r for r in recs if r.kind == kind]
    maps = [r for r in recs if r.kind == "map"]
    return maps or [r for r in recs if r.kind == "tokens"]


def text_length(store: Store) -> int:
    """Number of keys of the text segment (0 when no text map record exists)."""
    maps = [r for r in store.records if is_text_record(r) and r.kind == "map"]
    if maps:
        return int(maps[0].data.shape[-1])
    recs = [r for r in store.records if is_text_record(r)]
    segs = [r.meta["key_segment"][1] - r.meta["key_segment"][0] for r in recs if r.meta.get("key_segment")]
    toks = [k for r in recs for k in r.meta.get("keys", ())]
    return max(segs + [max(toks) + 1 if toks else 0]) if recs else 0


def alignment_of(store: Store, batch: int = 0) -> Alignment:
    """The store's words and token labels (store.tokens), or position labels, for its text keys."""
    n = text_length(store)
    return Alignment.from_tokens(store.tokens, n or None, batch=batch)


def keys_of(store: Store | Alignment, what: str | int | Sequence[int]) -> list[int]:
    """Key positions of a word / phrase (via store.tokens), a key index, or a list of indices."""
    if isinstance(what, int):
        return [what]
    if not isinstance(what, str):
        return [int(i) for i in what]
    a = store if isinstance(store, Alignment) else alignment_of(store)
    if not a.words and not (store.tokens if isinstance(store, Store) else None):
        if what.strip().isdigit():
            return [int(what)]
        raise ValueError(f"cannot look up the word {what!r}: the store has no tokens (set store.tokens = "
                         "attncap.prompts.align(tokenizer, prompt).to_tokens(), or pass key indices)")
    try:
        return a.indices(what)
    except ValueError:
        if what.strip().isdigit():  # "3" on the command line: a key index
            return [int(what)]
        raise


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------

@dataclass
class TextMaps:
    """Aggregated text maps: data [*grid, K] for the key positions ``keys`` (column j is keys[j])."""
    data: torch.Tensor
    keys: list[int]
    grid: tuple[int, ...]
    records: int

    def word(self, keys: Sequence[int] | int) -> torch.Tensor:
        """Mean over the given key positions: [*grid]."""
        keys = [keys] if isinstance(keys, int) else list(keys)
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise ValueError(f"key(s) {missing} were not captured; the maps hold keys {self.keys[:12]}"
                             f"{' ...' if len(self.keys) > 12 else ''}")
        cols = [self.keys.index(k) for k in keys]
        return self.data[..., cols].mean(-1)


def largest_hw(grids) -> tuple[int, int]:
    return max((tuple(g[-2:]) for g in grids), key=lambda g: (g[0] * g[1], g))


def query_maps(r: Record, batch: int) -> torch.Tensor:
    if batch >= r.data.shape[0]:
        raise ValueError(f"batch={batch} but record {r.layer!r} step {r.step} has batch {r.data.shape[0]}")
    return r.data[batch].float().mean(0)  # [Qb, K]


def aggregate(store: Store, size: tuple[int, int] | None = None, relation: str | None = None, layer=None, step=None,
              branch: str | None = None, batch: int = 0) -> TextMaps:
    """Text maps averaged over heads, the selected layers and steps, each resized to ``size`` = (h, w)
    (default: the largest grid among them) -> TextMaps with data [*grid, K] (prompt-to-prompt's
    aggregate_attention; video grids keep t)."""
    recs = text_records(store, relation, layer, step, branch)
    if not recs:
        raise ValueError("no text map records match relation={!r} layer={!r} step={!r} branch={!r}; the store "
                         "has relations {}".format(relation, layer, step, branch, sorted({r.relation for r in store})))
    if recs[0].kind == "map":
        keys = list(range(recs[0].data.shape[-1]))
    else:
        common = set(recs[0].meta.get("keys", ()))
        for r in recs[1:]:
            common &= set(r.meta.get("keys", ()))
        keys = sorted(common)
        if not keys:
            raise ValueError("the selected tokens records share no key; select fewer layers or steps")
    hw = tuple(size) if size is not None else largest_hw(r.query_grid for r in recs)
    total, grid = None, None
    for r in recs:
        x = query_maps(r, batch)
        if r.kind == "tokens":
            x = x[:, [r.meta["keys"].index(k) for k in keys]]
        elif x.shape[-1] != len(keys):
            raise ValueError(f"text maps have different key counts ({x.shape[-1]} vs {len(keys)}); select one relation")
        g = tuple(r.query_grid)
        if g[-2:] != hw:
            x, g = _resize(x, 0, g, hw)
        if grid is not None and g != grid:
            raise ValueError(f"records have grids {grid} and {g} (different frame counts); select layers of one size")
        grid = g
        total = x if total is None else total + x
    data = (total / len(recs)).reshape(*grid, len(keys))
    return TextMaps(data, keys, grid, len(recs))


def word_map(store: Store, word: str | int | Sequence[int], size=None, relation=None, layer=None, step=None,
             branch=None, batch: int = 0) -> torch.Tensor:
    """[*grid] map of a word (its tokens averaged), aggregated over the selected layers and steps."""
    return aggregate(store, size, relation, layer, step, branch, batch).word(keys_of(store, word))


def group_maps(store: Store, groups: dict[str, Sequence[str | int]], size=None, relation=None, layer=None,
               step=None, branch=None, batch: int = 0) -> dict[str, torch.Tensor]:
    """{group name: [*grid] map}: each group's words/indices pooled (the mean of its tokens' maps)."""
    agg = aggregate(store, size, relation, layer, step, branch, batch)
    out = {}
    for name, members in groups.items():
        keys = sorted({k for m in members for k in keys_of(store, m)})
        out[name] = agg.word(keys)
    return out


# ----------------------------------------------------------------------------------------------
# token importance and evolution over steps
# ----------------------------------------------------------------------------------------------

@dataclass
class TokenScore:
    index: int
    label: str
    score: float


def token_scores(store: Store, relation: str | None = None, layer=None, step=None, branch: str | None = None,
                 batch: int = 0) -> torch.Tensor:
    """[K] mean attention each text key receives (mean over queries, heads, layers and steps);
    NaN for keys no record holds. From "map" records, else "tokens", else text "colsum"."""
    recs = text_records(store, relation, layer, step, branch)
    if recs:
        n = text_length(store) or 1
        total, count = torch.zeros(n), torch.zeros(n)
        for r in recs:
            v = query_maps(r, batch).mean(0)
            keys = list(range(v.shape[0])) if r.kind == "map" else r.meta["keys"]
            if max(keys) >= n:
                total, count = F.pad(total, (0, max(keys) + 1 - n)), F.pad(count, (0, max(keys) + 1 - n))
                n = max(keys) + 1
            total[keys] += v
            count[keys] += 1
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    cols = [r for r in store.get(layer=layer, step=step, relation=relation, kind="colsum", branch=branch)
            if r.key_grid is None and (relation is not None or r.relation.endswith("->text"))]
    cols = cond_first(cols, branch)
    if not cols:
        raise ValueError("no map, tokens or colsum record of a text relation matches the selection")
    out = []
    for r in cols:
        seg = r.meta.get("query_segment")
        nq = (seg[1] - seg[0]) if seg else (math.prod(r.query_grid) if r.query_grid else 1)
        out.append(r.data[batch].float().mean(0) / max(nq, 1))
    return torch.stack(out).mean(0)


def _labels(store: Store, n: int) -> tuple[list[str], list[bool]]:
    a = alignment_of(store).fit(n)
    return a.labels, (a.special if store.tokens else [False] * n)


def token_importance(store: Store, relation: str | None = None, layer=None, step=None, branch: str | None = None,
                     batch: int = 0, exclude_special: bool = True, top: int | None = None) -> list[TokenScore]:
    """Text tokens ranked by the attention they receive overall (highest first). Special tokens
    (start, end, padding) are left out when the store knows its tokens and exclude_special is set."""
    s = token_scores(store, relation, layer, step, branch, batch)
    labels, special = _labels(store, s.shape[0])
    out = [TokenScore(i, labels[i], float(s[i])) for i in range(s.shape[0])
           if not math.isnan(float(s[i])) and not (exclude_special and special[i])]
    out.sort(key=lambda t: -t.score)
    return out[:top] if top else out


def steps_of(store: Store, relation=None, layer=None, branch=None) -> list[int]:
    return sorted({r.step for r in text_records(store, relation, layer, None, branch)})


def importance_by_step(store: Store, relation: str | None = None, layer=None, branch: str | None = None,
                       batch: int = 0) -> tuple[list[int], torch.Tensor]:
    """(steps, [S, K]) attention each text key receives at each step (mean over layers)."""
    steps = steps_of(store, relation, layer, branch)
    rows = [token_scores(store, relation, layer, s, branch, batch) for s in steps]
    n = max(r.shape[0] for r in rows) if rows else 0
    return steps, torch.stack([F.pad(r, (0, n - r.shape[0]), value=float("nan")) for r in rows]) if rows \
        else torch.zeros(0, 0)


def top_token_by_step(store: Store, relation: str | None = None, layer=None, branch: str | None = None,
                      batch: int = 0, exclude_special: bool = True) -> list[tuple[int, TokenScore]]:
    """[(step, TokenScore)] the text token receiving the most attention at each step."""
    steps, s = importance_by_step(store, relation, layer, branch, batch)
    if not steps:
        return []
    labels, special = _labels(store, s.shape[1])
    out = []
    for i, st in enumerate(steps):
        v = s[i].clone()
        v[torch.isnan(v)] = -1
        if exclude_special and not all(special):
            v[torch.tensor(special)] = -1
        j = int(v.argmax())
        out.append((st, TokenScore(j, labels[j], float(s[i, j]))))
    return out


def evolution(store: Store, word: str | int | Sequence[int], size=None, relation: str | None = None, layer=None,
              branch: str | None = None, batch: int = 0) -> tuple[list[int], torch.Tensor]:
    """(steps, [S, *grid]) the word's map at each step, aggregated over the selected layers."""
    keys = keys_of(store, word)
    steps = steps_of(store, relation, layer, branch)
    if not steps:
        raise ValueError("no text map records to follow over steps")
    hw = tuple(size) if size else largest_hw(r.query_grid for r in text_records(store, relation, layer, None, branch))
    maps = [aggregate(store, hw, relation, layer, s, branch, batch).word(keys) for s in steps]
    return steps, torch.stack(maps)


# ----------------------------------------------------------------------------------------------
# self-attention of a query point
# ----------------------------------------------------------------------------------------------

def spatial_records(store: Store, relation: str | None = None, layer=None, step=None, branch=None) -> list[Record]:
    """"map" records with grids on both axes (image->image, video->video), cond first."""
    recs = [r for r in store.get(layer=layer, step=step, relation=relation, kind="map", branch=branch)
            if r.query_grid is not None and r.key_grid is not None]
    return cond_first(recs, branch)


def bin_of(point: Sequence[float], grid: Sequence[int]) -> int:
    """Flat index of the bin holding a point given as fractions in [0, 1) of each grid axis."""
    if len(point) < len(grid):
        point = (0.0,) * (len(grid) - len(point)) + tuple(point)
    idx = [min(n - 1, max(0, int(math.floor(float(p) * n)))) for p, n in zip(point[-len(grid):], grid)]
    flat = 0
    for i, n in zip(idx, grid):
        flat = flat * n + i
    return flat


def query_row(store: Store, point: Sequence[float], size=None, relation: str | None = None, layer=None, step=None,
              branch: str | None = None, batch: int = 0) -> torch.Tensor:
    """[*key grid] where the query at ``point`` ((y, x) or (t, y, x) as fractions of the image, e.g.
    (0.5, 0.5) the centre) attends, averaged over heads and the selected self-attention records."""
    recs = spatial_records(store, relation, layer, step, branch)
    if not recs:
        raise ValueError("no map record with grids on both axes (e.g. image->image) matches the selection")
    hw = tuple(size) if size else largest_hw(r.key_grid for r in recs)
    rows = []
    for r in recs:
        row = query_maps(r, batch)[bin_of(point, r.query_grid)]
        g = tuple(r.key_grid)
        if g[-2:] != hw:
            row, g = _resize(row[None], 1, g, hw)
            row = row[0]
        rows.append(row.reshape(g))
    return torch.stack(rows).mean(0)


def received(r: Record, batch: int = 0) -> torch.Tensor:
    """[*key grid] attention each key bin receives (mean over queries and heads) of a spatial map."""
    return query_maps(r, batch).mean(0).reshape(r.key_grid)


# ----------------------------------------------------------------------------------------------
# per-layer statistics table
# ----------------------------------------------------------------------------------------------

def _bin_size(r: Record) -> float:
    """Mean number of key tokens per key bin (1 without key pooling)."""
    seg = r.meta.get("key_segment")
    if not seg or r.key_grid is None:
        return 1.0
    return (seg[1] - seg[0]) / max(1, math.prod(r.key_grid))


def layer_stats(store: Store, step=None, branch: str | None = None, batch: int = 0) -> list[dict]:
    """One row per (layer, relation) of map records: mean row entropy (nats; exact over all keys
    where entropy records exist, else over the relation's key block), sparsity (mean Gini of the
    rows), peak (mean largest probability), mass (mean attention the queries give the block) and
    the top key (the text token receiving the most attention, or the (t,) y, x bin)."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in store.get(step=step, kind=None, branch=branch):
        groups.setdefault((r.layer, r.relation), []).append(r)
    labels = special = None
    rows = []
    for (layer, rel), recs in groups.items():
        recs = cond_first(recs, branch)
        maps = [r for r in recs if r.kind == "map"]
        ent = [r for r in recs if r.kind == "entropy"]
        pk = [r for r in recs if r.kind == "peak"]
        if not maps and not ent and not pk:
            continue
        row = {"layer": layer, "relation": rel, "steps": len({r.step for r in recs}),
               "grid": "x".join(map(str, (maps or ent or pk)[0].query_grid or ())) or "-"}
        rmaps = [query_maps(r, batch) for r in maps]
        scale = _bin_size(maps[0]) if maps else 1.0  # key tokens per key bin (pooled keys)
        if ent:
            row["entropy"], row["entropy_source"] = float(torch.stack([e.data[batch].mean() for e in ent]).mean()), "exact"
        elif rmaps:  # pooled keys: entropy over bins + log(bin size), i.e. uniform within a bin (an upper bound)
            h = float(torch.stack([entropy(m).mean() for m in rmaps]).mean()) + math.log(scale)
            row["entropy"], row["entropy_source"] = h, "block" if scale == 1 else "pooled"
        if rmaps:
            row["sparsity"] = float(torch.stack([gini(m).mean() for m in rmaps]).mean())
            row["mass"] = float(torch.stack([m.sum(-1).mean() for m in rmaps]).mean()) * scale
        if pk:
            row["peak"] = float(torch.stack([p.data[batch].mean() for p in pk]).mean())
        elif rmaps and scale == 1:
            row["peak"] = float(torch.stack([m.amax(-1).mean() for m in rmaps]).mean())
        if rmaps:
            v = torch.stack([m.mean(0) for m in rmaps]).mean(0)
            if maps[0].key_grid is None:
                if labels is None or len(labels) != v.shape[0]:
                    labels, special = _labels(store, v.shape[0])
                w = v.clone()
                if not all(special):
                    w[torch.tensor(special)] = -1
                j = int(w.argmax())
                row["top_token"], row["top_score"] = labels[j], float(v[j])
            else:
                j = int(v.argmax())
                idx = torch.unravel_index(torch.tensor(j), tuple(maps[0].key_grid))
                row["top_token"], row["top_score"] = "(" + ", ".join(str(int(i)) for i in idx) + ")", float(v[j])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# LEDITS++ masks
# ----------------------------------------------------------------------------------------------

def gaussian_blur(x: torch.Tensor, sigma: float = 1.0, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian smoothing over the last two axes (reflect padding); other axes untouched."""
    if sigma <= 0:
        return x
    k = kernel_size or 2 * int(math.ceil(3 * sigma)) + 1
    k += 1 - k % 2
    t = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    y = x.float().reshape(-1, 1, h, w)
    pad_h, pad_w = min(k // 2, h - 1), min(k // 2, w - 1)
    y = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="reflect" if h > 1 and w > 1 else "replicate")
    gh = g[k // 2 - pad_h: k // 2 + pad_h + 1]
    gw = g[k // 2 - pad_w: k // 2 + pad_w + 1]
    y = F.conv2d(y, (gh / gh.sum()).view(1, 1, -1, 1))
    y = F.conv2d(y, (gw / gw.sum()).view(1, 1, 1, -1))
    return y.reshape(*lead, h, w)


def ledits_mask(m: torch.Tensor, quantile: float = 0.9, sigma: float = 1.0, size: tuple[int, int] | None = None,
                mode: str = "bilinear") -> torch.Tensor:
    """LEDITS++'s attention mask: Gaussian-smooth the map (sigma in map cells), upsample to ``size``
    (latent or image resolution), keep values at or above the ``quantile`` -> bool [*lead, *size]."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1); got {quantile}")
    x = gaussian_blur(m.float(), sigma)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        lead = x.shape[:-2]
        x = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=tuple(size), mode=mode,
                          **({} if mode == "nearest" else {"align_corners": False})).reshape(*lead, *size)
    flat = x.reshape(-1)
    k = min(flat.numel(), max(1, int(math.ceil(quantile * flat.numel()))))
    threshold = flat.kthvalue(k).values if quantile > 0 else flat.min()
    return x >= threshold


def word_mask(store: Store, word: str | int | Sequence[int], size: tuple[int, int] | None = None,
              quantile: float = 0.9, sigma: float = 1.0, relation: str | None = None, layer=None, step=None,
              branch: str | None = None, batch: int = 0) -> torch.Tensor:
    """bool mask of where a word's attention is strongest (see ledits_mask), from its aggregated map."""
    return ledits_mask(word_map(store, word, None, relation, layer, step, branch, batch), quantile, sigma, size)
