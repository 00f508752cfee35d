"""attncap.capture: one context manager around an unchanged pipeline, model or module call."""
from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from . import claims, options
from .compiled import CompiledCaches
from .session import CaptureConfig, CaptureSession
from .store import Store


def capture(target: Any, relations: str | Sequence[str] = "auto", layers: str | Sequence[str] = "all",
            steps: str | int | Sequence[int] = "all", heads: str | Sequence[int] = "mean",
            tokens: int | str | Sequence[int | str] | None = None, pool: int | Sequence[int] | None = None,
            stats: Sequence[str] = (), offload: str | None = "cpu", max_bytes: int = 8 * 2**30,
            spill_dir: str | Path | None = None, backend: str = "auto", layout: Any = None,
            strict: bool = True, cp_store: str = "rank0", workspace_bytes: int | None = None) -> "Capture":
    """Capture attention maps from every call of ``target`` inside the block.

    target:    a diffusers pipeline or denoiser model (SD/SDXL UNets, SD3, Flux, Wan 2.1/2.2), a transformers
               PreTrainedModel (text models, Qwen2-VL / Qwen2.5-VL, LLaVA-style VLMs), or any torch.nn.Module
               that calls scaled_dot_product_attention (captured generically; layers are module paths and
               each call of its forward is one step).
    relations: "A->B" segment pairs such as "image->text", "image->image", "video->text", a list of
               them, "all", or "auto" (the family's text cross-attention: image->text / video->text);
               "full" adds one record per call over all its query and key tokens in sequence order.
    layers:    "all", a glob such as "*attn2*", or a list of layer names ("unet.down_blocks.1...").
    steps:     "all", "last", or step indices (denoising steps from 0).
    heads:     "mean", "all" or a list of head indices.   pool: int or (t, h, w) on image/video grids.
    tokens:    text keys to keep as token maps (one pass, exact): key indices, or prompt words such as
               ["cat", "sofa"] (all their sub-word tokens), found in the prompt the pipeline encodes.
    stats:     a name or a list of: "entropy", "peak", "colsum".   offload: "cpu" moves maps off the GPU at
               once, None keeps them where they were computed.
    max_bytes: the capture is refused before the first step if its products would pass this.
    spill_dir: write every record to disk as soon as it exists (an interrupted run keeps them).
    layout:    the token layout of a plain module's (or a transformers model's) attention calls:
               [("part0", 64, (4, 4, 4)), ("text", 16, None)] (name, length, grid) runs, a dict
               {"queries": [...], "keys": [...]}, or a callable (layer, q, k) -> CallLayout | None; None is
               one "tokens" segment (transformers: the model's own text/image layout). A diffusers model
               given a layout, or one no family adapter knows, is captured generically.
    strict:    at the end of the block, what was asked for and not captured (a selected layer that ran and
               left no record, with the reason; a relation or step no call offered) raises
               CaptureIncomplete; strict=False turns that into a warning. The store keeps what was captured.
    cp_store:  under context parallelism (diffusers' enable_parallelism: Ulysses, ring, both) every rank
               runs the same block and the products are reduced over the CP group: "rank0" files them on
               rank 0 only (the other ranks' stores stay empty), "all" on every rank.
    workspace_bytes: on the torch path (CPU, MPS, backend="torch"), each captured call's bound on working
               memory beyond the model's tensors and the products (None: 64 MiB); see attncap.attention.
    Every option is checked here, before anything is installed (attncap.options); what needs the model
    (segments, step count, text length, heads) is checked at the first denoiser call, before it runs.
    Returns a context manager that yields the Store; every processor and hook is restored on exit, also
    after an exception. It is entered once; blocks on one model do not nest or run in two threads at once.
    """
    config = CaptureConfig.build(relations, layers, steps, heads, tokens, pool, stats, max_bytes)
    store_args = dict(offload=options.check_offload(offload), max_bytes=config.max_bytes,
                      spill_dir=options.check_spill_dir(spill_dir))
    from .integrations.generic import check_layout

    caller = sys._getframe(1)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False; got {strict!r}")
    if cp_store not in ("rank0", "all"):
        raise ValueError(f"cp_store must be 'rank0' (the store on rank 0) or 'all' (on every rank); got {cp_store!r}")
    return Capture(target, config, store_args, options.check_backend(backend), check_layout(layout),
                   f"{caller.f_code.co_filename}:{caller.f_lineno}", strict, cp_store,
                   options.check_workspace_bytes(workspace_bytes))


class CaptureIncomplete(ValueError):
    """A capture block ended without some of what it asked for (the store keeps what it did capture)."""


class Capture:
    """One capture block (made by attncap.capture): claims the target's modules, installs, restores."""

    def __init__(self, target: Any, config: CaptureConfig, store_args: dict, backend: str, layout: Any, where: str,
                 strict: bool = True, cp_store: str = "rank0", workspace_bytes: int | None = None):
        self.target, self.config, self.store_args = target, config, store_args
        self.workspace_bytes = workspace_bytes
        self.backend, self.layout, self.where, self.strict, self.cp_store = backend, layout, where, strict, cp_store
        self._session: CaptureSession | None = None
        self._state = "new"  # -> "open" -> "closed"
        self._claim: claims.Claim | None = None
        self._installed = None
        self._store: Store | None = None

    def __enter__(self) -> Store:
        if self._state != "new":
            raise RuntimeError(f"this attncap.capture(...) object (made at {self.where}) was already entered"
                               f"{' and is still open' if self._state == 'open' else ''}; call attncap.capture(...) "
                               "again for each block")
        self._state = "open"
        self._claim = claims.claim(self.target, self.where)
        self._compiled = CompiledCaches(self.target)
        try:
            store = self._store = Store(**self.store_args)
            session = self._session = CaptureSession(self.config, store, backend=self.backend, cp_store=self.cp_store,
                                                     workspace_bytes=self.workspace_bytes)
            self._installed = _integration_for(self.target, session, self.layout)
            self._installed.install()
            from .integrations.generic import GenericCapture

            if isinstance(self._installed, GenericCapture):
                # its SDPA interception (a TorchFunctionMode) sees only the calls of the thread that entered
                session.state.thread = threading.current_thread()
        except BaseException:
            self._close()
            raise
        return store

    def __exit__(self, exc_type, *exc) -> None:
        self._close()
        problems = self._session.problems() if exc_type is None and self._session is not None else []
        if problems:
            message = ("attncap.capture did not capture everything it was asked for (the store keeps the "
                       f"{len(self._session.store.records)} records it did capture):\n- " + "\n- ".join(problems))
            if self.strict:
                raise CaptureIncomplete(message + "\n(strict=False makes this a warning)")
            warnings.warn(message, stacklevel=2)

    def _close(self) -> None:
        installed, store, held = self._installed, self._store, self._claim
        self._installed, self._store, self._claim, self._state = None, None, None, "closed"
        try:
            if installed is not None:
                installed.restore()
                self._compiled.drop_changed()  # a compiled model runs whole again after the block
        finally:
            try:
                if store is not None:
                    store.close()  # a spilling store folds its log into index.json
            finally:
                if held is not None:
                    claims.release(held)


def _integration_for(target: Any, session: CaptureSession, layout: Any = None):
    from .integrations.diffusers.pipeline import DiffusersCapture, is_diffusers_target
    from .integrations.generic import GenericCapture, check_layout
    from .integrations.transformers import TransformersCapture, is_transformers_model

    layout = check_layout(layout)
    # Nothing is a diffusers object while diffusers is not imported (and importing it takes seconds).
    if "diffusers" in sys.modules and is_diffusers_target(target):
        if layout is None:
            from .integrations.diffusers.families import family_for

            pipeline = isinstance(getattr(target, "components", None), dict)
            if pipeline or family_for(target) is not None:
                return DiffusersCapture(target, session)
        if isinstance(target, torch.nn.Module):  # given a layout, or a denoiser no family adapter knows
            return GenericCapture(target, session, layout)
        raise ValueError(f"layout= applies to a module's SDPA calls; pass the {type(target).__name__}'s denoiser "
                         "(e.g. pipe.transformer) to capture it generically, or drop layout= for the diffusers "
                         "adapters")
    if is_transformers_model(target):
        return TransformersCapture(target, session, layout)
    if isinstance(target, torch.nn.Module):
        return GenericCapture(target, session, layout)
    raise TypeError(f"attncap.capture does not know how to capture a {type(target).__name__}: pass a diffusers "
                    "pipeline or model, a transformers model, or any torch.nn.Module that calls "
                    "scaled_dot_product_attention")
