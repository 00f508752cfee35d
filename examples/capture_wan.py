"""Capture video->text (and, for image-to-video, video->image_ctx) maps from Wan 2.1 / 2.2.

    python examples/capture_wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on grass"
    python examples/capture_wan.py --model Wan-AI/Wan2.1-I2V-14B-480P-Diffusers --image cat.png
    python examples/capture_wan.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers   # transformer + transformer_2
    python examples/capture_wan.py --tiny            # tiny random Wan 2.1 T2V; --tiny wan22 | wan_i2v | wan_ti2v

Maps live on the (t, h, w) video token grid; --pool pools it (factors need not divide the grid).
Wan makes one denoiser call per CFG branch, so records come as branch "cond" and "uncond".
Defaults capture only the last step: a Wan self-attention map is huge (DESIGN.md), so ask for
video->video with pooling. Writes the store and the frames to --out and prints store.summary().
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncap  # noqa: E402
from _common import parse, parser, pipeline, save  # noqa: E402


def load(args):
    from diffusers import AutoencoderKLWan, DiffusionPipeline
    from diffusers.utils import load_image

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)  # keep fp32
    pipe = DiffusionPipeline.from_pretrained(args.model, vae=vae, torch_dtype=args.torch_dtype)
    call = dict(prompt=args.prompt, num_inference_steps=args.steps, height=args.height, width=args.width,
                num_frames=args.frames, generator=torch.Generator(args.device).manual_seed(0))
    if args.image:
        call["image"] = load_image(args.image)
    return pipe, call


def main(argv=None) -> None:
    p = parser(__doc__, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "a cat walks through tall grass, sunny afternoon", 30,
               "attncap_wan", tiny=("wan", "wan22", "wan_i2v", "wan_ti2v"), capture_steps="last")
    p.add_argument("--image", default=None, help="first frame for image-to-video models")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=33, help="num_frames (4k + 1)")
    p.add_argument("--pool", type=int, nargs="+", default=[1, 2, 2], help="(t, h, w) pool factors or one int")
    p.add_argument("--relations", nargs="+", default=["video->text", "video->image_ctx"])
    args = parse(p, argv)
    pool = args.pool[0] if len(args.pool) == 1 else tuple(args.pool)
    pipe, call = pipeline(args, load)
    with attncap.capture(pipe, relations=args.relations, steps=args.capture_steps, pool=pool) as store:
        frames = pipe(**call).frames[0]
    save(store, args.out, list(frames))


if __name__ == "__main__":
    main()
