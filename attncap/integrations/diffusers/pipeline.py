"""Install capture on a diffusers pipeline or model, and take it off again.

Finds the denoisers (unet, transformer, transformer_2 of Wan 2.2), wraps the processors of the
selected attention layers, and puts a forward pre-hook on each denoiser that tracks the step,
timestep and guidance branch, and checks the byte budget before the first step runs.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from ...session import CaptureSession
from .dispatch import dispatcher_routed
from .families import Family, family_for, supported_denoisers
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
        # torch.compile(model) wraps it in an OptimizedModule: processors and hooks go on the model inside
        found = [(n, getattr(components[n], "_orig_mod", components[n])) for n in DENOISER_COMPONENTS
                 if components.get(n) is not None]
        if not found:
            raise ValueError(f"{type(target).__name__} has no denoiser among {DENOISER_COMPONENTS}; "
                             f"its components are {sorted(components)}")
        return found
    return [("unet" if "UNet" in type(target).__name__ else "transformer", target)]


def _attention_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        # MochiAttention has a processor but no set_processor (processors are swapped by assignment anyway)
        if hasattr(module, "processor") and (hasattr(module, "set_processor") or callable(module.processor)):
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
        self._first_step = 0
        self._prompt_hooked = False
        self._encoded_cfg: bool | None = None   # encode_prompt's do_classifier_free_guidance argument
        self._routing = None

    def install(self) -> None:
        config = self.session.config
        seen: list[str] = []
        refused: list[str] = []
        try:
            denoisers = [(c, m, family_for(m)) for c, m in _denoisers(self.target)]
            for component, model, family in denoisers:
                if family is None:
                    raise ValueError(f"attncap has no adapter for {type(model).__name__} ({component}); "
                                     f"supported denoisers: {supported_denoisers()}. attncap.capture(module) on "
                                     "the model itself captures any SDPA call generically")
            check_relations(config.relations, [f for _, _, f in denoisers])
            for component, model, family in denoisers:
                states: dict = {}
                for name, attn in _attention_modules(model):
                    layer = f"{component}.{name}"
                    seen.append(layer)
                    if not config.wants_layer(layer):
                        continue
                    _refuse_xdit(layer, attn.processor)
                    why = family.unsupported(layer)
                    if why is None:
                        self._wrap(layer, family, attn, states)
                    elif config.layers != "all":
                        refused.append(f"{layer}: {why}")
                self._hooks.append(model.register_forward_pre_hook(self._pre_hook(family, states), with_kwargs=True))
            if refused and not self._swapped:
                raise ValueError("layers= selects only attention that attncap cannot capture: " + "; ".join(refused))
            if self.pipeline is not None:
                self._hook_prompts()
            if not self._swapped:
                sample = ", ".join(seen[:6]) + (", ..." if len(seen) > 6 else "")
                raise ValueError(f"layers={config.layers!r} selects no attention layer of this model; "
                                 f"layer names look like: {sample}")
            self._routing = dispatcher_routed()
            self._routing.__enter__()
        except Exception:
            self.restore()
            raise

    def _wrap(self, layer: str, family: Family, attn: torch.nn.Module, states: dict) -> None:
        def layout_fn(call: int, nq: int, nk: int):
            return family.layout(layer, states["state"], call, nq, nk)

        self._swapped.append((attn, attn.processor))
        self._layers.append((layer, family, attn))
        attn.processor = make_capture_processor(attn.processor, layer, self.session, layout_fn,
                                                family.default_relations)

    def _pre_hook(self, family: Family, states: dict):
        def hook(model, args, kwargs):
            states["state"] = family.observe(model, args, kwargs)
            st = self.session.state
            st.advance(family.timestep.read(args, kwargs))
            self.session.ledger.saw_step(st.step)
            scheduler = getattr(self.pipeline, "scheduler", None)
            timesteps = getattr(scheduler, "timesteps", None)
            st.total_steps = len(timesteps) if timesteps is not None else None
            do_cfg = getattr(self.pipeline, "do_classifier_free_guidance", None)
            if do_cfg is None and not family.separate_cfg_calls:
                # PixArt, Stable Audio: no property, but encode_prompt was told; CogVideoX, Allegro: __call__
                # batches [uncond, cond] when guidance_scale > 1
                do_cfg = self._encoded_cfg
                if do_cfg is None:
                    do_cfg = (getattr(self.pipeline, "guidance_scale", None) or 0) > 1
            do_cfg = bool(do_cfg)
            st.cfg_separate = family.separate_cfg_calls
            st.cfg_batched = do_cfg and not family.separate_cfg_calls
            st.cfg_order = family.batched_cfg_order   # Z-Image batches [cond, uncond]
            st.active = self.session.config.wants_step(st.step, st.total_steps)
            if not self._checked:
                self._checked = True
                self._first_step = st.step
                calls = 2 if family.separate_cfg_calls and do_cfg else 1
                self._check_budget(family, states["state"], model, args, kwargs, calls)
            elif family.separate_cfg_calls and st.step == self._first_step and st.call_in_step == 1:
                # Flux's true CFG shows no pipeline attribute: the second call of the first step reveals it
                self._check_budget(family, states["state"], model, args, kwargs, 2)
            return None

        # Step and budget bookkeeping reads the timestep tensor on the host: never traced by torch.compile.
        return torch.compiler.disable(hook)

    def _check_budget(self, family: Family, state: dict, model: torch.nn.Module, args, kwargs,
                      calls_per_step: int) -> None:
        """Refuse, before the first step runs, a capture whose products would pass max_bytes.

        One step runs one denoiser (Wan 2.2 switches between two at a boundary timestep), so the
        estimate counts the layers of the denoiser being called, calls_per_step times."""
        config = self.session.config
        first = _first_tensor(args, kwargs)
        batch = first.shape[0] if first is not None else 1
        layouts = []
        heads = 1
        in_model = {id(m) for m in model.modules()}
        for layer, fam, attn in self._layers:
            if fam is not family or id(attn) not in in_model:
                continue
            heads = max(heads, getattr(attn, "heads", 1))
            for call, (nq, nk) in enumerate(family.token_counts(layer, state)):
                layout = family.layout(layer, state, call, nq, nk)
                if not isinstance(layout, str):
                    layouts.append((layout, family.default_relations))
        per_call = self.session.estimate_bytes(layouts, batch, heads)
        total_steps = self.session.state.total_steps
        if config.steps == "all":
            steps = total_steps or 1
        elif config.steps == "last":
            steps = 1
        else:
            steps = len(config.steps)
        calls = steps * calls_per_step
        total = per_call * calls
        if total > config.max_bytes:
            raise ValueError(
                f"capture would store about {_size(total)} ({_size(per_call)} per denoiser call x {calls} calls, "
                f"{len(layouts)} attention calls per denoiser call) but max_bytes is {_size(config.max_bytes)}. "
                f"Fits better: pool=4 or 8 on image/video grids, heads='mean', tokens=[...] (token maps), fewer "
                f"layers (e.g. '*attn2*'), steps='last' or a few step indices, or a larger max_bytes with spill_dir=")

    def _hook_prompts(self) -> None:
        """Wrap the pipeline's encode_prompt (on the instance) so the store learns the prompt's tokens:
        token_map("cat") and the pictures' labels then work without any user step. Prompt embeddings
        passed directly (prompt=None) leave store.tokens as the user set it."""
        pipe = self.pipeline
        original = getattr(pipe, "encode_prompt", None)
        if original is None or "encode_prompt" in vars(pipe):
            return

        signature = inspect.signature(original)
        cfg = signature.parameters.get("do_classifier_free_guidance")

        def encode_prompt(*args, **kwargs):
            prompt = kwargs.get("prompt", args[0] if args else None)
            if prompt is not None:  # each pipeline call's own prompt, kept for that call's records
                self.session.prompt_tokens(_prompt_tokens(pipe, prompt, kwargs.get("max_sequence_length")))
            if cfg is not None:  # whether this call batches [uncond, cond] (PixArt, Stable Audio say it only here)
                self._encoded_cfg = bool(signature.bind_partial(*args, **kwargs).arguments.get(cfg.name, cfg.default))
            return original(*args, **kwargs)

        pipe.encode_prompt = encode_prompt
        self._prompt_hooked = True

    def restore(self) -> None:
        if self._routing is not None:
            self._routing.__exit__(None, None, None)
            self._routing = None
        if self._prompt_hooked:
            vars(self.pipeline).pop("encode_prompt", None)
            self._prompt_hooked = False
        for hook in self._hooks:
            hook.remove()
        for attn, original in reversed(self._swapped):
            attn.processor = original
        self._hooks.clear()
        self._swapped.clear()
        self._layers.clear()


def _refuse_xdit(layer: str, processor: Any) -> None:
    """xDiT (xfuser) replaces diffusers' processors with its own parallel ones, whose attention runs in
    xfuser's ring/Ulysses kernels; attncap does not intercept those yet."""
    module = type(processor).__module__ or ""
    if module.split(".")[0] == "xfuser":
        raise ValueError(f"{layer} runs xDiT's {type(processor).__name__}: attncap cannot capture xfuser's parallel "
                         "attention yet. Capture on diffusers' own context parallelism instead "
                         "(transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=..., "
                         "ring_degree=...))), which attncap captures exactly, or on one GPU")


def check_relations(relations, families: list[Family]) -> None:
    """Relation names the families of this target cannot offer fail before anything runs."""
    chosen = (relations,) if isinstance(relations, str) else tuple(relations)
    offered = {r for f in families for r in f.relations()}
    segments = sorted({s for f in families for s in f.segments})
    bad = [r for r in chosen if r not in ("auto", "all", "full") and r not in offered]
    if bad:
        names = ", ".join(sorted({f.name for f in families}))
        raise ValueError(f"relations {bad} are not offered by {names}: its segments are {segments} and its "
                         f"relations {sorted(offered)} (or 'auto' for the text cross-attention, 'all', 'full' for "
                         "each call's whole sequence)")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _prompt_tokens(pipe: Any, prompt: str | list[str], max_sequence_length: int | None = None) -> dict | None:
    """store.tokens for a prompt or a batch of prompts (None when the pipeline has no tokenizer)."""
    from ...prompts import for_pipeline

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        return None
    alignments = [for_pipeline(pipe, p, max_sequence_length) for p in prompts]
    if any(a is None for a in alignments):
        return None
    if len(alignments) == 1:
        return alignments[0].to_tokens()
    return {"text": [a.tokens for a in alignments], "prompts": prompts}


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x
    return None
