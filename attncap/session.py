"""The one capture path every integration shares.

An integration (diffusers processors, the transformers attention function, the generic SDPA hook)
only says where a call's tokens come from: a CallLayout of named segments on the query and key
axes. The session turns the user's options (relations, heads, tokens, pool, stats) into
MapRequests for that layout, runs attncap.attention once for all of them, and files the products
in the store, split by classifier-free-guidance branch.

Shape legend: B batch, N tokens of a call, Qb/Kb bins after pooling.
"""
from __future__ import annotations

import fnmatch
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .coverage import Ledger
from .full import FULL, full_request, in_sequence_order
from .ops import attention
from .request import MapRequest
from .store import Record, Store

SPATIAL = ("image", "video")
# segments whose keys are not words even without a grid: tokens= selects keys of the others (text, text_2, ...)
NOT_WORDS = SPATIAL + ("image_ctx", "cond_image", "image_padding", "padding", "register", "duration", "global",
                       "history", "context", "joint", "audio", "sink", "cls", "image_newline", "image_break",
                       "image_end", "latents")


@dataclass(frozen=True)
class Segment:
    """A run of tokens start:stop named by what they are, with its (t,) h, w grid if spatial."""
    name: str
    start: int
    stop: int
    grid: tuple[int, ...] | None = None
    tag: str | None = None  # where the tokens sit inside their medium, e.g. "tile 2 of 5" (kept in Record.meta)
    offset: int = 0         # first token of this run inside its whole segment (a text split over two calls)

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class CallLayout:
    queries: tuple[Segment, ...]
    keys: tuple[Segment, ...]
    # Where an integration permuted the call's tokens into segments: row i is token order[i] of the model's
    # sequence ([N] or [B, N] long). relations="full" records are put back in sequence order (attncap.full).
    query_order: torch.Tensor | None = field(default=None, compare=False)
    key_order: torch.Tensor | None = field(default=None, compare=False)
    # (sample, batch): the call holds one sample of the denoiser's batch (Mochi's processor loops over
    # samples, each with its own valid text). Its records say which sample, and under batched CFG which branch.
    sample: tuple[int, int] | None = field(default=None, compare=False)

    def relations(self) -> list[tuple[Segment, Segment]]:
        return [(a, b) for a in self.queries for b in self.keys]


@dataclass(frozen=True)
class CaptureConfig:
    relations: str | tuple[str, ...] = "auto"
    layers: str | tuple[str, ...] = "all"
    steps: str | tuple[int, ...] = "all"
    heads: str | tuple[int, ...] = "mean"
    tokens: tuple[int | str, ...] | None = None   # key indices of the text segment, or prompt words
    pool: int | tuple[int, ...] | None = None
    stats: tuple[str, ...] = ()
    max_bytes: int = 8 * 2**30

    @staticmethod
    def build(relations="auto", layers="all", steps="all", heads="mean", tokens=None, pool=None, stats=(),
              max_bytes=8 * 2**30) -> "CaptureConfig":
        """Check the user's options once, before anything is installed (attncap.options)."""
        from . import options

        return CaptureConfig(options.check_relations(relations), options.check_layers(layers),
                             options.check_steps(steps), options.check_heads(heads), options.check_tokens(tokens),
                             options.check_pool(pool), options.check_stats(stats), options.check_max_bytes(max_bytes))

    def wants_layer(self, name: str) -> bool:
        if self.layers == "all":
            return True
        patterns = (self.layers,) if isinstance(self.layers, str) else self.layers
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)

    def wants_step(self, step: int, total: int | None) -> bool:
        """Whether to capture ``step`` of a run of ``total`` steps (None: unknown). Step indices past the
        run's end raise here, at the run's first denoiser call, instead of leaving an empty store."""
        if self.steps == "all":
            return True
        if self.steps == "last":
            return total is not None and step == total - 1
        if total is not None and self.steps[-1] >= total:
            late = [s for s in self.steps if s >= total]
            raise ValueError(f"steps={list(self.steps)}: this run has {total} denoising steps (0 to {total - 1}), "
                             f"so {late} would capture nothing; use indices below {total}, 'last' or 'all'")
        return step in self.steps

    def wants_relation(self, relation: str, default: Sequence[str]) -> bool:
        chosen = (self.relations,) if isinstance(self.relations, str) else self.relations
        return "all" in chosen or relation in chosen or ("auto" in chosen and relation in default)


def _pool_for(segment: Segment, pool) -> tuple[int, ...] | int | None:
    """The capture's pool applied to a segment with a token grid; (t, h, w) factors fold to (h, w) on images."""
    if pool is None or segment.grid is None:
        return None
    if isinstance(pool, int):
        return pool
    return tuple(pool[-len(segment.grid):]) if len(pool) >= len(segment.grid) else (1,) + tuple(pool)


@dataclass
class StepState:
    """Where the denoising loop is, as the denoiser pre-hooks see it."""
    step: int = -1
    timestep: float | None = None
    call_in_step: int = 0
    total_steps: int | None = None
    cfg_batched: bool = False   # SD/SD3: [uncond, cond] halves in one batch
    cfg_separate: bool = False  # Flux/Wan: a cond call, then an uncond call
    cfg_order: tuple[str, str] = ("uncond", "cond")  # the branches of a batched call's halves (Z-Image: cond first)
    active: bool = False        # this denoiser call is captured
    call: int = 0               # the pipeline call: a step past the last run's total_steps starts the next
    thread: threading.Thread | None = None  # the thread whose model calls this capture follows

    def advance(self, timestep: float | None) -> None:
        here = threading.current_thread()
        if self.thread is None:
            self.thread = here
        elif here is not self.thread:
            raise RuntimeError(f"a model call from thread {here.name!r} reached an attncap.capture block that follows "
                               f"thread {self.thread.name!r}: steps and branches of two threads cannot be told apart. "
                               "Run one thread's calls per block, on its own copy of the model")
        if self.step < 0 or timestep is None or timestep != self.timestep:
            if self.run_finished():
                self.call += 1
                self.step = -1
            self.step += 1
            self.call_in_step = 0
        else:
            self.call_in_step += 1
        self.timestep = timestep

    def run_finished(self) -> bool:
        """The current run has done all its steps (a further denoiser call belongs to the next pipeline call)."""
        return self.total_steps is not None and self.step + 1 >= self.total_steps

    def branch_of_call(self) -> str | None:
        if self.cfg_separate:
            return "cond" if self.call_in_step == 0 else "uncond"
        return None


@dataclass
class CaptureSession:
    config: CaptureConfig
    store: Store
    state: StepState = field(default_factory=StepState)
    backend: str = "auto"
    ledger: Ledger = field(default_factory=Ledger)
    cp_store: str = "rank0"   # under context parallelism: the store on rank 0 only, or on "all" ranks
    workspace_bytes: int | None = None  # the torch path's working-memory bound (attncap.attention's)
    _requests: dict = field(default_factory=dict, repr=False)  # requests_for's cache

    def entered(self, layer: str) -> None:
        """A selected layer runs on a captured step (its attention calls should follow)."""
        self.ledger.entered(layer)

    def note(self, layer: str, reason: str) -> None:
        """One attention call of ``layer`` is left to the model's own attention, for ``reason``."""
        self.ledger.note(layer, reason)

    def problems(self) -> list[str]:
        """What the block asked for and did not get (see attncap.coverage)."""
        return self.ledger.problems(self.config.relations, self.config.steps)

    def prompt_tokens(self, tokens: dict | None) -> None:
        """The prompt tokens of the pipeline call about to run (encode_prompt runs before its first denoiser
        call; the first prompt encoded for a call wins, so Flux's negative prompt does not replace it)."""
        st = self.state
        call = st.call + 1 if st.step >= 0 and st.run_finished() else st.call
        if tokens is not None and call not in self.store.call_tokens:
            self.store.set_call_tokens(call, tokens)

    def requests_for(self, layout: CallLayout, default_relations: Sequence[str]):
        """MapRequests for the relations of this call that the user asked for, with their segments.

        Kept per (layout, default relations) while they depend on nothing else (tokens= as prompt words
        depend on the call's prompt): a layer's calls at every step reuse the same requests, whose
        checks attncap.attention then finds done."""
        words = self.config.tokens is not None and any(isinstance(t, str) for t in self.config.tokens)
        key = None if words else (layout, tuple(default_relations))
        found = self._requests.get(key) if key is not None else None
        if found is None:
            found = self._build_requests(layout, default_relations)
            if key is not None:
                if len(self._requests) >= 512:  # layouts change with shapes: keep the cache bounded
                    self._requests.clear()
                self._requests[key] = found
        return found

    def _build_requests(self, layout: CallLayout, default_relations: Sequence[str]):
        out = []
        cfg = self.config
        for qseg, kseg in layout.relations():
            relation = f"{qseg.name}->{kseg.name}"
            if not cfg.wants_relation(relation, default_relations):
                continue
            keys = None
            # tokens index words: they select keys of grid-less segments other than image embeddings
            if cfg.tokens is not None and kseg.grid is None and kseg.name not in NOT_WORDS:
                keys = [kseg.start + t - kseg.offset for t in self.token_keys()]
                if kseg.offset or (kseg.tag or "").startswith("tokens "):  # a piece: the selected tokens inside it
                    keys = [k for k in keys if kseg.start <= k < kseg.stop] or None
                elif keys[-1] >= kseg.stop:
                    raise ValueError(f"tokens={list(cfg.tokens)} selects key index {keys[-1] - kseg.start}, but the "
                                     f"{kseg.name!r} segment of {relation} has {kseg.length} tokens (0 to "
                                     f"{kseg.length - 1}); pick indices or words inside the prompt")
            request = MapRequest(
                heads=cfg.heads if isinstance(cfg.heads, str) else list(cfg.heads),
                map=None if keys else True,
                query_range=(qseg.start, qseg.stop), key_range=(kseg.start, kseg.stop),
                query_grid=qseg.grid, key_grid=kseg.grid,
                query_pool=_pool_for(qseg, cfg.pool), key_pool=_pool_for(kseg, cfg.pool),
                keys=keys or None, stats=cfg.stats, max_bytes=cfg.max_bytes,
            )
            out.append((relation, qseg, kseg, request))
        if FULL in ((cfg.relations,) if isinstance(cfg.relations, str) else cfg.relations):
            nq, nk = max(seg.stop for seg in layout.queries), max(seg.stop for seg in layout.keys)
            request = full_request(nq, nk, cfg.heads if isinstance(cfg.heads, str) else list(cfg.heads), cfg.stats,
                                   cfg.max_bytes)
            out.append((FULL, Segment(FULL, 0, nq), Segment(FULL, 0, nk), request))
        return out

    def token_keys(self) -> list[int]:
        """The text key indices of config.tokens: words are looked up in the prompt's tokens, which the
        diffusers integration reads from the pipeline's encode_prompt (the first prompt of a batch)."""
        words = [t for t in self.config.tokens if isinstance(t, str)]
        if not words:
            return list(self.config.tokens)
        tokens = self.store.tokens_of(self.state.call)
        if tokens is None:
            raise ValueError(f"tokens={words} names prompt words, but this capture knows no prompt tokens (prompt "
                             "embeddings passed directly, or a model without a tokenizer): pass key indices, or set "
                             "store.tokens = attncap.prompts.align(tokenizer, prompt).to_tokens() inside the block")
        from .prompts import Alignment

        alignment = Alignment.from_tokens(tokens)
        keys = [k for t in self.config.tokens for k in ([t] if isinstance(t, int) else alignment.indices(t))]
        return sorted(set(keys))

    def capture_call(self, layer: str, layout: CallLayout, default_relations: Sequence[str], q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, attn_mask=None, is_causal: bool = False,
                     scale: float | None = None, layout_name: str = "bhsd",
                     softcap: float | None = None) -> torch.Tensor | None:
        """Run one attention call through attncap and file its products; None leaves it to the model.

        q, k, v as attncap.attention takes them in ``layout_name`` ("bhsd" as SDPA, "bshd" as diffusers'
        dispatcher), softcap as it takes it; the output comes back in the same layout."""
        self.ledger.reached(layer, [f"{a.name}->{b.name}" for a, b in layout.relations()] + [FULL])
        wanted = self.requests_for(layout, default_relations)
        if not wanted:
            return None
        heads = q.shape[1 if layout_name == "bhsd" else 2]
        if not isinstance(self.config.heads, str) and max(self.config.heads) >= heads:
            raise ValueError(f"heads={list(self.config.heads)} but layer {layer!r} has {heads} heads (0 to {heads - 1}); "
                             "pick head indices below that, 'mean' or 'all', or layers with more heads")
        out, products = attention(q, k, v, scale=scale, attn_mask=attn_mask, is_causal=is_causal,
                                  request=[w[3] for w in wanted], backend=self.backend, layout=layout_name,
                                  softcap=softcap, workspace_bytes=self.workspace_bytes)
        self._file_call(layer, layout, wanted, products)
        return out

    @torch.compiler.disable
    def _file_call(self, layer: str, layout: CallLayout, wanted, products) -> None:
        """File one call's products. Never traced by torch.compile (the store reads sizes and moves data
        on the host): where capture_call runs inside a compiled graph, filing is one graph break after it."""
        for (relation, qseg, kseg, request), prods in zip(wanted, products):
            for kind, data in prods.items():
                if relation == FULL:
                    data = in_sequence_order(kind, data, layout.query_order, layout.key_order)
                self._file(layer, relation, kind, data, request, qseg, kseg, layout.sample)

    def _file(self, layer, relation, kind, data, request: MapRequest, qseg: Segment, kseg: Segment,
              sample: tuple[int, int] | None = None) -> None:
        from .layouts import normalize_pool, pooled_grid

        def grid_of(seg: Segment, pool):
            if seg.grid is None:
                return None
            factors = normalize_pool(seg.grid, pool, "pool")
            return seg.grid if factors is None else pooled_grid(seg.grid, factors)

        meta = {"query_segment": [qseg.start, qseg.stop], "key_segment": [kseg.start, kseg.stop]}
        meta.update({f"{axis}_tag": seg.tag for axis, seg in (("query", qseg), ("key", kseg)) if seg.tag})
        if request.keys is not None:
            meta["keys"] = [k - kseg.start for k in request.keys]
        heads = self.config.heads if isinstance(self.config.heads, str) else tuple(self.config.heads)
        common = dict(layer=layer, step=self.state.step, timestep=self.state.timestep, relation=relation, kind=kind,
                      query_grid=grid_of(qseg, request.query_pool), key_grid=grid_of(kseg, request.key_pool),
                      heads=heads, meta=meta, call=self.state.call)
        if sample is not None:
            index, batch = sample
            branch = self.state.branch_of_call()
            if self.state.cfg_batched and batch % 2 == 0:   # [first-branch samples, second-branch samples]
                first, second = self.state.cfg_order
                branch, index = (first, index) if index < batch // 2 else (second, index - batch // 2)
            meta["sample"] = index
            self.store.add(Record(branch=branch, data=data, **common))
        elif self.state.cfg_batched and data.shape[0] % 2 == 0:
            half = data.shape[0] // 2
            first, second = self.state.cfg_order
            self.store.add(Record(branch=first, data=data[:half], **common))
            self.store.add(Record(branch=second, data=data[half:], **common))
        else:
            self.store.add(Record(branch=self.state.branch_of_call(), data=data, **common))
        self.ledger.filed(layer)

    def estimate_bytes(self, layouts: Sequence[tuple[CallLayout, Sequence[str]]], batch: int, heads: int) -> int:
        """Bytes one denoiser call would file for these layer layouts (products only)."""
        from .validate import Shapes, check_request, product_shapes

        total = 0
        for layout, default in layouts:
            nq = max(s.stop for s in layout.queries)
            nk = max(s.stop for s in layout.keys)
            shapes = Shapes(batch, heads, heads, nq, nk, 1, 1)
            for _, _, _, request in self.requests_for(layout, default):
                plan = check_request(MapRequest(**{**request.__dict__, "max_bytes": 2**62}), shapes)
                # The per-head one-pass workspace is transient: count what is kept.
                total += sum(math.prod(shape) * 4 for shape in product_shapes(plan, batch).values())
        return total
