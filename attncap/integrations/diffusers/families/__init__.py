"""Model-family adapters: one small table per family or family group (see base.Family).

    unet     SD 1.5 / 2.x, SDXL, Kandinsky 2.2     sd3    SD3 / SD3.5
    flux     Flux.1, Chroma                       wan    Wan 2.1 / 2.2, SkyReels-V2
    qwenimage QwenImage, QwenImage-Edit
"""
from __future__ import annotations

import torch

from .base import Family, family_table
from .flux import FLUX
from .qwenimage import QWENIMAGE
from .sd3 import SD3
from .unet import UNET
from .wan import WAN

FAMILIES: tuple[Family, ...] = (UNET, SD3, FLUX, WAN, QWENIMAGE)
_BY_CLASS = family_table(*FAMILIES)


def family_for(model: torch.nn.Module) -> Family | None:
    return _BY_CLASS.get(type(model).__name__)


def supported_denoisers() -> list[str]:
    return sorted(_BY_CLASS)
