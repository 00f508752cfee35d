"""Capture attention maps from Flux (FLUX.1 dev / schnell): double- and single-stream blocks.

    python examples/capture_flux.py --model black-forest-labs/FLUX.1-schnell --steps 4 --guidance 0
    python examples/capture_flux.py --model black-forest-labs/FLUX.1-dev --prompt "a lighthouse at dusk"
    python examples/capture_flux.py --tiny          # tiny random-weight Flux pipeline on the CPU

Every Flux block attends over [text tokens (T5), image tokens]; single-stream blocks too. attncap
files image->text (where each image patch looks in the prompt) for all of them by default.
Writes the store and the image to --out and prints store.summary().
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncap  # noqa: E402
from _common import parse, parser, pipeline, save  # noqa: E402


def load(args):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=args.torch_dtype)
    return pipe, dict(prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      height=args.size, width=args.size, max_sequence_length=256 if "schnell" in args.model else 512,
                      generator=torch.Generator(args.device).manual_seed(0))


def main(argv=None) -> None:
    p = parser(__doc__, "black-forest-labs/FLUX.1-schnell", "a lighthouse on a cliff at dusk, waves below", 4,
               "attncap_flux", tiny=("flux",))
    p.add_argument("--guidance", type=float, default=0.0, help="guidance_scale (3.5 for FLUX.1-dev)")
    p.add_argument("--size", type=int, default=768, help="image height and width")
    p.add_argument("--pool", type=int, default=2, help="pool the image grid by this factor (1: full resolution)")
    p.add_argument("--relations", nargs="+", default=["image->text"])
    args = parse(p, argv)
    pipe, call = pipeline(args, load)
    with attncap.capture(pipe, relations=args.relations, steps=args.capture_steps,
                         pool=None if args.pool == 1 else args.pool) as store:
        image = pipe(**call).images[0]
    save(store, args.out, [image])


if __name__ == "__main__":
    main()
