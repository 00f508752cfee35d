"""The providers compared by the benchmarks: each computes (out, products) for one capture task.

Shape legend: q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; out [B, H, Nq, Dv] in q's dtype;
products are float32 and follow attncap.request (G = 1 for heads="mean"):
    map [B, G, Qb, Kb], tokens [B, G, Qb, Ks], colsum [B, G, Kb], entropy [B, G, Qb], peak [B, G, Qb].
No masks: every provider gets q, k, v, the softmax scale and a MapRequest (or None).

    sdpa           torch SDPA, no capture: the floor every capture is measured against
    attncap_plain  attncap.attention without a request (output only)
    attncap_fused  attncap.attention with the request (Triton on CUDA, the chunked CPU path on CPU)
    hybrid         PyTorch's own flash SDPA returning the LSE, then attncap.maps_from_lse (the map
                   pass): maps and column sums only, token columns and entropy need attncap's forward
    chunked_eager  what capture tools do today: SDPA for the output, then softmax(QK^T * scale) in
                   fp32 eager torch over query chunks of ~256 MiB [B, H, chunk, Nk], each reduced
    naive          softmax(QK^T * scale) of the whole [B, H, Nq, Nk] in fp32, then out = P V and
                   the same reductions (transformers' eager attention with output_attentions)
    peer           attention-map-diffusers 1.0 (the peer tool): SDPA for the output, then its
                   compute_attention_probs (chunk 1024 queries, heads "mean", or "all" where a
                   product needs each head's rows: entropy, peak) over the query range, reduced
                   like chunked_eager. Installed with `pip install --no-deps attention-map-diffusers`
                   (compute_attention_probs needs only torch); rows say so where it is missing.

chunked_eager, naive and peer share the reductions (class Reductions) and none of attncap's token
planning: bins come from grid coordinates here, pooling is an index_add.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import attncap
from attncap import MapRequest
from attncap.cpu_path import sdpa_with_lse
from attncap.reference import normalize_pool

PROVIDERS = ("sdpa", "attncap_plain", "attncap_fused", "hybrid", "chunked_eager", "naive", "peer")
CAPTURE = ("attncap_fused", "hybrid", "chunked_eager", "naive", "peer")
PEER_CHUNK = 1024  # compute_attention_probs' default query chunk
EAGER_CHUNK_BYTES = 256 * 2**20


def _bins(length: int, grid, pool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each token of a segment (row-major on ``grid``) and tokens per bin, as float32."""
    factors = normalize_pool(grid, pool) if pool is not None else None
    if factors is None:
        return torch.arange(length, device=device), torch.ones(length, device=device)
    coords = torch.unravel_index(torch.arange(length, device=device), tuple(grid))
    per_axis = [-(-g // f) for g, f in zip(grid, factors)]
    bin_id = torch.zeros(length, dtype=torch.long, device=device)
    for c, f, n in zip(coords, factors, per_axis):
        bin_id = bin_id * n + c // f
    return bin_id, torch.bincount(bin_id, minlength=math.prod(per_axis)).float()


class Reductions:
    """Accumulates a request's products from normalised probability rows, chunk by chunk.

    add(p, start): p [B, H, c, Nk] float32 holds the probabilities of queries start .. start+c-1,
    all inside the request's query range. result() divides by bin counts and returns the products.
    """

    def __init__(self, req: MapRequest, B: int, H: int, Nq: int, Nk: int, device):
        self.req = req
        self.qs, self.qe = req.query_range or (0, Nq)
        self.ks, self.ke = req.key_range or (0, Nk)
        self.qbin, self.qcount = _bins(self.qe - self.qs, req.query_grid, req.query_pool, device)
        self.kbin, self.kcount = _bins(self.ke - self.ks, req.key_grid, req.key_pool, device)
        self.keys = None if req.keys is None else torch.as_tensor(list(req.keys), device=device)
        self.rows = None if req.queries is None else torch.as_tensor(list(req.queries), device=device)
        G = self._heads(torch.zeros(1, H)).shape[1]
        qb, kb = self.qcount.numel(), self.kcount.numel()
        z = dict(device=device, dtype=torch.float32)
        self.acc = {}
        if req.wants_map:
            self.acc["map"] = torch.zeros(B, G, qb, kb, **z)
        if self.keys is not None:
            self.acc["tokens"] = torch.zeros(B, G, qb, self.keys.numel(), **z)
        if self.rows is not None:
            self.acc["rows"] = torch.zeros(B, G, self.rows.numel(), kb, **z)
        for stat in req.stats:
            self.acc[stat] = torch.zeros(B, G, kb if stat == "colsum" else qb, **z)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, ...] -> [B, G, ...]"""
        h = self.req.heads
        if h == "mean":
            return x.mean(1, keepdim=True)
        return x if h == "all" else x[:, list(h)]

    def _pool_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the last axis (keys of the key range) into key bins."""
        if self.kcount.numel() == x.shape[-1]:
            return x
        return x.new_zeros(x.shape[:-1] + (self.kcount.numel(),)).index_add_(-1, self.kbin, x)

    def add(self, p: torch.Tensor, start: int) -> None:
        qbin = self.qbin[start - self.qs: start - self.qs + p.shape[2]]
        if "map" in self.acc or "colsum" in self.acc:
            block = self._heads(p[..., self.ks:self.ke])                   # [B, G, c, Lk]
            if "map" in self.acc:
                self.acc["map"].index_add_(2, qbin, self._pool_keys(block))
            if "colsum" in self.acc:
                self.acc["colsum"] += self._pool_keys(block.sum(2))
            del block
        if "tokens" in self.acc:
            self.acc["tokens"].index_add_(2, qbin, self._heads(p[..., self.keys]))
        if "rows" in self.acc:  # the selected queries that fall in this chunk
            mine = torch.nonzero((self.rows >= start) & (self.rows < start + p.shape[2]))[:, 0]
            rows = self._heads(p[:, :, self.rows[mine] - start, self.ks:self.ke])
            self.acc["rows"][:, :, mine] = self._pool_keys(rows)
        if "entropy" in self.acc:
            ent = -torch.special.xlogy(p, p).sum(-1)                       # [B, H, c], 0 log 0 = 0
            self.acc["entropy"].index_add_(2, qbin, self._heads(ent))
        if "peak" in self.acc:
            self.acc["peak"].index_add_(2, qbin, self._heads(p.amax(-1)))

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, x in self.acc.items():
            if name == "map":
                out[name] = x / (self.qcount[:, None] * self.kcount[None, :])
            elif name == "tokens":
                out[name] = x / self.qcount[:, None]
            elif name == "rows":
                out[name] = x / self.kcount
            elif name == "colsum":
                out[name] = x / self.kcount
            else:
                out[name] = x / self.qcount
        return out


def sdpa(q, k, v, scale, request=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale), {}


def attncap_plain(q, k, v, scale, request=None):
    return attncap.attention(q, k, v, scale=scale)


def attncap_fused(q, k, v, scale, request):
    return attncap.attention(q, k, v, scale=scale, request=request)


def unsupported(provider: str, request: MapRequest) -> str | None:
    """Why a provider cannot compute a request (None when it can)."""
    if provider == "hybrid" and (request.keys is not None or {"entropy", "peak"} & set(request.stats)):
        return "token columns, entropy and peak come from attncap's forward, not from an LSE"
    if provider == "peer":
        return peer_missing()
    return None


def hybrid(q, k, v, scale, request):
    """SDPA's flash kernel (aten's flash op on CUDA, its fused CPU flash on CPU) gives out and the
    natural-log LSE; attncap's map pass recomputes P from that LSE for the maps."""
    out, lse = sdpa_with_lse(q, k, v, scale=scale)
    return out, attncap.maps_from_lse(q, k, lse, scale=scale, request=request)


def chunked_eager(q, k, v, scale, request):
    """SDPA output, then fp32 softmax rows of ~EAGER_CHUNK_BYTES per chunk, reduced chunk by chunk."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    red = Reductions(request, B, H, Nq, Nk, q.device)
    step = max(1, EAGER_CHUNK_BYTES // (B * H * Nk * 4))
    kt = k.float().transpose(-1, -2)
    for start in range(red.qs, red.qe, step):
        rows = q[:, :, start:min(red.qe, start + step)].float()
        p = torch.softmax((rows @ kt) * scale, dim=-1)
        red.add(p, start)
        del p
    return out, red.result()


def peer_missing() -> str | None:
    """Why the peer cannot run here (None when attention-map-diffusers is importable)."""
    try:
        from attention_map_diffusers.capture.compute import compute_attention_probs  # noqa: F401
    except ImportError as e:
        return f"attention-map-diffusers is not installed (pip install --no-deps attention-map-diffusers): {e}"
    return None


def peer(q, k, v, scale, request):
    """attention-map-diffusers' own capture: SDPA output, then its chunked fp32 softmax over the
    query range (compute_attention_probs, heads reduced inside), then the request's reductions."""
    from attention_map_diffusers.capture.compute import compute_attention_probs

    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, H, Nq, _ = q.shape
    red = Reductions(request, B, H, Nq, k.shape[2], q.device)
    per_head = bool({"entropy", "peak"} & set(request.stats))  # need each head's rows, not their mean
    heads = "mean" if request.heads == "mean" and not per_head else "all"
    p = compute_attention_probs(q[:, :, red.qs:red.qe], k, scale=scale, chunk_size=PEER_CHUNK, heads=heads)
    red.add(p.float(), red.qs)  # it returns q's dtype; the products are float32  # Reductions' head step averages a 1-head tensor into itself
    return out, red.result()


def naive(q, k, v, scale, request):
    """Materialise P [B, H, Nq, Nk] in fp32, out = P V, then reduce the query range of P at once."""
    B, H, Nq, _ = q.shape
    p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    out = (p @ v.float()).to(q.dtype)
    red = Reductions(request, B, H, Nq, k.shape[2], q.device)
    red.add(p[:, :, red.qs:red.qe], red.qs)
    return out, red.result()


def naive_bytes(B: int, H: int, Nq: int, Nk: int) -> int:
    """Peak working memory of naive: two [B, H, Nq, Nk] float32 tensors alive at once (scores and
    P while softmax runs; P and x log x for entropy; P and its head mean when H = 1)."""
    return 2 * B * H * Nq * Nk * 4


RUN = {name: globals()[name] for name in PROVIDERS}
