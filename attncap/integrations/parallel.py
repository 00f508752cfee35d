"""Exact capture under context parallelism (diffusers' Ulysses, ring and unified CP).

Under CP every rank holds a 1/W chunk of each sharded token segment (diffusers' equipartition
split over the flattened ring x ulysses mesh; rank f holds tokens f*L/W:(f+1)*L/W of a segment of
L tokens) and a processor concatenates its local chunks as it would the whole segments. A
captured call is computed by attncap on this rank:
- a CP call (the dispatcher got a parallel config): Ulysses all-to-all of q, k, v over the ulysses
  group when the heads divide by its degree (each rank then holds the ulysses group's tokens and
  H/U heads), then an all-gather of k and v over the ring group, as diffusers' own ring does; with
  heads that do not divide, k and v are all-gathered over the whole group instead (all heads).
  Keys are then complete and put back in global order, so key segments, grids and pools are those
  of one GPU; the output is attncap's exact attention, returned in the rank's own layout.
- a call the processor keeps local under CP (Wan's cross-attention: sharded video queries, whole
  text keys): no communication for the attention.
Either way the rank's queries are a subset of the global ones, so every product is computed per
local query against the GLOBAL layout: the global LSE (all keys are present), head means over the
global head count, queries scattered into their global pooled bins and divided by the global bin
counts. The partials of the ranks sum to the single-GPU products: one reduce per captured call
over the CP group, sized to the products (never q or k), and the store on the destination rank
files it (rank 0 by default; every rank with cp_store="all").

Shape legend: B batch, n local tokens, N global tokens, H heads (Hg of this rank's head group),
D head dim, Qb/Kb pooled bins, W ranks in the CP group.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..ops import attention
from ..session import CallLayout, CaptureSession, Segment


@dataclass(frozen=True)
class CPMesh:
    """What a captured call needs to know of the CP group of this rank."""
    world: int
    rank: int                       # rank in the flattened ring x ulysses mesh
    ring: int
    ulysses: int
    ring_rank: int
    ulysses_rank: int
    group: Any                      # the flattened group (the reduce runs over it)
    ring_group: Any
    ulysses_group: Any

    @property
    def ulysses_members(self) -> list[int]:
        """Flattened ranks of this rank's ulysses group, in all-to-all order."""
        return [self.ring_rank * self.ulysses + u for u in range(self.ulysses)]


def cp_mesh(parallel_config: Any) -> CPMesh | None:
    """The CP group of a diffusers ParallelConfig (None: no context parallelism on this call)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_flattened_mesh", None) is None:
        return None
    world = cp.ring_degree * cp.ulysses_degree
    if world <= 1:
        return None
    return CPMesh(world, cp._flattened_mesh.get_local_rank(), cp.ring_degree, cp.ulysses_degree,
                  cp._ring_local_rank, cp._ulysses_local_rank, cp._flattened_mesh.get_group(),
                  cp._ring_mesh.get_group(), cp._ulysses_mesh.get_group())


def local_positions(segments: Sequence[Segment], world: int, rank: int, split: bool) -> torch.Tensor | None:
    """Global index of each local token of ``rank``: its chunk of every segment, in segment order."""
    if not split:
        return torch.arange(segments[-1].stop)
    if any(s.length % world for s in segments):
        return None
    return torch.cat([torch.arange(s.start + rank * (s.length // world), s.start + (rank + 1) * (s.length // world))
                      for s in segments])


def _bins(segment: Segment, pool, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(bin of each global position in ``segment``, tokens per bin, bins) on its pooled query axis: the
    bins of attncap's own axis plan, so a rank's partial lands where the one-GPU product has it."""
    from ..layouts import normalize_pool, plan_range

    offsets = positions - segment.start
    factors = normalize_pool(segment.grid, pool, "pool") if segment.grid is not None else None
    plan = plan_range(segment.start, segment.stop, segment.grid, factors)
    bin_of_token = torch.empty(segment.length, dtype=torch.long)
    bin_of_token[plan.perm.long() - segment.start] = plan.bin_of_slot.long()
    return bin_of_token[offsets], plan.counts, plan.nbins


def _gather_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather [B, n, H, D] along tokens: the members' chunks in group-rank order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _ulysses_scatter_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, n, H, D] -> [B, U*n, H/U, D]: every member's tokens for this rank's head group."""
    b, n, h, d = x.shape
    chunks = x.reshape(b, n, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, B, n, Hg, D]
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return out.permute(1, 0, 2, 3, 4).reshape(b, world * n, h // world, d)


def _ulysses_gather_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """The inverse: [B, U*n, H/U, D] -> [B, n, H, D]."""
    b, un, hg, d = x.shape
    n = un // world
    chunks = x.reshape(b, world, n, hg, d).permute(1, 0, 2, 3, 4).contiguous()  # [U, B, n, Hg, D]
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return out.permute(1, 2, 0, 3, 4).reshape(b, n, world * hg, d)


@dataclass
class ShardedCall:
    """One captured attention call of a CP rank (see the module docstring)."""
    session: CaptureSession
    layer: str
    layout: CallLayout            # the GLOBAL layout of the call
    default_relations: Sequence[str]
    mesh: CPMesh
    cp_call: bool                 # the dispatcher got the parallel config (q and k sharded)
    q_split: bool
    k_split: bool
    store_on: str = "rank0"       # "rank0" or "all"

    def run(self, q, k, v, scale, attn_mask=None) -> torch.Tensor | None:
        """q, k, v [B, n, H, D] as the dispatcher passes them; returns the output in the same layout."""
        m, session = self.mesh, self.session
        if attn_mask is not None and not bool(torch.as_tensor(attn_mask).all()):
            session.note(self.layer, "a masked attention call under context parallelism (not captured yet)")
            return None
        heads = q.shape[2]
        head0, hg = 0, heads
        q_ranks, k_ranks = [m.rank], [m.rank]
        ulysses = self.cp_call and m.ulysses > 1 and heads % m.ulysses == 0
        if ulysses:
            q, k, v = (_ulysses_scatter_heads(x, m.ulysses_group, m.ulysses) for x in (q, k, v))
            q_ranks = k_ranks = m.ulysses_members
            hg, head0 = heads // m.ulysses, m.ulysses_rank * (heads // m.ulysses)
        if self.cp_call and (m.ring > 1 or not ulysses):
            by_ring = ulysses or m.ulysses == 1
            group, size = (m.ring_group, m.ring) if by_ring else (m.group, m.world)
            k, v = _gather_seq(k, group, size), _gather_seq(v, group, size)
            k_ranks = ([j * m.ulysses + u for j in range(m.ring) for u in range(m.ulysses)] if by_ring
                       else list(range(m.world)))
        q_index = self._positions(self.layout.queries, q_ranks, self.q_split)
        k_index = self._positions(self.layout.keys, k_ranks, self.k_split and self.cp_call)
        if q_index is None or k_index is None:
            session.note(self.layer, f"token segments that do not split evenly over {m.world} ranks")
            return None
        if not torch.equal(torch.sort(k_index).values, torch.arange(k.shape[1])):
            session.note(self.layer, "keys that are not complete on each rank after the gathers")
            return None
        q_order = torch.argsort(q_index)
        k_order = torch.argsort(k_index)
        q_sorted, q_pos = q[:, q_order], q_index[q_order]
        k_sorted, v_sorted = k[:, k_order], v[:, k_order]
        out_sorted = self._capture(q_sorted, q_pos, k_sorted, v_sorted, scale, heads, head0, hg)
        out = torch.empty_like(out_sorted)
        out[:, q_order] = out_sorted
        return _ulysses_gather_heads(out, m.ulysses_group, m.ulysses) if ulysses else out

    def _positions(self, segments, ranks, split) -> torch.Tensor | None:
        parts = [local_positions(segments, self.mesh.world, r, split) for r in ranks] if split else \
            [local_positions(segments, self.mesh.world, 0, False)]
        return None if any(p is None for p in parts) else torch.cat(parts)

    def _capture(self, q, q_pos, k, v, scale, heads, head0, hg) -> torch.Tensor:
        session, m = self.session, self.mesh
        session.ledger.reached(self.layer, [f"{a.name}->{b.name}" for a, b in self.layout.relations()])
        wanted = session.requests_for(self.layout, self.default_relations)
        local, jobs = [], []
        for relation, qseg, kseg, request in wanted:
            inside = ((q_pos >= qseg.start) & (q_pos < qseg.stop)).nonzero().flatten()
            a, b = int(inside[0]), int(inside[-1]) + 1   # equal shards: every rank holds some of each segment
            local_heads, placed, weight = _local_heads(request.heads, head0, hg, heads)
            local.append(replace(request, heads=local_heads, query_range=(a, b), query_grid=None, query_pool=None,
                                 max_bytes=2**62))
            jobs.append((relation, qseg, kseg, request, q_pos[a:b], placed, weight))
        out, products = attention(q, k, v, scale=scale, request=local or None, layout="bshd",
                                  backend=session.backend, workspace_bytes=session.workspace_bytes)
        for (relation, qseg, kseg, request, positions, placed, weight), prods in zip(jobs, products if local else []):
            kept = 1 if request.heads == "mean" else heads if request.heads == "all" else len(request.heads)
            bins, counts, nbins = _bins(qseg, request.query_pool, positions)
            for kind, data in prods.items():
                data = self._reduce(_globalize(kind, data.float() * weight, placed, kept, bins.to(data.device),
                                               counts.to(data.device), nbins))
                if self.store_on == "all" or m.rank == 0:
                    session._file(self.layer, relation, kind, data, request, qseg, kseg)
                else:
                    session.ledger.filed(self.layer)
        return out

    def _reduce(self, data: torch.Tensor) -> torch.Tensor:
        m = self.mesh
        if not self.q_split and not (self.cp_call and m.ulysses > 1):
            return data  # every rank computed the same whole products
        if self.store_on == "all":
            dist.all_reduce(data, group=m.group)
        else:
            dist.reduce(data, dst=dist.get_global_rank(m.group, 0), group=m.group)
        return data


def _globalize(kind: str, data: torch.Tensor, placed, kept: int, bins: torch.Tensor, counts: torch.Tensor,
               nbins: int) -> torch.Tensor:
    """One local product [B, g, q, ...] (colsum [B, g, Kb]) as this rank's share of the global one
    [B, kept, Qb, ...]: heads put where they belong, queries added into their pooled bins / counts."""
    if kind == "colsum":
        full = data.new_zeros((data.shape[0], kept, *data.shape[2:]))
        full[:, placed] += data
        return full
    full = data.new_zeros((data.shape[0], kept, nbins, *data.shape[3:]))
    scaled = data / counts[bins].view(1, 1, -1, *([1] * (data.dim() - 3)))
    full[:, placed] = full[:, placed].index_add(2, bins, scaled)
    return full


def _local_heads(heads, head0: int, hg: int, total: int):
    """(the local request's heads, where its heads go among the kept ones, weight of its products).

    A head mean over this rank's hg heads weighs hg / H of the global mean; a head list keeps the
    listed heads this rank holds (none: head 0 with weight 0, so the rank still joins the reduce)."""
    if heads == "mean":
        return "mean", slice(None), hg / total
    if heads == "all":
        return "all", slice(head0, head0 + hg), 1.0
    mine = [i for i, h in enumerate(heads) if head0 <= h < head0 + hg]
    if not mine:
        return [0], [], 0.0
    return [heads[i] - head0 for i in mine], mine, 1.0
