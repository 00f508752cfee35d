"""Capture cross-attention maps (image -> text) from Stable Diffusion 1.5 / 2.x / SDXL.

    python examples/capture_sd.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a cat on a sofa"
    python examples/capture_sd.py --model stabilityai/stable-diffusion-xl-base-1.0 --steps 30
    python examples/capture_sd.py --tiny            # tiny random-weight SD pipeline on the CPU (--tiny sdxl)

Writes the store (safetensors + index.json, reload with attncap.load(dir)) and the image to --out, and
prints store.summary(). With a real model the prompt's tokens are stored too, so words can be looked up:
    attncap.load(dir).token_map("cat", size=(64, 64))
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncap  # noqa: E402
from _common import parse, parser, pipeline, save  # noqa: E402


def load(args):
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=args.torch_dtype)
    return pipe, dict(prompt=args.prompt, num_inference_steps=args.steps,
                      generator=torch.Generator(args.device).manual_seed(0))


def main(argv=None) -> None:
    p = parser(__doc__, "stable-diffusion-v1-5/stable-diffusion-v1-5", "a photograph of a cat sitting on a red sofa",
               30, "attncap_sd", tiny=("sd", "sdxl"), gpu_dtype="float16")
    p.add_argument("--pool", type=int, default=None, help="pool image grids by this factor")
    p.add_argument("--layers", default="*attn2*", help='"all", or a glob of layer names (default: cross attention)')
    args = parse(p, argv)
    pipe, call = pipeline(args, load)
    with attncap.capture(pipe, relations="image->text", layers=args.layers, steps=args.capture_steps,
                         pool=args.pool) as store:
        image = pipe(**call).images[0]
    save(store, args.out, [image])


if __name__ == "__main__":
    main()
