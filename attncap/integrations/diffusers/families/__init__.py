"""Model-family adapters: one small table per family or family group (see base.Family).

    unet     SD 1.5 / 2.x, SDXL, Kandinsky 2.2     sd3    SD3 / SD3.5
    flux     Flux.1, Chroma                       wan    Wan 2.1 / 2.2, SkyReels-V2
    qwenimage QwenImage, QwenImage-Edit
    hunyuan_video    HunyuanVideo, FramePack      hunyuan_video15  HunyuanVideo 1.5
    cogvideox  CogVideoX 1.0 / 1.5                ltx    LTX-Video
    mochi      Mochi 1                            allegro  Allegro
    kandinsky5 Kandinsky 5 (video and image)
    flux2      Flux.2 (dev, Klein, Klein KV)      sana   Sana (cross-attention; self is linear)
    z_image    Z-Image                            hidream  HiDream-I1
    lumina2    Lumina-Image 2.0                   auraflow AuraFlow
    pixart     PixArt-Alpha / Sigma               hunyuandit HunyuanDiT
    stable_audio Stable Audio Open                prx    PRX
"""
from __future__ import annotations

import torch

from .allegro import ALLEGRO
from .auraflow import AURAFLOW
from .base import Family, family_table
from .cogvideox import COGVIDEOX
from .flux import FLUX
from .flux2 import FLUX2
from .hidream import HIDREAM
from .hunyuan_video import HUNYUAN_VIDEO, HUNYUAN_VIDEO_FRAMEPACK
from .hunyuan_video15 import HUNYUAN_VIDEO15
from .hunyuandit import HUNYUAN_DIT
from .kandinsky5 import KANDINSKY5
from .ltx import LTX_VIDEO
from .lumina2 import LUMINA2
from .mochi import MOCHI
from .pixart import PIXART
from .prx import PRX
from .qwenimage import QWENIMAGE
from .sana import SANA
from .sd3 import SD3
from .stable_audio import STABLE_AUDIO
from .unet import UNET
from .wan import WAN
from .z_image import Z_IMAGE

FAMILIES: tuple[Family, ...] = (UNET, SD3, FLUX, WAN, QWENIMAGE, HUNYUAN_VIDEO, HUNYUAN_VIDEO_FRAMEPACK, HUNYUAN_VIDEO15,
                                 COGVIDEOX, LTX_VIDEO, MOCHI, ALLEGRO, KANDINSKY5, FLUX2, SANA, Z_IMAGE, HIDREAM,
                                 LUMINA2, AURAFLOW, PIXART, HUNYUAN_DIT, STABLE_AUDIO, PRX)
_BY_CLASS = family_table(*FAMILIES)


def family_for(model: torch.nn.Module) -> Family | None:
    return _BY_CLASS.get(type(model).__name__)


def supported_denoisers() -> list[str]:
    return sorted(_BY_CLASS)
