"""The store of captured maps: records, selection, aggregation, token maps, safetensors save/load.

Shape legend of Record.data (float32; see attncap.request for the products):
    "map" [B, G, Qb, Kb]   "tokens" [B, G, Qb, Ks]   "rows" [B, G, Qs, Kb]
    "colsum" [B, G, Kb]    "entropy" / "peak" [B, G, Qb]
    B batch (one CFG half when .branch is set), G heads kept, Qb/Kb query/key bins flattened row-major
    over .query_grid/.key_grid ((t,) h, w after pooling), Ks keys of meta["keys"], Qs rows of meta["queries"].

Records carry the pipeline call they came from (.call, from 0; steps count from 0 within a call) and
each call's prompt tokens are kept (Store.tokens_of), so words label the maps of their own prompt.
On disk a store is a directory of safetensors shards and a JSON index (attncap.store_disk); nothing is
ever pickled or unpickled.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .prompts import spell
from .store_disk import INDEX, LOG, NDIM, IndexLog, SpillStream, holds_store, index_text, write_atomic, write_shard
from .store_disk import load  # noqa: F401  (attncap.load, re-exported here)
# kind -> (axis of the spatial grid, the grid attribute it follows); size= resizes this axis.
SPATIAL_AXIS = {"map": (2, "query_grid"), "tokens": (2, "query_grid"), "entropy": (2, "query_grid"),
                "peak": (2, "query_grid"), "colsum": (2, "key_grid"), "rows": (3, "key_grid")}
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
    call: int = 0  # which pipeline call of the block (diffusers: a step past a run's last starts the next;
    #                the generic and transformers paths count steps over the whole block, call 0)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _fields(r: Record) -> dict:
    return {"layer": r.layer, "step": int(r.step), "timestep": None if r.timestep is None else float(r.timestep),
            "relation": r.relation, "kind": r.kind, "branch": r.branch,
            "query_grid": None if r.query_grid is None else [int(x) for x in r.query_grid],
            "key_grid": None if r.key_grid is None else [int(x) for x in r.key_grid],
            "heads": r.heads if isinstance(r.heads, str) else [int(h) for h in r.heads], "meta": r.meta,
            "call": int(r.call)}


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

    offload:   "cpu" (or a CUDA device) moves each record's data there on add; None keeps its device.
               From CUDA to "cpu" the copy goes into pinned memory without waiting (the captured call
               makes no host synchronisation); reading ``records`` waits for the copies still running.
    max_bytes: adding past this raises BudgetExceeded; records already stored stay.
    spill_dir: each record is appended at once (as safetensors bytes) to records/spill-NNNNN.stream and
               one line to index.jsonl, so a killed run still loads with attncap.load(spill_dir);
               close() (the capture block's exit) folds the log into index.json.
    tokens:    {"text": [token strings] or [[...] per batch element]} for word lookups in token_map:
               the tokens of every call that has none of its own in call_tokens {call: tokens}.
    """

    def __init__(self, offload: str | None = "cpu", max_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None, tokens: dict | None = None) -> None:
        from .options import check_offload, check_spill_dir

        self.offload = check_offload(offload)
        self.max_bytes = max_bytes
        self._records: list[Record] = []
        self._pending: list[torch.cuda.Event] = []  # device-to-host copies not known to be done
        self._nbytes = 0
        self._entries: list[str] = []  # JSON index entries of spilled records
        self.spill_dir = None if check_spill_dir(spill_dir) is None else Path(spill_dir)
        self._log = self._stream = None
        if self.spill_dir is not None:
            if holds_store(self.spill_dir):
                raise FileExistsError(f"spill_dir {self.spill_dir} already holds a store; load it with attncap.load "
                                      "or choose an empty directory")
            (self.spill_dir / "records").mkdir(parents=True, exist_ok=True)
            self._log, self._stream = IndexLog(self.spill_dir), SpillStream(self.spill_dir)
        self._tokens = None
        self.call_tokens: dict[int, dict] = {}
        if tokens is not None:
            self.tokens = tokens

    @property
    def tokens(self) -> dict | None:
        return self._tokens

    @tokens.setter
    def tokens(self, value: dict | None) -> None:
        """Setting store.tokens labels every call with them (it replaces the prompts the capture read)."""
        for call in list(self.call_tokens):
            self._set_tokens(call, None)
        self._set_tokens(None, value)

    def set_call_tokens(self, call: int, value: dict | None) -> None:
        """The prompt tokens of pipeline call ``call`` (the first call's also become store.tokens when unset)."""
        self._set_tokens(call, value)
        if self._tokens is None and value is not None:
            self._set_tokens(None, value)

    def tokens_of(self, call: int) -> dict | None:
        """The tokens that label the maps of pipeline call ``call``."""
        return self.call_tokens.get(call, self._tokens)

    def _set_tokens(self, call: int | None, value: dict | None) -> None:
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"tokens must be a dict like {{'text': [...]}} or None; got {type(value).__name__}")
        if call is None:
            self._tokens = value
        elif value is None:
            self.call_tokens.pop(call, None)
        else:
            self.call_tokens[call] = value
        if self._log is not None:
            self._log.append({"tokens": value, "call": call})

    @property
    def records(self) -> list[Record]:
        """The records in filing order (after the copies to the host still running are done)."""
        if self._pending:
            for event in self._pending:
                event.synchronize()
            self._pending.clear()
        return self._records

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._records)

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
        data = record.data.detach()
        if self.offload == "cpu" and data.is_cuda and self._log is None:
            data = self._copy_to_host(data)
        else:
            data = data.to(device=self.offload or data.device, dtype=torch.float32).contiguous()
            if data.untyped_storage().nbytes() > data.nbytes:
                data = data.clone()  # a view (e.g. one CFG half) would keep its whole base alive
        record.data = data
        if self._log is not None:
            self._spill(record)
        self._records.append(record)
        self._nbytes += record.nbytes

    def _copy_to_host(self, data: torch.Tensor) -> torch.Tensor:
        """``data`` as float32 in fresh pinned host memory, copied on the current stream without waiting."""
        host = torch.empty(data.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(data.to(torch.float32), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append(event)
        return host

    def _spill(self, record: Record) -> None:
        fields = _fields(record)
        try:
            fields_json = json.dumps(fields)
        except TypeError as e:
            raise TypeError(f"Record.meta must be JSON-able to spill: {e}") from None
        where = self._stream.append(record.data, fields_json)
        entry = fields_json[:-1] + f', "shard": "{where["shard"]}", "offset": {where["offset"]}, ' \
            f'"length": {where["length"]}, "key": "data"}}'
        self._entries.append(entry)
        self._log.append_line('{"record": ' + entry + "}")

    def close(self) -> None:
        """Fold a spilling store's log into index.json (atomically) and drop the log; adding more reopens it.
        attncap.capture calls this on exit. Without spill_dir there is nothing to do."""
        if self._log is None:
            return
        self._stream.close()
        write_atomic(self.spill_dir / INDEX, index_text(True, self._tokens, self.call_tokens, self._entries))
        self._log.close(remove=True)

    def get(self, layer: str | Sequence[str] | None = None, step: int | Sequence[int] | str | None = None,
            relation: str | Sequence[str] | None = None, kind: str | None = "map",
            branch: str | None = None, call: int | None = None) -> list[Record]:
        """Records matching every filter. layer: name, glob or list; step: int, list or "last" (the
        largest step among records matching the other filters); call: the pipeline call; None matches anything."""
        layers = [layer] if isinstance(layer, str) else layer
        relations = [relation] if isinstance(relation, str) else relation
        out = [r for r in self.records
               if (layers is None or any(r.layer == p or fnmatch.fnmatchcase(r.layer, p) for p in layers))
               and (relations is None or r.relation in relations) and (kind is None or r.kind == kind)
               and (branch is None or r.branch == branch) and (call is None or r.call == call)]
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
                          f"{have('kind')}, branches {have('branch')}, calls {sorted({r.call for r in self.records})}")

    def aggregate(self, kind: str = "map", layer=None, step=None, relation=None, branch: str | None = None,
                  size: tuple[int, int] | None = None, reduce: str = "mean", call: int | None = None) -> torch.Tensor:
        """Mean ("sum", "max") of the selected records' data. size=(h, w) first resizes each record's
        spatial axis (the query grid; the key grid for colsum/rows) so layers of different resolution mix."""
        if reduce not in ("mean", "sum", "max"):
            raise ValueError(f"reduce must be 'mean', 'sum' or 'max'; got {reduce!r}")
        if size is not None and len(size) != 2:
            raise ValueError(f"size must be (h, w); got {size!r}")
        recs = self.get(layer=layer, step=step, relation=relation, kind=kind, branch=branch, call=call)
        if not recs:
            raise self._none_found(f"kind={kind!r} layer={layer!r} step={step!r} relation={relation!r} "
                                   f"branch={branch!r} call={call!r}")
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

    def _word_keys(self, word: str, batch: int, call: int = 0) -> list[int]:
        toks = (self.tokens_of(call) or {}).get("text")
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
                  branch: str | None = None, size: tuple[int, int] | None = None, batch: int = 0,
                  call: int | None = None) -> torch.Tensor:
        """float32 [*query_grid] map of a text token (a word, or a key index of the key segment) for batch
        element ``batch``, averaged over kept heads, the word's tokens and the matching records.
        Uses "tokens" records holding the keys, else "map" records. relation None: relations from a
        query grid to text; branch None: "cond" where such records exist (the prompt, not the negative prompt),
        else any;
        call None: every pipeline call, each word looked up in its own call's prompt tokens."""
        # default: spatial queries (image/video) attending to text, so the map can be laid on the picture
        rel_ok = ((lambda r: r.relation.endswith("->text") and r.query_grid is not None) if relation is None
                  else (lambda r: r.relation == relation))
        recs = [r for r in self.get(layer=layer, step=step, kind=None, branch=branch, call=call) if rel_ok(r)]
        if branch is None and any(r.branch == "cond" for r in recs):
            recs = [r for r in recs if r.branch == "cond"]
        # a word's key indices come from the prompt of each record's own pipeline call
        keys_of = {c: [int(word_or_index)] if isinstance(word_or_index, int) else
                   self._word_keys(word_or_index, batch, c)
                   for c in sorted({r.call for r in recs} or {0 if call is None else call})}
        keys = keys_of[min(keys_of)]
        chosen = [(r, [r.meta["keys"].index(k) for k in keys_of[r.call]]) for r in recs
                  if r.kind == "tokens" and all(k in r.meta.get("keys", ()) for k in keys_of[r.call])]
        if not chosen:
            chosen = [(r, keys_of[r.call]) for r in recs if r.kind == "map" and max(keys_of[r.call]) < r.data.shape[3]]
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

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write safetensors shards + index.json to ``directory`` (created); returns its path.

        A directory that already holds a store is refused unless overwrite=True, which replaces its
        files. Saving a spilling store into its own spill_dir closes it (the records are there already)."""
        d = Path(directory)
        if self.spill_dir is not None and d.resolve() == self.spill_dir.resolve():
            self.close()
            return d
        if holds_store(d) and not overwrite:
            raise FileExistsError(f"{d} already holds an attncap store; pass overwrite=True to replace it, or "
                                  "choose another folder")
        d.mkdir(parents=True, exist_ok=True)
        old = set(d.glob("maps-*.safetensors")) | set((d / "records").glob("*.safetensors")) \
            | set((d / "records").glob("*.stream"))
        entries, shard, written, n, k = [], {}, set(), 0, 0
        for i, r in enumerate(self.records):
            key = f"{i:06d}"
            shard[key] = r.data.cpu()
            n += r.nbytes
            entries.append(json.dumps({**_fields(r), "shard": f"maps-{k:05d}.safetensors", "key": key}))
            if n >= SHARD_BYTES or i == len(self.records) - 1:
                written.add(d / f"maps-{k:05d}.safetensors")
                write_shard(d / f"maps-{k:05d}.safetensors", shard, {})
                shard, n, k = {}, 0, k + 1
        write_atomic(d / INDEX, index_text(False, self._tokens, self.call_tokens, entries))
        for path in sorted(old - written) + [d / LOG]:
            path.unlink(missing_ok=True)
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
