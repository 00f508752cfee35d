"""The torch path: chunked PyTorch computing exactly what the Triton kernels compute, on any device.

attncap.ops runs it for CPU tensors and for any device without Triton kernels (Apple MPS, ...).
It uses only device-generic torch ops, makes every per-call tensor on the inputs' device and reads
no device value back to the host (the plans' index tables are host data: a table that lives on
another device is copied to the host once and the copy kept, see _host). The one CPU-only op,
PyTorch's fused CPU flash forward, runs only on CPU tensors. An op with no kernel on the device
raises NotImplementedError naming the device.

forward() takes the arguments of attncap.kernels.forward plus ``maps`` and returns its items plus
the maps; maps_from_lse() is the map pass from a given LSE. Both work tile by tile: a tile is a
block of batches, a block of key heads (with their query heads) and a block of query rows, with
EVERY key of those rows, so its probabilities are final and every product reduces from them in the
same pass (the GPU kernels need a second pass for maps). What keeps it near the cost of SDPA alone:

* scores come out of the matmul in log2 units (the queries carry scale * log2(e)): torch's exp2 is
  several times faster than its exp on CPU. Then m = max, E = exp2(S - m) in place, l = sum and
  w = 1 / l. P = E * w is never written: the output is (E V) * w (c x Dv numbers), and every product
  applies w where it is cheapest (addcmul into an unpooled map, one matrix-vector product for a
  column sum, the key-pooled values, 1/bin-size of the tile). The LSE is m + log2(l), the peak w
  and the entropy ln 2 * (log2 l - w sum_j E_j (S_j - m)): no log of P, no extra pass beyond one
  dot per row, and none of that without entropy;
* the score columns follow the first pooled key axis of the request (the bins of each size
  together, slot-major: slot s of each of them), so a pooled key axis is one view-and-sum
  reduction over a middle axis per bin size (no one-hot matmul, no scatter, no padded keys), and
  an unpooled key range is a slice; key pooling comes first, then head sums, query pooling last;
* tiles target the cache (TILE_BYTES); tiles, K/V copies (made once per block) and temporaries
  stay within ``workspace_bytes`` (WORKSPACE_BYTES by default): peak extra memory is the products
  plus that. On the CPU the tile buffers (three, RETAIN_BYTES in all) stay allocated per thread between
  calls, so a call does not fault their pages in again (_buffers).

Shape legend: B batch, H query heads, Hk key heads, G = H // Hk query heads per key head, Nq, Nk,
D, Dv; a tile is [bb, hb * G, c, Ncol] with Ncol = Nk score columns in the layout's order.
"""
from __future__ import annotations

import bisect
import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .layouts import AxisPlan

WORKSPACE_BYTES = 64 * 2**20   # default bound on a call's working memory beyond its inputs and products
TILE_BYTES = 4 * 2**20         # one fp32 score tile: the fastest of 0.25-16 MiB at every benchmark shape (measured,
                               # 1 thread; larger tiles fault their pages in again each call, smaller pay per-tile host cost)
MIN_ROWS = 256                 # query rows a tile keeps before it splits heads or batches instead
RETAIN_BYTES = 16 * 2**20      # CPU tile buffers up to this size stay allocated per thread between calls (_buffers)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG = -1e30  # a masked score: exp2 makes it 0 and, unlike -inf, 0 * (NEG - m) stays 0 in the entropy

_HOST_CACHE: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_PREP_CACHE: OrderedDict[tuple, tuple] = OrderedDict()  # see _prepare
_RETAINED = threading.local()  # .block: this thread's CPU tile buffers, see _buffers
PREP_CACHE_SIZE = 64
MAX_RUNS = 4  # selected keys in at most this many runs of consecutive columns are sliced, not gathered


def _host(t: torch.Tensor) -> torch.Tensor:
    """A plan table on the CPU. attncap.ops caches its plans per device, so a table from another
    device is copied once (one device read, on the first call of a plan) and kept here."""
    if t.device.type == "cpu":
        return t
    hit = _HOST_CACHE.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    _HOST_CACHE[id(t)] = (t, t.cpu())  # holding t keeps its id from being reused while cached
    if len(_HOST_CACHE) > 512:
        _HOST_CACHE.popitem(last=False)
    return _HOST_CACHE[id(t)][1]


def _device_errors(fn):
    """Turn torch's 'no kernel for this backend' errors into one that names the device."""
    @functools.wraps(fn)
    def wrapper(q: torch.Tensor, *args, **kwargs):
        try:
            return fn(q, *args, **kwargs)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"attncap's torch path needs an op that has no kernel on device '{q.device}' ({e}). "
                "Run it on the CPU (move q, k, v there), or on MPS set PYTORCH_ENABLE_MPS_FALLBACK=1") from e
    return wrapper


@dataclass
class _Columns:
    """The order of a tile's score columns: a permutation of the keys.

    token   long [Ncol] on the device: key token of each column (None: the identity order)
    pos     long [Nk] on the host: column of each key token
    plan    the pooled key axis the order serves (None: identity)
    groups  (first column, size, bins) blocks, one per bin size (bins sorted by size, descending):
            slot s of each of those bins for s = 0..size-1; summing a block over its slots pools them
    unsort  long [nb]: bins by size -> bin order (None when bins are already in order)
    nbins   bins of ``plan`` (0: identity order)
    selections  cache of selection()
    """
    token: torch.Tensor | None
    pos: torch.Tensor
    plan: AxisPlan | None
    groups: list[tuple[int, int, int]]
    unsort: torch.Tensor | None
    nbins: int
    selections: dict = field(default_factory=dict)  # see selection()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., Ncol] -> [..., nb]: sums over the bins of ``plan``, bins by size (bin_order()
        puts them in bin order: once per call on the map, not once per tile). One sum per bin
        size, each into its own bins (a ragged grid's 4 sizes: 4 sums, no partial sums added up)."""
        out, at = x.new_empty(x.shape[:-1] + (self.nbins,)), 0
        for first, size, n in self.groups:
            torch.sum(x[..., first:first + size * n].unflatten(-1, (size, n)), -2, out=out[..., at:at + n])
            at += n
        return out

    def selection(self, selected: torch.Tensor) -> list[tuple[int, int, int]] | torch.Tensor:
        """The columns of the selected keys (int [S]): on the CPU, as (first column, count, first of
        the S) runs when they come in at most MAX_RUNS runs of consecutive columns (a word's tokens,
        unpooled: slices, no gather, which is slow on a [.., Ncol] tile's last dim); else one long
        index tensor on selected's device (never read back from another device). Cached per
        selected tensor (a plan's table)."""
        hit = self.selections.get(id(selected))
        if hit is not None and hit[0] is selected:
            return hit[1]
        found = self.pos.to(selected.device)[selected.long()]  # on another device: gathered there
        if selected.device.type == "cpu":
            col = found.tolist()
            breaks = [0] + [i for i in range(1, len(col)) if col[i] != col[i - 1] + 1] + [len(col)]
            if len(breaks) - 1 <= MAX_RUNS:
                found = [(col[a], b - a, a) for a, b in zip(breaks[:-1], breaks[1:])]
        self.selections[id(selected)] = (selected, found)  # holding selected keeps its id from being reused
        return found

    def bin_order(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., nb] with bins by size (as pool() gives them) -> bins in order."""
        return x if self.unsort is None else x.index_select(-1, self.unsort)


def _columns(maps, Nk: int, device: torch.device) -> _Columns:
    """The column order: that of the first pooled key axis among ``maps``, else the identity."""
    pooled = next((kp for _, kp, _ in maps if kp.pooled), None)
    if pooled is None:
        return _Columns(None, torch.arange(Nk), None, [], None, 0)
    perm, starts = _host(pooled.perm).long(), _host(pooled.bin_start).long()
    counts = starts[1:] - starts[:-1]
    order = torch.sort(counts, descending=True, stable=True).indices
    by_size = counts[order]
    blocks, groups, first, i = [], [], 0, 0
    while i < order.numel():  # the bins of one size, slot-major: slot s of each, for s = 0..size-1
        size = int(by_size[i])
        n = int((by_size == size).sum())
        blocks.append(perm[(starts[order[i:i + n]][None, :] + torch.arange(size)[:, None]).reshape(-1)])
        groups.append((first, size, n))
        first, i = first + size * n, i + n
    inside = torch.zeros(Nk, dtype=torch.bool)
    inside[perm] = True
    token = torch.cat(blocks + [torch.arange(Nk)[~inside]])
    pos = torch.empty(Nk, dtype=torch.long)
    pos[token] = torch.arange(Nk)
    unsort = None if bool((order == torch.arange(order.numel())).all()) else torch.argsort(order).to(device)
    return _Columns(token.to(device), pos, pooled, groups, unsort, counts.numel())


class _MapJob:
    """One map [B, G, Qb, Kb] accumulated tile by tile from final probabilities: the plan's index
    tables, built once per (plans, device) and cached (_prepare); the sums live in the caller's
    ``total`` (zeros()), so concurrent calls can share a job.

    ``rows`` (host, ascending) are the query tokens of the pass, in the order tiles take them.
    """

    def __init__(self, qplan: AxisPlan, kplan: AxisPlan, heads_table: torch.Tensor, cols: _Columns,
                 rows: torch.Tensor, device: torch.device):
        table = _host(heads_table).long()
        self.G, self.hpg = table.shape
        self.heads = table
        self.all_heads = self.G == 1 and bool((table[0] == torch.arange(self.hpg)).all())
        # Key side: the layout's own pooled axis, a slice of columns, or a gather (any other axis).
        kperm = _host(kplan.perm).long()
        colidx = cols.pos[kperm]
        self.key_mode = "pool" if kplan is cols.plan else "slice" if not kplan.pooled and bool(
            (colidx == torch.arange(int(colidx[0]), int(colidx[0]) + colidx.numel())).all()) else "gather"
        self.key_slice = slice(int(colidx[0]), int(colidx[0]) + colidx.numel())
        self.key_cols = colidx.to(device)
        self.key_bins = _host(kplan.bin_of_slot).long().to(device)
        self.qb, self.kb = qplan.nbins, kplan.nbins
        # Query side: (position in rows, bin) pairs sorted by position; a tile takes a run of them.
        qperm = _host(qplan.perm).long()
        pos = torch.searchsorted(rows, qperm)
        order = torch.argsort(pos, stable=True)
        pair_pos, pair_bin = pos[order], _host(qplan.bin_of_slot).long()[order]
        self.pair_pos = pair_pos.tolist()  # bisected on the host by every tile: a list, not a tensor
        n = order.numel()
        self.rows_contiguous = bool((pair_pos == torch.arange(int(pair_pos[0]), int(pair_pos[0]) + n)).all())
        self.bins_contiguous = self.rows_contiguous and bool((pair_bin == torch.arange(n)).all())
        self.one_bin = qplan.nbins == 1
        # Pooled queries in token order come in runs of consecutive rows with one bin (a grid row's
        # pw tokens under a (ph, pw) pool): with runs of one length L the rows are summed L at a time
        # by reshape, and index_add_ adds L times fewer rows (it is per row, the slow part).
        self.run = 1
        if self.rows_contiguous and not self.bins_contiguous and not self.one_bin and n > 1:
            starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(pair_bin[1:] != pair_bin[:-1])[:, 0] + 1])
            lengths = torch.diff(torch.cat([starts, torch.tensor([n])]))
            if bool((lengths == lengths[0]).all()):
                self.run = int(lengths[0])
        self.pair_pos_dev, self.pair_bin_dev = pair_pos.to(device), pair_bin.to(device)
        self.band = self._bands(qplan, pair_bin) if self.run > 1 else None
        self.device = device
        self.scale = None
        if qplan.pooled or kplan.pooled:
            qc, kc = qplan.counts.to(device).float(), kplan.counts.to(device).float()
            self.scale = (qc[:, None] * kc[None, :]).reciprocal_()

    def _bands(self, qplan: AxisPlan, pair_bin: torch.Tensor) -> tuple[int, int, int, int, int] | None:
        """(R, ph, nbx, pw, first bin) when the pooled queries lie on a grid in whole bands: each band
        R = ph * W tokens (ph grid rows of W = nbx * pw), its bins nbx consecutive ones, bin x of a grid
        row its tokens x * pw .. x * pw + pw - 1 (an (h, w) or (t, h, w) grid pooled (ph, pw) or
        (1, ph, pw) with the sizes divisible). Checked on every token; else None (runs, index_add_)."""
        if qplan.grid is None:
            return None
        nbx, pw, n = qplan.grid[-1], self.run, pair_bin.numel()
        run_bins = pair_bin[::pw]
        starts = run_bins[::nbx]  # the first bin of each grid row
        changed = torch.nonzero(starts[1:] != starts[:-1])[:, 0]
        ph = int(changed[0]) + 1 if changed.numel() else starts.numel()
        R = ph * nbx * pw
        if n % R:
            return None
        r = torch.arange(run_bins.numel())
        if not bool((run_bins == run_bins[0] + r // (ph * nbx) * nbx + r % nbx).all()):
            return None
        return R, ph, nbx, pw, int(run_bins[0])

    def writes_first(self, H: int) -> bool:
        """Whether an unpooled map's every value comes from one head, or from every head of a call of
        H query heads: its sums then start empty and the tile of each row's first head writes them,
        instead of a zero fill and a read of zeros, two passes over the map."""
        return self.key_mode == "slice" and self.bins_contiguous and not self.one_bin and (
            self.hpg == 1 or (self.all_heads and self.hpg == H))

    def zeros(self, B: int, first: bool, device: torch.device) -> torch.Tensor:
        """The map's running sums, [B, G, Qb, Kb]: empty when ``first`` (writes_first), else zeros."""
        return (torch.empty if first else torch.zeros)((B, self.G, self.qb, self.kb), dtype=torch.float32, device=device)

    def add(self, total: torch.Tensor, first: bool, e: torch.Tensor, w: torch.Tensor | None, b0: int, b1: int,
            h0: int, h1: int, s: int, stop: int, cols: _Columns, scratch: torch.Tensor) -> None:
        """Add the tile's share: probabilities P = e * w of batches b0:b1, query heads h0:h1 and
        rows[s:stop]. e [bb, h1 - h0, stop - s, Ncol]; w [bb, h1 - h0, stop - s, 1], each row's 1 / l
        (0 for a row that sees no key), or None when e is already P. The scaling rides on the
        reductions (addcmul, a matmul for a one-bin query axis, or the key-pooled values, 1/bin-size of
        the tile): a full-size scaled copy is made, into ``scratch`` (a free tile buffer), only where
        unpooled keys meet pooled or scattered queries. ``first``: writes_first(H), as zeros() was told."""
        i0, i1 = bisect.bisect_left(self.pair_pos, s), bisect.bisect_left(self.pair_pos, stop)
        if i0 == i1:
            return
        fresh = not self.rows_contiguous  # whether x below is a copy of its own (scaled in place)
        if self.rows_contiguous:
            a = self.pair_pos[i0] - s
            e, w = e[:, :, a:a + i1 - i0], None if w is None else w[:, :, a:a + i1 - i0]
        else:
            rows = self.pair_pos_dev[i0:i1] - s
            e, w = e.index_select(2, rows), None if w is None else w.index_select(2, rows)
        alpha = 1.0 / self.hpg
        for groups, heads, summed in self._heads(h0, h1):
            if isinstance(heads, slice):
                x, ww, own = e[:, heads], None if w is None else w[:, heads], fresh
            else:
                x, ww, own = e.index_select(1, heads), None if w is None else w.index_select(1, heads), True
            dest = total[b0:b1, groups]
            if self.one_bin:  # sum over the tile's rows: w^T e, one matrix-vector product per head
                y = x.sum(2, keepdim=True) if ww is None else torch.matmul(ww.transpose(-1, -2), x)
                y = self._keys(y, cols)[:, :, 0]
                dest[:, :, 0].add_(y.sum(1, keepdim=True) if summed else y, alpha=alpha)
                continue
            if self.key_mode == "slice" and self.bins_contiguous:  # unpooled: dest += alpha * x * w, head by head
                x, d = x[..., self.key_slice], dest[:, :, i0:i1]
                for j in range(x.shape[1]) if summed else (None,):
                    xj, wj, dj = (x, ww, d) if j is None else (x[:, j], None if ww is None else ww[:, j], d[:, 0])
                    if first and (self.hpg == 1 or (h0 == 0 and j == 0)):  # see writes_first()
                        torch.mul(xj, alpha if wj is None else wj * alpha, out=dj)
                    else:
                        dj.add_(xj, alpha=alpha) if wj is None else dj.addcmul_(xj, wj, value=alpha)
                continue
            y = self._keys(x, cols)
            if ww is not None:
                if own or self.key_mode != "slice":  # y is a copy: scale it in place
                    y = y.mul_(ww)
                elif summed:  # a view of the tile: sum its heads, weighted, into scratch (1/n of the tile)
                    acc = scratch[:y[:, 0].numel()].view(y[:, :1].shape)
                    torch.mul(y[:, :1], ww[:, :1], out=acc)
                    for j in range(1, y.shape[1]):
                        acc.addcmul_(y[:, j:j + 1], ww[:, j:j + 1])
                    y, summed = acc, False
                else:
                    y = torch.mul(y, ww, out=scratch[:y.numel()].view(y.shape))
            if self.bins_contiguous:  # unpooled query range in ascending order: pair i is bin i
                dest[:, :, i0:i1].add_(y.sum(1, keepdim=True) if summed else y, alpha=alpha)
            elif self.band is not None:
                self._add_bands(dest, y, summed, i0, i1, alpha)
            elif self.run > 1:
                self._add_runs(dest, y, summed, i0, i1, alpha)
            else:
                dest.index_add_(2, self.pair_bin_dev[i0:i1], y.sum(1, keepdim=True) if summed else y, alpha=alpha)

    def _add_bands(self, dest: torch.Tensor, x: torch.Tensor, summed: bool, i0: int, i1: int, alpha: float) -> None:
        """_add_runs for pairs on whole bands (_bands): a tile's whole bands summed over their grid
        rows, then along each row by bin (two sums over middle axes, about half the time of a run sum
        and index_add_ at sdxl_cross), into their bins, consecutive in dest; the partial bands at the
        tile's ends by _add_runs."""
        R, ph, nbx, pw, first = self.band
        a0, a1 = -(-i0 // R) * R, i1 // R * R
        if a0 >= a1:
            self._add_runs(dest, x, summed, i0, i1, alpha)
            return
        bands = x[:, :, a0 - i0:a1 - i0].unflatten(2, ((a1 - a0) // R, ph, nbx, pw)).sum(3).sum(4)
        if summed:
            bands = bands.sum(1, keepdim=True)
        b0 = first + a0 // R * nbx
        dest[:, :, b0:b0 + bands.shape[2] * nbx].add_(bands.flatten(2, 3), alpha=alpha)
        for j0, j1 in ((i0, a0), (a1, i1)):
            if j0 < j1:
                self._add_runs(dest, x[:, :, j0 - i0:j1 - i0], summed, j0, j1, alpha)

    def _add_runs(self, dest: torch.Tensor, x: torch.Tensor, summed: bool, i0: int, i1: int, alpha: float) -> None:
        """dest[:, :, bin of pair i] += alpha * x[:, :, i - i0] (summed over x's heads if ``summed``) for
        pairs i0:i1 whose bins come in runs of self.run: whole runs summed by reshape first, then the
        heads (one axis per sum: torch's sum over two axes at once was ~10x slower at sdxl_cross), a
        tile's partial runs at its ends as they are."""
        L = self.run
        a0, a1 = -(-i0 // L) * L, i1 // L * L
        parts = [(i0, i1)] if a0 >= a1 else [(i0, a0), (a1, i1)]
        if a0 < a1:
            runs = x[:, :, a0 - i0:a1 - i0].unflatten(2, ((a1 - a0) // L, L)).sum(3)
            dest.index_add_(2, self.pair_bin_dev[a0:a1:L], runs.sum(1, keepdim=True) if summed else runs,
                            alpha=alpha)
        for j0, j1 in parts:
            if j0 < j1:
                part = x[:, :, j0 - i0:j1 - i0]
                dest.index_add_(2, self.pair_bin_dev[j0:j1], part.sum(1, keepdim=True) if summed else part, alpha=alpha)

    def _heads(self, h0: int, h1: int):
        """(groups of total, heads of the tile (a slice, or an index tensor), whether those heads sum
        into the one group) for this tile's query heads h0:h1."""
        if self.all_heads and h1 <= self.hpg:  # the tile's heads all lie in the one group 0..hpg-1
            yield slice(0, 1), slice(0, h1 - h0), h1 - h0 > 1
            return
        inside = (self.heads >= h0) & (self.heads < h1)
        if self.hpg == 1:
            g = torch.nonzero(inside[:, 0])[:, 0]
            if g.numel():
                heads = self.heads[g, 0] - h0
                if heads.numel() == h1 - h0 and bool((heads == torch.arange(h1 - h0)).all()) \
                        and int(g[-1]) - int(g[0]) == g.numel() - 1:
                    yield slice(int(g[0]), int(g[-1]) + 1), slice(None), False  # "all": every head its own group
                    return
                for gi, hi in zip(g.tolist(), heads.tolist()):
                    yield slice(gi, gi + 1), slice(hi, hi + 1), False
            return
        for gi in range(self.G):
            mine = self.heads[gi][inside[gi]] - h0
            if mine.numel():
                yield slice(gi, gi + 1), mine.to(self.device), mine.numel() > 1

    def _keys(self, x: torch.Tensor, cols: _Columns) -> torch.Tensor:
        if self.key_mode == "pool":
            return cols.pool(x)
        if self.key_mode == "slice":
            return x[..., self.key_slice]
        x = x.index_select(-1, self.key_cols)
        if self.kb == x.shape[-1]:
            return x
        return x.new_zeros(x.shape[:-1] + (self.kb,)).index_add_(-1, self.key_bins, x)

    def result(self, total: torch.Tensor, cols: _Columns) -> torch.Tensor:
        if self.key_mode == "pool":
            total = cols.bin_order(total)
        return total if self.scale is None else total.mul_(self.scale)


def _prepare(maps, Nk: int, rows_key, rows_fn, device: torch.device) -> tuple[_Columns, list[_MapJob], torch.Tensor]:
    """The column order and map jobs of ``maps`` (host work: sorts, searches, small copies to the
    device), cached per (plans, Nk, rows, device): attncap.ops hands the same plan objects to every
    call of a plan, so a call after the first only looks them up. ``rows_fn()`` gives the rows."""
    key = (tuple(id(x) for m in maps for x in m), Nk, rows_key, device)
    hit = _PREP_CACHE.get(key)
    if hit is not None and all(a is b for m, n in zip(hit[0], maps) for a, b in zip(m, n)):
        _PREP_CACHE[key] = _PREP_CACHE.pop(key, hit)  # most recent last; pop(key, default) never raises
        return hit[1:]
    cols = _columns(maps, Nk, device)
    rows = rows_fn()
    jobs = [_MapJob(qp, kp, table, cols, rows, device) for qp, kp, table in maps]
    _PREP_CACHE[key] = (tuple(tuple(m) for m in maps), cols, jobs, rows)  # holding the plans keeps their ids
    if len(_PREP_CACHE) > PREP_CACHE_SIZE:
        _PREP_CACHE.popitem(last=False)
    return cols, jobs, rows


def _tiles(B: int, Hk: int, G: int, rows: int, ncol: int, kv_per_head: int,
           workspace: int) -> tuple[int, int, int, bool]:
    """(bb, hb, c, whole): batches, key heads and query rows per tile, so that two tile buffers, about
    one tile of temporaries and the K/V copies (kv_per_head bytes per batch and key head) fit in
    ``workspace``, with tiles of at most TILE_BYTES. The copies of every batch and key head are made
    once (whole) when they take at most a quarter of the workspace, else per tile. A tile keeps
    MIN_ROWS rows (matmul efficiency) before it splits heads, then batches."""
    whole = B * Hk * kv_per_head <= workspace // 4
    per_tile = 0 if whole else kv_per_head

    def fits(bb: int, hb: int) -> bool:
        return bb * hb * (G * ncol * 4 * min(rows, MIN_ROWS) + per_tile) <= min(TILE_BYTES, workspace // 4)

    bb, hb = B, Hk
    while hb > 1 and not fits(bb, hb):
        hb = (hb + 1) // 2
    while bb > 1 and not fits(bb, hb):
        bb = (bb + 1) // 2
    target = max(1, min(TILE_BYTES, (workspace - (B * Hk if whole else bb * hb) * kv_per_head) // 3))
    c = max(1, min(rows, target // (bb * hb * G * ncol * 4)))
    return bb, hb, -(-rows // -(-rows // c)), whole  # as many tiles, evenly filled (no short last tile)


def _buffers(n: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` fp32 tile buffers of n elements. On the CPU they are views of one block that this
    thread keeps between calls (up to RETAIN_BYTES): glibc hands multi-MiB blocks back to the
    kernel when they are freed, so fresh ones fault their pages in again on every call, ~1 us per
    4 KiB page (measured: ~2,300 faults, a few ms, per call at sd15_cross against SDPA's 5 ms).
    Every buffer is written before it is read. Other devices' caching allocators keep blocks already."""
    if device.type != "cpu" or n * count * 4 > RETAIN_BYTES:
        return [torch.empty(n, device=device) for _ in range(count)]
    block = getattr(_RETAINED, "block", None)
    if block is None or block.numel() < n * count:
        _RETAINED.block = None  # the old block goes before the larger one comes
        with torch.inference_mode(False):  # a normal tensor: calls in and out of inference mode write it
            block = _RETAINED.block = torch.empty(n * count)
    return [block[i * n:(i + 1) * n] for i in range(count)]


def _scores(buf: torch.Tensor, q_rows: torch.Tensor, k_cols: torch.Tensor, c2: float | None, rows,
            row_tok: torch.Tensor | None, cols: _Columns, b0: int, b1: int, h0: int, h1: int, mask,
            mask_kind: int, key_padding, is_causal: bool, softcap: float | None) -> torch.Tensor:
    """Scores in log2 units, fp32 [bb, hb * G, c, Ncol] in the front of ``buf``, masked entries NEG;
    with ``softcap``, capped before the masks (softcap * tanh(score / softcap), transformers' order).

    q_rows [bb, hb * G, c, D] (any dtype and strides), k_cols [bb, hb, Ncol, D] fp32 in column order
    (_KV: views of the caller's keys where nothing changes them), c2 = scale * log2 e, by which the
    queries are multiplied (None: the keys carry it, _KV); rows: slice
    or index tensor of the tile's query tokens (row_tok their tokens on the device, for the causal mask)."""
    bb, hq, c, D = q_rows.shape
    hb, ncol = k_cols.shape[1], k_cols.shape[2]
    s = buf[:bb * hq * c * ncol].view(bb, hb, hq // hb * c, ncol)
    # GQA without copying keys per query head: query heads grouped under their key head; reshape,
    # since q_rows of a BSHD layout keep their strides through the product. With c2, the queries
    # carry the scale: c x D numbers, a small copy (baddbmm's alpha made the product ~20% slower).
    if c2 is None:
        q_rows = q_rows.float()
    else:
        q_rows = q_rows * c2 if q_rows.dtype == torch.float32 else q_rows.float().mul_(c2)
    torch.matmul(q_rows.reshape(bb, hb, hq // hb * c, D), k_cols.transpose(-1, -2), out=s)
    s = s.view(bb, hq, c, ncol)
    if softcap is not None:  # in log2 units the cap is softcap * log2 e
        cap2 = softcap * LOG2E
        s.div_(cap2).tanh_().mul_(cap2)
    if mask_kind == 0 and key_padding is None and not is_causal:
        return s

    def key_cols(m: torch.Tensor) -> torch.Tensor:
        return m if cols.token is None else m.index_select(-1, cols.token)

    if mask_kind:
        m = mask[b0:b1, h0:h1]
        m = key_cols(m[:, :, rows] if isinstance(rows, slice) else m.index_select(2, rows))
        if mask_kind == 2:
            s.add_(m, alpha=LOG2E).clamp_(min=NEG)  # -inf in an additive mask becomes NEG
        else:
            s.masked_fill_(m == 0, NEG)
    if is_causal:
        tok = torch.arange(s.shape[-1], device=s.device) if cols.token is None else cols.token
        s.masked_fill_(tok[None, :] > row_tok[:, None], NEG)
    if key_padding is not None:
        s.masked_fill_((key_cols(key_padding[b0:b1]) == 0)[:, None, None, :], NEG)
    return s


class _KV:
    """Keys and values of a tile's batches and key heads as the matmuls take them: fp32, rows in
    column order, the keys times ``key_scale`` when given (_keys_carry_scale). A view of the
    caller's tensor when that is already so, else a copy (permuted keys or values, a cast from
    fp16/bf16, scaled keys; the caller's tensors are never changed): ``whole``, of every batch and
    key head at once, when they are small (_tiles decides); else per block, kept while consecutive
    tiles share the block (_pass orders tiles so that each block is made once) and dropped when the
    next block begins."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor | None, cols: _Columns, whole: bool, key_scale: float | None):
        self.k, self.v, self.cols, self.key_scale = k, v, cols, key_scale
        self.key, self.last = None, None
        if whole:
            B, Hk = k.shape[:2]
            self.key, self.last = (0, B, 0, Hk), self._copies(0, B, 0, Hk)
        self.whole = whole

    @staticmethod
    def bytes_per_head(Nk: int, D: int, Dv: int, k_dtype: torch.dtype, v_dtype: torch.dtype, cols: _Columns,
                       keys_scaled: bool) -> int:
        """Bytes of one batch and key head's copies: keys and values each when permuted or cast, the
        keys also when they carry the scale."""
        copied = lambda dtype: cols.token is not None or dtype != torch.float32  # noqa: E731
        return (Nk * D * 4 if keys_scaled or copied(k_dtype) else 0) + (Nk * Dv * 4 if Dv and copied(v_dtype) else 0)

    def block(self, b0: int, b1: int, g0: int, g1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.whole:
            return tuple(None if x is None else x[b0:b1, g0:g1] for x in self.last)
        if self.key != (b0, b1, g0, g1):
            self.last = None  # free the previous block's copies before making the next ones
            self.last, self.key = self._copies(b0, b1, g0, g1), (b0, b1, g0, g1)
        return self.last

    def _copies(self, b0: int, b1: int, g0: int, g1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._take(self.k, b0, b1, g0, g1, self.key_scale), \
            None if self.v is None else self._take(self.v, b0, b1, g0, g1, None)

    def _take(self, x: torch.Tensor, b0: int, b1: int, g0: int, g1: int, scale: float | None) -> torch.Tensor:
        x = x[b0:b1, g0:g1]
        if self.cols.token is not None:  # 3-D index_select: several times faster than on the 4-D view
            x = x.flatten(0, 1).index_select(1, self.cols.token).unflatten(0, (b1 - b0, g1 - g0))
        if scale is None:
            return x.float()
        return x * scale if x.dtype == torch.float32 and self.cols.token is None else x.float().mul_(scale)


def _keys_carry_scale(Nk: int, rows: int, G: int) -> bool:
    """Whether the keys, not the queries, carry scale * log2 e: when a key head's keys are at most a
    quarter of its queries (cross-attention on text), one scaled copy of them per call costs less
    than scaling every tile's queries (a fresh tile-of-queries temporary each time: ~0.1x SDPA at
    sd15_cross, most of it faulting pages in)."""
    return Nk * 4 <= rows * G


def _pass(B: int, Hk: int, G: int, rows: torch.Tensor, ncol: int, kv_per_head: int, workspace: int | None,
          buffers: int):
    """(tile elements, every tile of a pass over ``rows`` (host, ascending) as (b0, b1, g0, g1, s, e),
    whether K/V copies are made whole: see _tiles). Heads vary fastest, so the products' rows of a
    block of queries stay in cache across its heads, unless K/V copies are made per block: then
    rows vary fastest and each block is copied once (per tile it cost ~0.13x SDPA at H24 N4096).
    A ``workspace`` the caller gave that cannot hold the smallest tile (one query row of one key
    head's G query heads in each of ``buffers`` tile buffers, and that key head's K/V copies) is a
    ValueError, raised before any work; the default bound is kept where it can be."""
    least = buffers * G * ncol * 4 + kv_per_head
    if workspace is not None and workspace < least:
        raise ValueError(f"workspace_bytes={workspace} is too small for this call: its smallest tile (one query row "
                         f"of {G} query head(s) over {ncol} keys, fp32, in {buffers} buffers) and one key head's "
                         f"K/V copies take {least} bytes; pass at least that, or None "
                         f"(attncap.cpu_path.WORKSPACE_BYTES, {WORKSPACE_BYTES // 2**20} MiB)")
    bb, hb, c, whole = _tiles(B, Hk, G, rows.numel(), ncol, kv_per_head,
                              WORKSPACE_BYTES if workspace is None else workspace)
    n = rows.numel()
    if whole or not kv_per_head:
        order = ((b0, s, g0) for b0 in range(0, B, bb) for s in range(0, n, c) for g0 in range(0, Hk, hb))
    else:
        order = ((b0, s, g0) for b0 in range(0, B, bb) for g0 in range(0, Hk, hb) for s in range(0, n, c))
    tiles = [(b0, min(B, b0 + bb), g0, min(Hk, g0 + hb), s, min(n, s + c)) for b0, s, g0 in order]
    return bb * hb * G * c * ncol, tiles, whole


@_device_errors
def forward(q, k, v, out, scale, mask=None, mask_kind=0, key_padding=None, is_causal=False,
            selected=None, want_stats=False, maps=(), workspace_bytes: int | None = None, softcap=None,
            want_entropy: bool | None = None):
    """Chunked twin of attncap.kernels.forward (same arguments, same returns), plus ``maps``: a list
    of (qplan, kplan, heads_table) whose maps (as kernels.map_pass returns them) come back as a
    fifth item, ``workspace_bytes`` (default WORKSPACE_BYTES), the bound on working memory, and
    ``want_entropy`` (default: want_stats): False when only the peak is wanted (entropy is then
    None), which spares two passes over each tile and keeps exp2 in place."""
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, dev = H // Hk, q.device
    masked = mask_kind != 0 or key_padding is not None or is_causal
    if dev.type == "cpu" and mask_kind == 0 and key_padding is None and selected is None and not want_stats \
            and not maps and H == Hk and Dv == D and softcap is None:
        # Nothing rides on this forward but the LSE: PyTorch's fused CPU flash kernel returns both.
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        out.copy_(o)
        return lse, None, None, None, []
    cols, jobs, rows = _prepare(maps, Nk, Nq, lambda: torch.arange(Nq), dev)
    keys_scaled = _keys_carry_scale(Nk, rows.numel(), G)
    size, tiles, whole = _pass(B, Hk, G, rows, Nk, _KV.bytes_per_head(Nk, D, Dv, k.dtype, v.dtype, cols, keys_scaled),
                               workspace_bytes, 3)
    firsts = [job.writes_first(H) for job in jobs]
    totals = [job.zeros(B, first, dev) for job, first in zip(jobs, firsts)]
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=dev)
    sel_cols = None if selected is None else cols.selection(selected)
    tokens = None if selected is None else torch.empty((B, H, Nq, selected.numel()), device=dev)
    want_entropy = want_stats if want_entropy is None else want_entropy and want_stats
    ent = torch.empty((B, H, Nq), device=dev) if want_entropy else None
    peak = torch.empty((B, H, Nq), device=dev) if want_stats else None
    # Tile buffers reused by every tile: fresh multi-MiB temporaries would fault their pages in
    # again each time. The second holds E = 2^(S - m) apart from S - m when the entropy needs both;
    # once a tile's entropy is taken (or from the start, without stats) the other is free scratch.
    # A third holds each tile's E V before it is scaled into ``out``: a fresh one per tile faulted its
    # pages in every time (~1 ms a call at sdxl_cross, a quarter of SDPA there).
    buf_s, buf_e, buf_o = _buffers(size, 3, dev)
    c2 = scale * LOG2E
    kv, c2 = _KV(k, v, cols, whole, c2 if keys_scaled else None), None if keys_scaled else c2
    for b0, b1, g0, g1, s, e in tiles:
        k_cols, v_cols = kv.block(b0, b1, g0, g1)
        h0, h1 = g0 * G, g1 * G
        row_tok = torch.arange(s, e, device=dev) if is_causal else None
        t = _scores(buf_s, q[b0:b1, h0:h1, s:e], k_cols, c2, slice(s, e), row_tok, cols, b0, b1, h0, h1,
                    mask, mask_kind, key_padding, is_causal, softcap)
        m = t.amax(-1, keepdim=True)
        t.sub_(m)
        x = torch.exp2(t, out=buf_e[:t.numel()].view(t.shape)) if want_entropy else t.exp2_()
        l = x.sum(-1, keepdim=True)
        # P = x / l is never written out: every consumer scales what it reduces by inv = 1 / l (the
        # output's c x Dv rows, a product's reduced values), one pass over the tile fewer.
        inv = l.reciprocal()
        if masked:  # a query that sees no key: every score NEG, so x = 1 everywhere; make it 0
            dead = m <= NEG / 2
            inv.masked_fill_(dead, 0.0)
        bb, hq, c = x.shape[:3]
        o = torch.matmul(x.view(bb, g1 - g0, G * c, Nk), v_cols,
                         out=buf_o[:x.numel() // Nk * Dv].view(bb, g1 - g0, G * c, Dv)) if Dv <= Nk else \
            torch.matmul(x.view(bb, g1 - g0, G * c, Nk), v_cols)  # E V larger than a tile: a fresh tensor
        o = o.view(bb, hq, c, Dv)
        torch.mul(o, inv, out=out[b0:b1, h0:h1, s:e])
        log_l = torch.log2(l)
        row_lse = (m + log_l).mul_(LN2)
        if masked:
            row_lse.masked_fill_(dead, float("-inf"))
        lse[b0:b1, h0:h1, s:e] = row_lse[..., 0]
        if want_entropy:
            # entropy = ln 2 (log2 l - inv sum_j x_j (S_j - m)), both terms >= 0 (no cancellation);
            # the product x (S - m) overwrites S - m, whose buffer is then scratch
            h = (log_l - t.mul_(x).sum(-1, keepdim=True).mul_(inv))[..., 0].mul_(LN2)
            ent[b0:b1, h0:h1, s:e] = h.masked_fill_(dead[..., 0], 0.0) if masked else h
        if want_stats:
            peak[b0:b1, h0:h1, s:e] = inv[..., 0]   # max_j x_j = 2^0 = 1
        scratch = buf_s if want_entropy else buf_e
        if tokens is not None:
            dest = tokens[b0:b1, h0:h1, s:e]
            if isinstance(sel_cols, torch.Tensor):
                torch.mul(x.index_select(-1, sel_cols), inv, out=dest)
            else:
                for first, n, at in sel_cols:
                    torch.mul(x[..., first:first + n], inv, out=dest[..., at:at + n])
        for job, total, first in zip(jobs, totals, firsts):
            job.add(total, first, x, inv, b0, b1, h0, h1, s, e, cols, scratch)
        del t, x, k_cols, v_cols
    return lse, tokens, ent, peak, [job.result(total, cols) for job, total in zip(jobs, totals)]


@_device_errors
def maps_from_lse(q, k, lse, scale, maps, mask=None, mask_kind=0, key_padding=None, is_causal=False,
                  workspace_bytes: int | None = None, softcap=None):
    """The maps of ``maps`` ((qplan, kplan, heads_table) each) from a given natural-log LSE [B, H, Nq]:
    P = exp(S - LSE) over tiles of only the queries the maps need (in log2 units: exp2)."""
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    G, dev = H // Hk, q.device
    cols, jobs, rows = _prepare(maps, Nk, "union", lambda: torch.unique(torch.cat([_host(qp.perm).long() for qp, _, _ in maps])),
                                dev)
    keys_scaled = _keys_carry_scale(Nk, rows.numel(), G)
    size, tiles, whole = _pass(B, Hk, G, rows, Nk, _KV.bytes_per_head(Nk, D, 0, k.dtype, k.dtype, cols, keys_scaled),
                               workspace_bytes, 2)
    firsts = [job.writes_first(H) for job in jobs]
    totals = [job.zeros(B, first, dev) for job, first in zip(jobs, firsts)]
    contiguous = int(rows[-1]) - int(rows[0]) + 1 == rows.numel()
    rows_dev = rows.to(dev)
    # A fully masked row has LSE = -inf and every score NEG or -inf: +inf turns its P to exp2(-inf) = 0.
    lse2 = torch.where(torch.isneginf(lse), float("inf"), lse * LOG2E)
    buf, scratch = _buffers(size, 2, dev)
    c2 = scale * LOG2E
    kv, c2 = _KV(k, None, cols, whole, c2 if keys_scaled else None), None if keys_scaled else c2
    for b0, b1, g0, g1, s, e in tiles:
        k_cols = kv.block(b0, b1, g0, g1)[0]
        h0, h1 = g0 * G, g1 * G
        if contiguous:
            r = slice(int(rows[s]), int(rows[s]) + e - s)
            q_rows, l_rows = q[b0:b1, h0:h1, r], lse2[b0:b1, h0:h1, r]
        else:
            r = rows_dev[s:e]
            q_rows, l_rows = q[b0:b1, h0:h1].index_select(2, r), lse2[b0:b1, h0:h1].index_select(2, r)
        row_tok = rows_dev[s:e] if is_causal else None
        t = _scores(buf, q_rows, k_cols, c2, r, row_tok, cols, b0, b1, h0, h1, mask, mask_kind, key_padding,
                    is_causal, softcap)
        p = t.sub_(l_rows[..., None]).exp2_()
        for job, total, first in zip(jobs, totals, firsts):
            job.add(total, first, p, None, b0, b1, h0, h1, s, e, cols, scratch)
        del t, p, k_cols
    return [job.result(total, cols) for job, total in zip(jobs, totals)]


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's own flash SDPA returning (out [B, H, Nq, D], lse float32 [B, H, Nq]), the LSE that
    attncap.maps_from_lse takes, from the op that has one on q's device (BHSD inputs, no mask).

    Forwards whose LSE maps_from_lse can use (natural log, float32 [B, H, Nq]):
      CPU   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
            scale=...) -> (out, lse): fp32, fp16, bf16; a float attn_mask must have q's dtype; a row
            that sees no key gets lse 0.0 (out 0): usable, since its scores are all masked.
            Tested here (tests/test_torch_path.py).
      CUDA  torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False,
            scale=...)[:2]: fp16, bf16 (tests/test_gpu.py). The memory-efficient and cuDNN SDPA ops
            also return a log-sum-exp when asked, in their own padded shapes: not covered here.
      other devices (MPS, ...): no torch SDPA op returns the LSE; attncap.attention computes the
            maps in its own forward instead.
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
        return out, lse
    raise ValueError(f"no PyTorch SDPA op returns the log-sum-exp on device '{q.device}'; "
                     "use attncap.attention(q, k, v, request=...), whose forward computes the maps itself")
