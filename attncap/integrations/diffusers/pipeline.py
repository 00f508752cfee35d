"""Install capture on a diffusers pipeline or model, and take it off again.

Finds the denoisers (unet, transformer, transformer_2 of Wan 2.2), wraps the processors of the
selected attention layers, and puts a forward pre-hook on each denoiser that tracks the step,
timestep and guidance branch, and checks the byte budget before the first step runs.
"""
from __future__ import annotations

from typing import Any

import torch

from ...session import CaptureSession
from .families import FAMILIES, Family, family_for
from .processor import make_capture_processor

DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")


def is_diffusers_target(target: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline, ModelMixin
    except ImportError:
        return False
    return isinstance(target, (DiffusionPipeline, ModelMixin))


def _denoisers(target: Any) -> list[tuple[str, torch.nn.Module]]:
    components = getattr(target, "components", None)
    if isinstance(components, dict):
        found = [(n, components[n]) for n in DENOISER_COMPONENTS if components.get(n) is not None]
        if not found:
            raise ValueError(f"{type(target).__name__} has no denoiser among {DENOISER_COMPONENTS}; "
                             f"its components are {sorted(components)}")
        return found
    return [("unet" if "UNet" in type(target).__name__ else "transformer", target)]


def _attention_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            yield name, module


class DiffusersCapture:
    """Processors and hooks installed on one pipeline or model; restore() undoes all of it."""

    def __init__(self, target: Any, session: CaptureSession):
        self.target = target
        self.session = session
        self.pipeline = target if isinstance(getattr(target, "components", None), dict) else None
        self._swapped: list[tuple[torch.nn.Module, Any]] = []
        self._hooks: list[Any] = []
        self._layers: list[tuple[str, Family, torch.nn.Module]] = []
        self._checked = False

    def install(self) -> None:
        config = self.session.config
        seen: list[str] = []
        try:
            for component, model in _denoisers(self.target):
                family = family_for(model)
                if family is None:
                    supported = sorted(d for f in FAMILIES for d in f.denoisers)
                    raise ValueError(f"attncap has no adapter for {type(model).__name__} ({component}); "
                                     f"supported denoisers: {supported}. attncap.capture(module) on the model "
                                     "itself captures any SDPA call generically")
                states: dict = {}
                for name, attn in _attention_modules(model):
                    layer = f"{component}.{name}"
                    seen.append(layer)
                    if config.wants_layer(layer) and family.handles(attn.processor):
                        self._wrap(layer, family, attn, states)
                self._hooks.append(model.register_forward_pre_hook(self._pre_hook(family, states), with_kwargs=True))
            if not self._swapped:
                sample = ", ".join(seen[:6]) + (", ..." if len(seen) > 6 else "")
                raise ValueError(f"layers={config.layers!r} selects no attention layer this adapter captures; "
                                 f"layer names look like: {sample}")
        except Exception:
            self.restore()
            raise

    def _wrap(self, layer: str, family: Family, attn: torch.nn.Module, states: dict) -> None:
        def layout_fn(call: int, nq: int, nk: int):
            return family.layout(attn, layer, states["state"], call, nq, nk)

        self._swapped.append((attn, attn.processor))
        self._layers.append((layer, family, attn))
        attn.processor = make_capture_processor(attn.processor, layer, self.session, layout_fn,
                                                family.default_relations)

    def _pre_hook(self, family: Family, states: dict):
        def hook(model, args, kwargs):
            states["state"] = family.observe(model, args, kwargs)
            st = self.session.state
            st.advance(family.timestep(args, kwargs))
            scheduler = getattr(self.pipeline, "scheduler", None)
            timesteps = getattr(scheduler, "timesteps", None)
            st.total_steps = len(timesteps) if timesteps is not None else None
            do_cfg = bool(getattr(self.pipeline, "do_classifier_free_guidance", False))
            st.cfg_separate = family.separate_cfg_calls
            st.cfg_batched = do_cfg and not family.separate_cfg_calls
            st.active = self.session.config.wants_step(st.step, st.total_steps)
            if not self._checked:
                self._checked = True
                self._check_budget(family, states["state"], model, args, kwargs)
            return None

        return hook

    def _check_budget(self, family: Family, state: dict, model, args, kwargs) -> None:
        """Refuse, before the first step runs, a capture whose products would pass max_bytes."""
        config = self.session.config
        first = _first_tensor(args, kwargs)
        batch = first.shape[0] if first is not None else 1
        layouts = []
        heads = 1
        for layer, fam, attn in self._layers:
            if fam is not family:
                continue
            heads = max(heads, getattr(attn, "heads", 1))
            for call, (nq, nk) in enumerate(family.token_counts(attn, layer, state)):
                layouts.append((family.layout(attn, layer, state, call, nq, nk), family.default_relations))
        per_call = self.session.estimate_bytes(layouts, batch, heads)
        total_steps = self.session.state.total_steps
        if config.steps == "all":
            steps = total_steps or 1
        elif config.steps == "last":
            steps = 1
        else:
            steps = len(config.steps)
        calls = steps * (2 if family.separate_cfg_calls and getattr(self.pipeline, "do_classifier_free_guidance", False) else 1)
        total = per_call * calls
        if total > config.max_bytes:
            gib = 2**30
            raise ValueError(
                f"capture would store about {total / gib:.2f} GiB ({per_call / gib:.3f} GiB per denoiser call x {calls} "
                f"calls over {len(layouts)} attention calls per step) but max_bytes is {config.max_bytes / gib:.2f} GiB. "
                f"Fits better: pool=4 or 8 on image/video grids, heads='mean', tokens=[...] (token maps), fewer "
                f"layers (e.g. '*attn2*'), steps='last' or a few step indices, or a larger max_bytes with spill_dir=")

    def restore(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for attn, original in reversed(self._swapped):
            attn.processor = original
        self._hooks.clear()
        self._swapped.clear()
        self._layers.clear()


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x
    return None
