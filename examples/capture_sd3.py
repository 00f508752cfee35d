"""Capture joint-attention maps from Stable Diffusion 3 / 3.5 (image <-> text inside one joint sequence).

    python examples/capture_sd3.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a red fox in snow"
    python examples/capture_sd3.py --tiny           # tiny random-weight SD3.5-style pipeline on the CPU

Each joint block attends over [image tokens, text tokens]; attncap files the image->text block
(each image token's attention to the prompt) and text->image (each text token's attention to the
image), normalised over the whole joint sequence. SD3.5's extra image-only attention (attn2) has
image->image only. Writes the store and the image to --out and prints store.summary().
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncap  # noqa: E402
from _common import parse, parser, pipeline, save  # noqa: E402


def load(args):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=args.torch_dtype)
    return pipe, dict(prompt=args.prompt, num_inference_steps=args.steps, max_sequence_length=256,
                      generator=torch.Generator(args.device).manual_seed(0))


def main(argv=None) -> None:
    p = parser(__doc__, "stabilityai/stable-diffusion-3.5-medium", "a red fox standing in fresh snow, morning light",
               28, "attncap_sd3", tiny=("sd3",))
    p.add_argument("--pool", type=int, default=2, help="pool the image grid by this factor (1: full resolution)")
    p.add_argument("--relations", nargs="+", default=["image->text", "text->image"])
    args = parse(p, argv)
    pipe, call = pipeline(args, load)
    with attncap.capture(pipe, relations=args.relations, steps=args.capture_steps,
                         pool=None if args.pool == 1 else args.pool) as store:
        image = pipe(**call).images[0]
    save(store, args.out, [image])


if __name__ == "__main__":
    main()
