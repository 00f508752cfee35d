"""A store on disk: safetensors shards, a JSON index, and the append-only files of a spilling store.

Layout of a store directory:
    index.json          {"format", "version", "spill", "tokens", "call_tokens", "records": [entry, ...]}
    maps-NNNNN.safetensors       a saved store's shards, many records each
    records/spill-NNNNN.stream   a spilling store's records: safetensors files (one per record, its
                        fields in the metadata) written back to back, so spilling a record is one
                        append to an open file, not a new file (creating a file costs ~1 ms)
    index.jsonl         a spilling store's log: a header line, then one line per record (with its
                        offset in the stream) or tokens update; folded into index.json on close
An entry is a record's fields plus "shard" (a path inside the directory), "key" (its tensor) and,
inside a stream, "offset" and "length" of its safetensors bytes.

Reading trusts nothing: shard paths must stay inside the directory, malformed entries raise an error
naming the entry, and a damaged shard (truncated, empty, overwritten) costs only the records whose
bytes it lost: a warning names the file and every other record loads. Records a killed run wrote
after its last log line are recovered from the stream. Shards are parsed here (an 8-byte header
length, a JSON header, raw little-endian float32 data), never unpickled.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file

FORMAT = "attncap.store"
VERSION = 1
NDIM = {"map": 4, "tokens": 4, "rows": 4, "colsum": 3, "entropy": 3, "peak": 3}
FIELDS = ("layer", "step", "timestep", "relation", "kind", "branch", "query_grid", "key_grid", "heads", "meta")
INDEX, LOG = "index.json", "index.jsonl"
MAX_HEADER = 100 * 2**20
STREAM_BYTES = 1 << 30  # a spill stream rolls over to the next file past this


class DamagedShard(Exception):
    """A shard's bytes do not hold what its header or the index promises."""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, **metadata})
    os.replace(tmp, path)


def holds_store(d: Path) -> bool:
    return (d / INDEX).exists() or (d / LOG).exists() or any(d.glob("maps-*.safetensors")) \
        or any((d / "records").glob("*.safetensors")) or any((d / "records").glob("*.stream"))


# ----------------------------------------------------------------------------------------- shards
class Blob:
    """The safetensors bytes at [start, end) of an open file (a whole shard, or one record of a stream).
    Every failure is a DamagedShard naming the file."""

    def __init__(self, file, path: Path, start: int = 0, end: int | None = None):
        self.path, self.start = path, start
        size = os.fstat(file.fileno()).st_size
        self.end = size if end is None else end
        where = f"{path}" + (f" at byte {start}" if start else "")
        if self.end > size:
            raise DamagedShard(f"{where}: needs {self.end} bytes but the file has {size} (truncated?)")
        try:
            file.seek(start)
            n = int.from_bytes(file.read(8), "little")
            if self.end - start < 8 or not 2 <= n <= min(MAX_HEADER, self.end - start - 8):
                raise DamagedShard(f"{where}: {self.end - start} bytes cannot hold a safetensors header of {n} bytes")
            header = json.loads(file.read(n))
        except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 errors
            raise DamagedShard(f"{where}: {e}") from None
        if not isinstance(header, dict):
            raise DamagedShard(f"{where}: the header is not a JSON object")
        self.file, self.header, self.base = file, header, start + 8 + n

    def metadata(self) -> dict:
        meta = self.header.get("__metadata__") or {}
        return meta if isinstance(meta, dict) else {}

    def data_end(self) -> int:
        """Where this blob's tensor data ends (the next blob of a stream starts there)."""
        ends = [v["data_offsets"][1] for k, v in self.header.items() if k != "__metadata__" and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
        return self.base + max(ends + [0])

    def get(self, key: str) -> torch.Tensor:
        info = self.header.get(key)
        if not isinstance(info, dict):
            raise DamagedShard(f"{self.path} has no tensor {key!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        ok = info.get("dtype") == "F32" and isinstance(shape, list) \
            and all(isinstance(s, int) and s >= 0 for s in shape) and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != 4 * math.prod(shape):
            raise DamagedShard(f"{self.path}: tensor {key!r} has a malformed header entry {info}")
        if self.base + offsets[1] > self.end:
            raise DamagedShard(f"{self.path}: tensor {key!r} needs bytes up to {self.base + offsets[1]} but the "
                               f"file has {self.end} (truncated?)")
        self.file.seek(self.base + offsets[0])
        raw = bytearray(self.file.read(offsets[1] - offsets[0]))
        data = torch.frombuffer(raw, dtype=torch.float32) if raw else torch.empty(0)
        return data.reshape(shape)


class Files:
    """Open files and parsed blobs of one load, closed together."""

    def __init__(self):
        self.files: dict[Path, Any] = {}
        self.blobs: dict[tuple[Path, int], Blob] = {}

    def blob(self, path: Path, start: int = 0, end: int | None = None) -> Blob:
        if (path, start) not in self.blobs:
            if path not in self.files:
                try:
                    self.files[path] = open(path, "rb")
                except OSError as e:
                    raise DamagedShard(f"{path}: {e.strerror or e}") from None
            self.blobs[(path, start)] = Blob(self.files[path], path, start, end)
        return self.blobs[(path, start)]

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def stream_blobs(files: Files, path: Path) -> Iterable[tuple[int, int]]:
    """(offset, length) of each record of a spill stream, in order, up to the first damaged one, whose
    offset the DamagedShard carries (.offset)."""
    size, pos = path.stat().st_size, 0
    while pos < size:
        try:
            end = files.blob(path, pos, None).data_end()
            if end > size:
                raise DamagedShard(f"{path}: the record at byte {pos} is cut off at {size} (killed while writing?)")
        except DamagedShard as err:
            err.offset = pos
            raise
        yield pos, end - pos
        pos = end


def encode(data: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """One float32 tensor "data" as the bytes of a safetensors file (the format's 8-byte little-endian
    header length, a JSON header padded to 8 bytes, the raw data), without safetensors' per-call overhead."""
    raw = data.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    header = json.dumps({"__metadata__": metadata,
                         "data": {"dtype": "F32", "shape": list(data.shape), "data_offsets": [0, len(raw)]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw


class SpillStream:
    """Appends each record as a safetensors file to records/spill-NNNNN.stream; rolls over at STREAM_BYTES."""

    def __init__(self, directory: Path):
        self.dir = directory / "records"
        self.index, self._file, self._size = 0, None, 0

    def append(self, data: torch.Tensor, fields_json: str) -> dict:
        """Write one record (its fields as JSON in the metadata); returns {"shard", "offset", "length"}."""
        blob = encode(data, {"format": FORMAT, "record": fields_json})
        if self._file is not None and self._size + len(blob) > STREAM_BYTES:
            self.close()
            self.index += 1
        if self._file is None:
            path = self.dir / f"spill-{self.index:05d}.stream"
            self._file = open(path, "ab")
            self._size = self._file.tell()
        offset = self._size
        self._file.write(blob)
        self._file.flush()
        self._size += len(blob)
        return {"shard": f"records/spill-{self.index:05d}.stream", "offset": offset, "length": len(blob)}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------------------- entries
def _bad(where: str, entry: Any, problem: str) -> ValueError:
    head = {k: entry.get(k) for k in ("layer", "step", "kind", "shard")} if isinstance(entry, dict) else entry
    return ValueError(f"{where} is malformed ({problem}): {str(head)[:200]}; the index was edited or damaged")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_fields(e: Any, where: str) -> dict:
    """The record fields of an index entry or a shard's metadata, checked; ValueError naming ``where``."""
    if not isinstance(e, dict):
        raise _bad(where, e, "not a JSON object")
    missing = [k for k in FIELDS if k not in e and k != "meta"]
    if missing:
        raise _bad(where, e, f"missing {missing}")
    def grid_ok(g: Any) -> bool:
        return g is None or isinstance(g, list) and 1 <= len(g) <= 3 and all(_is_int(x) and x > 0 for x in g)

    timestep = e["timestep"]
    checks = (("layer", isinstance(e["layer"], str)), ("step", _is_int(e["step"])),
              ("timestep", timestep is None or isinstance(timestep, (int, float)) and not isinstance(timestep, bool)),
              ("relation", isinstance(e["relation"], str)), ("kind", e["kind"] in NDIM),
              ("branch", e["branch"] is None or isinstance(e["branch"], str)),
              ("query_grid", grid_ok(e["query_grid"])), ("key_grid", grid_ok(e["key_grid"])),
              ("heads", e["heads"] in ("mean", "all")
               or isinstance(e["heads"], list) and all(_is_int(h) for h in e["heads"])),
              ("meta", isinstance(e.get("meta", {}), dict) or e.get("meta") is None),
              ("call", _is_int(e.get("call", 0)) and e.get("call", 0) >= 0))
    wrong = [name for name, ok in checks if not ok]
    if wrong:
        raise _bad(where, e, "bad " + ", ".join(f"{k}={e.get(k)!r}" for k in wrong))
    return e


def shard_path(d: Path, e: dict, where: str) -> Path:
    """The shard an entry names, which must be a relative path inside the store directory ``d``."""
    shard = e.get("shard")
    if not isinstance(shard, str) or not isinstance(e.get("key"), str) \
            or not shard.endswith((".safetensors", ".stream")):
        raise _bad(where, e, "'shard' must name a .safetensors or .stream file and 'key' a tensor")
    span = [e.get("offset", 0), e.get("length", 0)]
    if not all(_is_int(x) and x >= 0 for x in span) or shard.endswith(".stream") != ("offset" in e and "length" in e):
        raise _bad(where, e, "a .stream shard needs int 'offset' and 'length' (and only it)")
    path = d / shard
    if os.path.isabs(shard) or "\\" in shard or ".." in Path(shard).parts \
            or not path.resolve().is_relative_to(d.resolve()):
        raise _bad(where, e, f"shard {shard!r} points outside the store folder {d}")
    return path


def record_of(e: dict, data: torch.Tensor):
    from .store import Record

    tup = lambda v: None if v is None else tuple(v)  # noqa: E731
    heads = e["heads"] if isinstance(e["heads"], str) else tuple(e["heads"])
    return Record(e["layer"], e["step"], e["timestep"], e["relation"], e["kind"], e["branch"], data,
                  tup(e["query_grid"]), tup(e["key_grid"]), heads, e.get("meta") or {}, call=e.get("call", 0))


# ----------------------------------------------------------------------------------------- the log
class IndexLog:
    """The append-only index of a spilling store: one JSON line per event, compacted on close."""

    def __init__(self, directory: Path):
        self.path = directory / LOG
        self._file = None

    def append(self, obj: dict) -> None:
        self.append_line(json.dumps(obj))

    def append_line(self, line: str) -> None:
        if self._file is None:
            fresh = not self.path.exists()
            self._file = open(self.path, "a", encoding="utf-8")
            if fresh:
                self._file.write(json.dumps({"format": FORMAT, "version": VERSION, "spill": True}) + "\n")
        self._file.write(line + "\n")
        self._file.flush()  # in the OS's hands now: a killed process loses nothing it wrote

    def close(self, remove: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove and self.path.exists():
            self.path.unlink()


def index_text(spilled: bool, tokens: dict | None, call_tokens: dict[int, dict], entries: Iterable[str]) -> str:
    head = json.dumps({"format": FORMAT, "version": VERSION, "spill": spilled, "tokens": tokens,
                       "call_tokens": {str(c): t for c, t in sorted(call_tokens.items())}})
    return head[:-1] + ', "records": [\n' + ",\n".join(entries) + "\n]}\n"


def _read_log(path: Path) -> tuple[list[dict], list[tuple[int | None, Any]]]:
    """Record entries and (call, tokens) updates of a log; a torn last line (a killed write) is dropped."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    entries, tokens = [], []
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping a torn last line (the run was killed while writing it)")
                break
            raise ValueError(f"{path} line {i + 1} is not JSON: {line[:120]!r}") from None
        if i == 0:
            if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version", 0) > VERSION:
                raise ValueError(f"{path} is not an {FORMAT} log of version <= {VERSION}")
        elif isinstance(obj, dict) and "record" in obj:
            entries.append(obj["record"])
        elif isinstance(obj, dict) and "tokens" in obj:
            tokens.append((obj.get("call"), obj["tokens"]))
        else:
            raise ValueError(f"{path} line {i + 1} is malformed: {line[:120]!r}")
    return entries, tokens


# ----------------------------------------------------------------------------------------- load
def load(directory: str | os.PathLike):
    """Read a saved or spilled store (index.json, the log of a spill that never closed, and shards an
    interrupted spill wrote after its last log line). Data comes back on CPU; nothing is unpickled."""
    from .store import Store

    d = Path(directory)
    index, idx_path, log_path = None, d / INDEX, d / LOG
    if idx_path.exists():
        try:
            index = json.loads(idx_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{idx_path} is unreadable (interrupted write?); recovering records from the log and shards")
    if index is not None and (not isinstance(index, dict) or index.get("format") != FORMAT
                              or index.get("version", 0) > VERSION or not isinstance(index.get("records"), list)):
        raise ValueError(f"{idx_path} is not an {FORMAT} index of version <= {VERSION}")
    entries = [(e, f"{idx_path} record {i}") for i, e in enumerate(index["records"])] if index else []
    tokens, call_tokens = (index.get("tokens"), dict(index.get("call_tokens") or {})) if index else (None, {})
    spilled = index is None or bool(index.get("spill"))
    if log_path.exists():
        logged, updates = _read_log(log_path)
        entries += [(e, f"{log_path} record {i}") for i, e in enumerate(logged)]
        for call, t in updates:
            if call is None:
                tokens = t
            else:
                call_tokens[str(call)] = t
        spilled = True
    if index is None and not entries and not holds_store(d):
        raise FileNotFoundError(f"no attncap store in {d}: neither {INDEX}, {LOG} nor spilled records")
    store = Store(offload="cpu", tokens=tokens)
    try:
        store.call_tokens = {int(c): t for c, t in call_tokens.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{idx_path}: call_tokens must map call indices to tokens; got {list(call_tokens)}") from None
    files = Files()
    damaged: dict[Path, list[str]] = {}
    seen: set[tuple[str, str, int]] = set()
    try:
        for e, where in entries:
            path = shard_path(d, check_fields(e, where), where)
            ident = (e["shard"], e["key"], e.get("offset", 0))
            if ident in seen:  # the log and a compacted index may both list a record
                continue
            seen.add(ident)
            start = e.get("offset", 0)
            try:
                data = files.blob(path, start, start + e["length"] if "length" in e else None).get(e["key"])
            except DamagedShard as err:
                damaged.setdefault(path, []).append(str(err))
                continue
            _append(store, record_of(e, data), where)
        if spilled:
            _recover_strays(store, d, files, seen, damaged)
    finally:
        files.close()
    for path, errors in damaged.items():
        warnings.warn(f"attncap.load: skipped {len(errors)} record(s) of damaged shard {path}: {errors[0]}")
    return store


def _recover_strays(store, d: Path, files: Files, seen: set, damaged: dict) -> None:
    """Records a killed spill wrote after its last log line: from their own metadata, in write order."""
    found: list[tuple[Path, str, int, int | None]] = []
    for p in sorted((d / "records").glob("*.stream")):
        try:
            for off, n in stream_blobs(files, p):
                found.append((p, f"records/{p.name}", off, off + n))
        except DamagedShard as err:  # records past it are lost unless the index lists them
            if (f"records/{p.name}", "data", err.offset) not in seen:
                damaged.setdefault(p, []).append(str(err))
    found += [(p, f"records/{p.name}", 0, None) for p in sorted((d / "records").glob("*.safetensors"))]
    for path, name, start, end in found:
        if (name, "data", start) in seen:
            continue
        try:
            blob = files.blob(path, start, end)
            meta = blob.metadata()
            # spill streams keep the fields as one JSON string; single-record shards of older spills, one per field
            fields = json.loads(meta["record"]) if "record" in meta else \
                {k: json.loads(meta[k]) for k in FIELDS + ("call",) if k in meta}
            fields = check_fields(fields, f"{path} metadata" + (f" at byte {start}" if start else ""))
            data = blob.get("data")
        except (DamagedShard, ValueError, TypeError) as err:
            damaged.setdefault(path, []).append(str(err))
            continue
        _append(store, record_of(fields, data), str(path))


def _append(store, record, where: str) -> None:
    if record.data.dim() != NDIM[record.kind]:
        raise ValueError(f"{where}: kind {record.kind!r} needs {NDIM[record.kind]}-D data; the shard holds "
                         f"shape {list(record.data.shape)}")
    store.records.append(record)
    store._nbytes += record.nbytes
