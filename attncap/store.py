"""The store of captured maps: records, selection, aggregation, token maps, safetensors save/load.

Shape legend of Record.data (float32; see attncap.request for the products):
    "map" [B, G, Qb, Kb]   "tokens" [B, G, Qb, Ks]   "rows" [B, G, Qs, Kb]
    "colsum" [B, G, Kb]    "entropy" / "peak" [B, G, Qb]
    B batch (one CFG half when .branch is set), G heads kept, Qb/Kb query/key bins flattened row-major
    over .query_grid/.key_grid ((t,) h, w after pooling), Ks keys of meta["keys"], Qs rows of meta["queries"].

On disk a store is a directory: index.json (format version, every record's fields, shard + tensor
key, tokens) and safetensors shards. Nothing is ever pickled or unpickled.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .prompts import spell

FORMAT = "attncap.store"
VERSION = 1
NDIM = {"map": 4, "tokens": 4, "rows": 4, "colsum": 3, "entropy": 3, "peak": 3}
# kind -> (axis of the spatial grid, the grid attribute it follows); size= resizes this axis.
SPATIAL_AXIS = {"map": (2, "query_grid"), "tokens": (2, "query_grid"), "entropy": (2, "query_grid"),
                "peak": (2, "query_grid"), "colsum": (2, "key_grid"), "rows": (3, "key_grid")}
FIELDS = ("layer", "step", "timestep", "relation", "kind", "branch", "query_grid", "key_grid", "heads", "meta")
SHARD_BYTES = 1 << 30


class BudgetExceeded(RuntimeError):
    """Adding a record would pass the store's max_bytes."""


@dataclass
class Record:
    """One product of one attention layer at one step (see the module docstring for .data shapes)."""
    layer: str
    step: int
    timestep: float | None
    relation: str
    kind: str
    branch: str | None
    data: torch.Tensor
    query_grid: tuple[int, ...] | None = None
    key_grid: tuple[int, ...] | None = None
    heads: str | tuple[int, ...] = "mean"
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _fields(r: Record) -> dict:
    return {"layer": r.layer, "step": int(r.step), "timestep": None if r.timestep is None else float(r.timestep),
            "relation": r.relation, "kind": r.kind, "branch": r.branch,
            "query_grid": None if r.query_grid is None else [int(x) for x in r.query_grid],
            "key_grid": None if r.key_grid is None else [int(x) for x in r.key_grid],
            "heads": r.heads if isinstance(r.heads, str) else [int(h) for h in r.heads], "meta": r.meta}


def _record(f: dict, data: torch.Tensor) -> Record:
    tup = lambda v: None if v is None else tuple(v)  # noqa: E731
    return Record(f["layer"], f["step"], f["timestep"], f["relation"], f["kind"], f["branch"], data,
                  tup(f["query_grid"]), tup(f["key_grid"]), f["heads"] if isinstance(f["heads"], str)
                  else tuple(f["heads"]), f.get("meta") or {})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _resize(data: torch.Tensor, axis: int, grid, size: tuple[int, int]) -> tuple[torch.Tensor, tuple | None]:
    """Bilinear resize of ``axis`` (tokens row-major over a (t,) h, w grid) to (h, w) = size."""
    if grid is None or len(grid) not in (2, 3):
        return data, grid
    if data.shape[axis] != math.prod(grid):
        raise ValueError(f"axis {axis} of shape {list(data.shape)} does not hold grid {tuple(grid)}")
    x = data.movedim(axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(1, -1, *grid[-2:])          # (t and every other axis) folded into channels
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    new_grid = tuple(grid[:-2]) + tuple(size)
    return x.reshape(*lead, math.prod(new_grid)).movedim(-1, axis), new_grid


class Store:
    """Captured records, optionally offloaded to CPU, budgeted by max_bytes and spilled to disk.

    offload:   "cpu" (or any device) moves each record's data there on add; None keeps its device.
    max_bytes: adding past this raises BudgetExceeded; records already stored stay.
    spill_dir: each record is written at once as records/NNNNNN.safetensors, then index.json is
               rewritten atomically, so a killed run still loads with attncap.load(spill_dir).
    tokens:    {"text": [token strings] or [[...] per batch element]} for word lookups in token_map.
    """

    def __init__(self, offload: str | None = "cpu", max_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None, tokens: dict | None = None) -> None:
        self.offload = offload
        self.max_bytes = max_bytes
        self.records: list[Record] = []
        self._nbytes = 0
        self._entries: list[str] = []  # JSON index entries of spilled records
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            if any((self.spill_dir / "records").glob("*.safetensors")) or (self.spill_dir / "index.json").exists():
                raise FileExistsError(f"spill_dir {self.spill_dir} already holds a store; load it with attncap.load "
                                      "or choose an empty directory")
            (self.spill_dir / "records").mkdir(parents=True, exist_ok=True)
        self._tokens = None
        self.tokens = tokens

    @property
    def tokens(self) -> dict | None:
        return self._tokens

    @tokens.setter
    def tokens(self, value: dict | None) -> None:
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"tokens must be a dict like {{'text': [...]}} or None; got {type(value).__name__}")
        self._tokens = value
        if self.spill_dir is not None:
            self._write_index(self.spill_dir, spilled=True)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Store({len(self)} records, {self._nbytes / 2**20:.1f} MiB)"

    def add(self, record: Record) -> None:
        """File one record: check its shape and the budget, offload, spill if asked."""
        if not isinstance(record.data, torch.Tensor):
            raise TypeError(f"Record.data must be a torch.Tensor; got {type(record.data).__name__}")
        if record.kind not in NDIM or record.data.dim() != NDIM[record.kind]:
            raise ValueError(f"record {record.layer!r}: kind {record.kind!r} with data of shape "
                             f"{list(record.data.shape)}; expected one of {NDIM} (kind: ndim)")
        size = record.data.numel() * 4
        if self.max_bytes is not None and self._nbytes + size > self.max_bytes:
            raise BudgetExceeded(
                f"store holds {self._nbytes} bytes; record {record.layer!r} {record.kind} step {record.step} needs "
                f"{size} more, past max_bytes={self.max_bytes}. Use pool=, heads='mean', tokens=, fewer steps or "
                "layers, or a larger max_bytes")
        data = record.data.detach().to(device=self.offload or record.data.device, dtype=torch.float32).contiguous()
        if data.untyped_storage().nbytes() > data.nbytes:
            data = data.clone()  # a view (e.g. one CFG half) would keep its whole base alive
        record.data = data
        if self.spill_dir is not None:
            self._spill(record)
        self.records.append(record)
        self._nbytes += record.nbytes

    def _spill(self, record: Record) -> None:
        name = f"records/{len(self.records):06d}.safetensors"
        fields = _fields(record)
        try:
            meta = {k: json.dumps(v) for k, v in fields.items()}
        except TypeError as e:
            raise TypeError(f"Record.meta must be JSON-able to spill: {e}") from None
        path = self.spill_dir / name
        tmp = path.with_name(path.name + ".tmp")
        save_file({"data": record.data.cpu()}, str(tmp), metadata={"format": FORMAT, **meta})
        os.replace(tmp, path)
        self._entries.append(json.dumps({**fields, "shard": name, "key": "data"}))
        self._write_index(self.spill_dir, spilled=True)

    def _write_index(self, directory: Path, spilled: bool, entries: Sequence[str] | None = None) -> None:
        head = json.dumps({"format": FORMAT, "version": VERSION, "spill": spilled, "tokens": self._tokens})
        body = ",\n".join(self._entries if entries is None else entries)
        _write_atomic(directory / "index.json", head[:-1] + ', "records": [\n' + body + "\n]}\n")

    def get(self, layer: str | Sequence[str] | None = None, step: int | Sequence[int] | str | None = None,
            relation: str | Sequence[str] | None = None, kind: str | None = "map",
            branch: str | None = None) -> list[Record]:
        """Records matching every filter. layer: name, glob or list; step: int, list or "last" (the
        largest step among records matching the other filters); None matches anything."""
        layers = [layer] if isinstance(layer, str) else layer
        relations = [relation] if isinstance(relation, str) else relation
        out = [r for r in self.records
               if (layers is None or any(r.layer == p or fnmatch.fnmatchcase(r.layer, p) for p in layers))
               and (relations is None or r.relation in relations) and (kind is None or r.kind == kind)
               and (branch is None or r.branch == branch)]
        if step is None or not out:
            return out
        if isinstance(step, str):
            if step != "last":
                raise ValueError(f"step must be an int, a list of ints, 'last' or None; got {step!r}")
            steps = {max(r.step for r in out)}
        else:
            steps = {int(step)} if isinstance(step, int) else {int(s) for s in step}
        return [r for r in out if r.step in steps]

    def _none_found(self, what: str) -> ValueError:
        have = lambda attr: sorted({str(getattr(r, attr)) for r in self.records})  # noqa: E731
        return ValueError(f"no records match {what}. The store has layers {have('layer')}, steps "
                          f"{sorted({r.step for r in self.records})}, relations {have('relation')}, kinds "
                          f"{have('kind')}, branches {have('branch')}")

    def aggregate(self, kind: str = "map", layer=None, step=None, relation=None, branch: str | None = None,
                  size: tuple[int, int] | None = None, reduce: str = "mean") -> torch.Tensor:
        """Mean ("sum", "max") of the selected records' data. size=(h, w) first resizes each record's
        spatial axis (the query grid; the key grid for colsum/rows) so layers of different resolution mix."""
        if reduce not in ("mean", "sum", "max"):
            raise ValueError(f"reduce must be 'mean', 'sum' or 'max'; got {reduce!r}")
        if size is not None and len(size) != 2:
            raise ValueError(f"size must be (h, w); got {size!r}")
        recs = self.get(layer=layer, step=step, relation=relation, kind=kind, branch=branch)
        if not recs:
            raise self._none_found(f"kind={kind!r} layer={layer!r} step={step!r} relation={relation!r} branch={branch!r}")
        datas = []
        for r in recs:
            axis, attr = SPATIAL_AXIS[r.kind]
            datas.append(r.data if size is None else _resize(r.data, axis, getattr(r, attr), size)[0])
        shapes = {tuple(d.shape) for d in datas}
        if len(shapes) > 1:
            by = {}
            for r, d in zip(recs, datas):
                by.setdefault(tuple(d.shape), []).append(r.layer)
            detail = "; ".join(f"{list(s)}: {sorted(set(ls))[:3]}" for s, ls in by.items())
            raise ValueError(f"records have different shapes ({detail}); pass size=(h, w) to resize their grids "
                             "to one size, or select layers of one resolution")
        x = torch.stack([d.to(datas[0].device) for d in datas])
        return x.mean(0) if reduce == "mean" else x.sum(0) if reduce == "sum" else x.amax(0)

    def _word_keys(self, word: str, batch: int) -> list[int]:
        toks = (self._tokens or {}).get("text")
        if not toks:
            raise ValueError("the store has no tokens to look words up in; pass a key index or set "
                             "store.tokens = {'text': [token strings]}")
        if not isinstance(toks[0], str):
            toks = toks[batch]
        found = spell(word, toks)  # runs of sub-word pieces spelling the word ("gir", "affe</w>")
        if not found:
            raise ValueError(f"word {word!r} is not among the tokens {list(toks)}")
        return sorted(set(found))

    def token_map(self, word_or_index: str | int, relation: str | None = None, layer=None, step=None,
                  branch: str | None = None, size: tuple[int, int] | None = None, batch: int = 0) -> torch.Tensor:
        """float32 [*query_grid] map of a text token (a word, or a key index of the key segment) for batch
        element ``batch``, averaged over kept heads, the word's tokens and the matching records.
        Uses "tokens" records holding the keys, else "map" records. relation None: relations from a
        query grid to text; branch None: "cond" where such records exist (the prompt, not the negative prompt), else any."""
        keys = [int(word_or_index)] if isinstance(word_or_index, int) else self._word_keys(word_or_index, batch)
        # default: spatial queries (image/video) attending to text, so the map can be laid on the picture
        rel_ok = ((lambda r: r.relation.endswith("->text") and r.query_grid is not None) if relation is None
                  else (lambda r: r.relation == relation))
        recs = [r for r in self.get(layer=layer, step=step, kind=None, branch=branch) if rel_ok(r)]
        if branch is None and any(r.branch == "cond" for r in recs):
            recs = [r for r in recs if r.branch == "cond"]
        chosen = [(r, [r.meta["keys"].index(k) for k in keys]) for r in recs
                  if r.kind == "tokens" and all(k in r.meta.get("keys", ()) for k in keys)]
        if not chosen:
            chosen = [(r, keys) for r in recs if r.kind == "map" and max(keys) < r.data.shape[3]]
        if not chosen:
            held = sorted({f"{r.relation} {r.kind} keys={r.meta.get('keys', r.data.shape[3])}" for r in recs})
            raise ValueError(f"no tokens/map record holds key(s) {keys} for {word_or_index!r}; matching records: "
                             f"{held or 'none'}" + ("" if recs else f" ({self._none_found('the filters')})"))
        maps = []
        for r, cols in chosen:
            if batch >= r.data.shape[0]:
                raise ValueError(f"batch={batch} but record {r.layer!r} has batch {r.data.shape[0]}")
            vec = r.data[batch][..., cols].mean(dim=(0, 2))  # [Qb]
            grid = r.query_grid
            if size is not None:
                vec, grid = _resize(vec[None], 1, grid, size)
                vec = vec[0]
            maps.append(vec if grid is None else vec.reshape(grid))
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) > 1:
            raise ValueError(f"token maps have different grids {sorted(shapes)}; pass size=(h, w)")
        return torch.stack([m.to(maps[0].device) for m in maps]).mean(0)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write safetensors shards + index.json to ``directory`` (created); returns its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.spill_dir is not None and d.resolve() == self.spill_dir.resolve():
            self._write_index(d, spilled=True)
            return d
        entries, shard, n, k = [], {}, 0, 0
        for i, r in enumerate(self.records):
            key = f"{i:06d}"
            shard[key] = r.data.cpu()
            n += r.nbytes
            entries.append(json.dumps({**_fields(r), "shard": f"maps-{k:05d}.safetensors", "key": key}))
            if n >= SHARD_BYTES or i == len(self.records) - 1:
                save_file(shard, str(d / f"maps-{k:05d}.safetensors"), metadata={"format": FORMAT})
                shard, n, k = {}, 0, k + 1
        self._write_index(d, spilled=False, entries=entries)
        return d

    def summary(self) -> str:
        """One line per (layer, relation, kind): steps, branches, data shape and query grid."""
        groups: dict[tuple, list[Record]] = {}
        for r in self.records:
            groups.setdefault((r.layer, r.relation, r.kind), []).append(r)
        lines = [repr(self)]
        for (layer, rel, kind), rs in groups.items():
            steps = sorted({r.step for r in rs})
            st = f"{steps[0]}-{steps[-1]} ({len(steps)})" if len(steps) > 1 else str(steps[0])
            shapes = sorted({tuple(r.data.shape) for r in rs})
            branches = ",".join(sorted({str(r.branch) for r in rs}))
            lines.append(f"{layer}  {rel}  {kind}  steps {st}  branch {branches}  shape "
                         f"{' '.join(str(list(s)) for s in shapes)}  grid {rs[0].query_grid}")
        return "\n".join(lines)


def load(directory: str | os.PathLike) -> Store:
    """Read a saved or spilled store (index.json + safetensors shards, plus shards an interrupted
    spill wrote after its last index). Data comes back on CPU; nothing is unpickled."""
    d = Path(directory)
    index, idx_path = None, d / "index.json"
    if idx_path.exists():
        try:
            index = json.loads(idx_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{idx_path} is unreadable (interrupted write?); recovering records from shards")
    if index is not None and (index.get("format") != FORMAT or index.get("version", 0) > VERSION):
        raise ValueError(f"{idx_path} is not an {FORMAT} index of version <= {VERSION}")
    entries = list(index["records"]) if index else []
    listed = {e["shard"] for e in entries}
    strays = sorted(p for p in (d / "records").glob("*.safetensors") if f"records/{p.name}" not in listed) \
        if index is None or index.get("spill") else []
    if index is None and not strays:
        raise FileNotFoundError(f"no attncap store in {d}: neither index.json nor records/*.safetensors")
    store = Store(offload="cpu", tokens=index.get("tokens") if index else None)
    handles: dict[str, object] = {}

    def append(fields: dict, data: torch.Tensor) -> None:
        store.records.append(_record(fields, data))
        store._nbytes += store.records[-1].nbytes

    for e in entries:
        if not (d / e["shard"]).exists():
            raise FileNotFoundError(f"{d / e['shard']} listed in {idx_path} is missing")
        if e["shard"] not in handles:
            handles[e["shard"]] = safe_open(str(d / e["shard"]), framework="pt", device="cpu")
        append(e, handles[e["shard"]].get_tensor(e["key"]))
    for p in strays:
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta, data = f.metadata() or {}, f.get_tensor("data")
            append({k: json.loads(meta[k]) for k in FIELDS}, data)
        except Exception as e:  # a shard is written to a temp name first, so this is outside damage
            warnings.warn(f"skipping unreadable shard {p}: {e}")
    return store
