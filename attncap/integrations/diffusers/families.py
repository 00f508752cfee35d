"""Model-family adapters: where a family's tokens sit in each attention call.

Each adapter reads what it needs from the denoiser's inputs (observe: latent size, text length,
patch size) and says, for one SDPA call of one attention module, which segments lie on the query
and key axes. Everything else (requests, kernels, the store) is the shared capture path.

    SD / SDXL UNet   self: [image] -> [image]; cross: [image] -> [text]; image grid per resolution
    SD3 / SD3.5      joint: [image, text] both axes; dual attention (attn2): [image] -> [image]
    Flux             double and single blocks: [text, image] both axes
    Wan 2.1 / 2.2    attn1: [video] -> [video]; attn2: [video] -> [text], I2V first [video] -> [image_ctx]
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ...session import CallLayout, Segment


def _arg(args, kwargs, index: int, name: str):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _scalar(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return float(t)


def _grid_for(n: int, height: int, width: int) -> tuple[int, int] | None:
    """The (h, w) grid of n tokens of a latent downsampled by a power of two (ceil for odd sizes)."""
    for level in range(8):
        h, w = math.ceil(height / 2**level), math.ceil(width / 2**level)
        if h * w == n:
            return h, w
    return None


class Family:
    name = ""
    denoisers: tuple[str, ...] = ()
    processors: tuple[str, ...] = ()
    default_relations: tuple[str, ...] = ("image->text",)
    separate_cfg_calls = False  # True: the pipeline calls the denoiser once per CFG branch

    def handles(self, processor: Any) -> bool:
        return type(processor).__name__ in self.processors

    def timestep(self, args, kwargs) -> float | None:
        return _scalar(_arg(args, kwargs, 1, "timestep"))

    def observe(self, model, args, kwargs) -> dict:
        raise NotImplementedError

    def token_counts(self, attn, layer: str, state: dict) -> list[tuple[int, int]]:
        """(Nq, Nk) of each SDPA call the module makes, for the byte estimate before the run."""
        raise NotImplementedError

    def layout(self, attn, layer: str, state: dict, call: int, nq: int, nk: int) -> CallLayout | None:
        raise NotImplementedError


class UNetFamily(Family):
    name = "unet"
    denoisers = ("UNet2DConditionModel",)
    processors = ("AttnProcessor2_0", "AttnProcessor")

    def observe(self, model, args, kwargs) -> dict:
        sample = _arg(args, kwargs, 0, "sample")
        text = _arg(args, kwargs, 2, "encoder_hidden_states")
        return {"hw": tuple(sample.shape[-2:]), "text": text.shape[1] if text is not None else 0,
                "levels": len(model.config.block_out_channels)}

    def token_counts(self, attn, layer, state):
        match = re.search(r"(down_blocks|up_blocks)\.(\d+)|mid_block", layer)
        levels = state["levels"]
        level = 0 if match is None else (levels - 1 if match.group(0) == "mid_block" else
                                          int(match.group(2)) if match.group(1) == "down_blocks"
                                          else levels - 1 - int(match.group(2)))
        h, w = (math.ceil(s / 2**level) for s in state["hw"])
        return [(h * w, state["text"] if attn.is_cross_attention else h * w)]

    def layout(self, attn, layer, state, call, nq, nk):
        grid = _grid_for(nq, *state["hw"])
        image = Segment("image", 0, nq, grid)
        keys = Segment("text", 0, nk) if attn.is_cross_attention else Segment("image", 0, nk, grid)
        return CallLayout((image,), (keys,))


class SD3Family(Family):
    name = "sd3"
    denoisers = ("SD3Transformer2DModel",)
    processors = ("JointAttnProcessor2_0",)

    def timestep(self, args, kwargs):
        return _scalar(_arg(args, kwargs, 3, "timestep"))

    def observe(self, model, args, kwargs):
        latent = _arg(args, kwargs, 0, "hidden_states")
        text = _arg(args, kwargs, 1, "encoder_hidden_states")
        p = model.config.patch_size
        return {"grid": (latent.shape[-2] // p, latent.shape[-1] // p), "text": text.shape[1]}

    @staticmethod
    def _joint(attn) -> bool:
        return getattr(attn, "add_q_proj", None) is not None

    def token_counts(self, attn, layer, state):
        n = math.prod(state["grid"]) + (state["text"] if self._joint(attn) else 0)
        return [(n, n)]

    def layout(self, attn, layer, state, call, nq, nk):
        ni = math.prod(state["grid"])
        segs = (Segment("image", 0, ni, state["grid"]),)
        if self._joint(attn):
            segs += (Segment("text", ni, nq),)
        return CallLayout(segs, segs)


class FluxFamily(Family):
    name = "flux"
    denoisers = ("FluxTransformer2DModel",)
    processors = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
    separate_cfg_calls = True

    def timestep(self, args, kwargs):
        t = _scalar(_arg(args, kwargs, 3, "timestep"))
        return None if t is None else t * 1000.0  # Flux is called with t / 1000

    def observe(self, model, args, kwargs):
        text = _arg(args, kwargs, 1, "encoder_hidden_states")
        latent = _arg(args, kwargs, 0, "hidden_states")
        ids = kwargs.get("img_ids")
        grid = None
        if ids is not None:
            ids = ids[0] if ids.dim() == 3 else ids
            h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            grid = (h, w) if h * w == latent.shape[1] else None
        return {"text": text.shape[1], "image": latent.shape[1], "grid": grid}

    def token_counts(self, attn, layer, state):
        n = state["text"] + state["image"]
        return [(n, n)]

    def layout(self, attn, layer, state, call, nq, nk):
        nt = state["text"]
        segs = (Segment("text", 0, nt), Segment("image", nt, nq, state["grid"]))
        return CallLayout(segs, segs)


class WanFamily(Family):
    name = "wan"
    denoisers = ("WanTransformer3DModel",)
    processors = ("WanAttnProcessor", "WanAttnProcessor2_0")
    default_relations = ("video->text",)
    separate_cfg_calls = True

    def timestep(self, args, kwargs):
        # Wan 2.2 TI2V (expand_timesteps) passes per-token timesteps [B, N], 0 on the conditioning frame's
        # tokens: the step's t is their max (the first element would be 0 at every step).
        t = _arg(args, kwargs, 1, "timestep")
        return float(t.max()) if isinstance(t, torch.Tensor) and t.numel() else _scalar(t)

    def observe(self, model, args, kwargs):
        latent = _arg(args, kwargs, 0, "hidden_states")
        text = _arg(args, kwargs, 2, "encoder_hidden_states")
        image = _arg(args, kwargs, 3, "encoder_hidden_states_image")
        pt, ph, pw = model.config.patch_size
        f, h, w = latent.shape[-3:]
        return {"grid": (f // pt, h // ph, w // pw), "text": text.shape[1],
                "image_ctx": image.shape[1] if image is not None else 0}

    def token_counts(self, attn, layer, state):
        n = math.prod(state["grid"])
        if not layer.endswith("attn2"):
            return [(n, n)]
        calls = [(n, state["image_ctx"])] if getattr(attn, "add_k_proj", None) is not None else []
        return calls + [(n, state["text"])]

    def layout(self, attn, layer, state, call, nq, nk):
        video = Segment("video", 0, nq, state["grid"])
        if not layer.endswith("attn2"):
            return CallLayout((video,), (video,))
        image_first = getattr(attn, "add_k_proj", None) is not None and call == 0
        return CallLayout((video,), (Segment("image_ctx" if image_first else "text", 0, nk),))


FAMILIES: tuple[Family, ...] = (UNetFamily(), SD3Family(), FluxFamily(), WanFamily())


def family_for(model: torch.nn.Module) -> Family | None:
    name = type(model).__name__
    return next((f for f in FAMILIES if name in f.denoisers), None)
