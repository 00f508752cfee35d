"""Model-family adapters: one small table per family or family group (see base.Family).

    unet     SD 1.5 / 2.x, SDXL, Kandinsky 2.2     sd3    SD3 / SD3.5
    flux     Flux.1, Chroma                       wan    Wan 2.1 / 2.2, SkyReels-V2
    qwenimage QwenImage, QwenImage-Edit
    hunyuan_video    HunyuanVideo, FramePack      hunyuan_video15  HunyuanVideo 1.5
    cogvideox  CogVideoX 1.0 / 1.5                ltx    LTX-Video
    mochi      Mochi 1                            allegro  Allegro
    kandinsky5 Kandinsky 5 (video and image)
"""
from __future__ import annotations

import torch

from .allegro import ALLEGRO
from .base import Family, family_table
from .cogvideox import COGVIDEOX
from .flux import FLUX
from .hunyuan_video import HUNYUAN_VIDEO, HUNYUAN_VIDEO_FRAMEPACK
from .hunyuan_video15 import HUNYUAN_VIDEO15
from .kandinsky5 import KANDINSKY5
from .ltx import LTX_VIDEO
from .mochi import MOCHI
from .qwenimage import QWENIMAGE
from .sd3 import SD3
from .unet import UNET
from .wan import WAN

FAMILIES: tuple[Family, ...] = (UNET, SD3, FLUX, WAN, QWENIMAGE, HUNYUAN_VIDEO, HUNYUAN_VIDEO_FRAMEPACK, HUNYUAN_VIDEO15,
                                 COGVIDEOX, LTX_VIDEO, MOCHI, ALLEGRO, KANDINSKY5)
_BY_CLASS = family_table(*FAMILIES)


def family_for(model: torch.nn.Module) -> Family | None:
    return _BY_CLASS.get(type(model).__name__)


def supported_denoisers() -> list[str]:
    return sorted(_BY_CLASS)
