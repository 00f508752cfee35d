"""Capture Wan maps across several GPUs with diffusers' context parallelism (Ulysses, ring or both).

Every rank runs the same script; the products of each captured call are reduced over the CP group
and rank 0 keeps the store (exactly what one GPU would capture, see tests/test_parallel.py).

    torchrun --nproc-per-node 8 examples/capture_wan_parallel.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers \
        --ulysses 8 --prompt "a cat walks on grass"
    torchrun --nproc-per-node 8 examples/capture_wan_parallel.py --ulysses 4 --ring 2     # unified 4 x 2
    torchrun --nproc-per-node 2 examples/capture_wan_parallel.py --tiny --ulysses 2        # CPU, gloo, no weights

Capture installs before or after enable_parallelism alike; --pool pools the (t, h, w) video grid (the
pooled bins may straddle the ranks' shards). On CPU (--tiny) the ranks talk over gloo.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncap  # noqa: E402
from _common import parse, parser, pipeline, save  # noqa: E402
from capture_wan import load  # noqa: E402


def main(argv=None) -> None:
    p = parser(__doc__, "Wan-AI/Wan2.1-T2V-14B-Diffusers", "a cat walks through tall grass, sunny afternoon", 30,
               "attncap_wan_cp", tiny=("wan", "wan22"), capture_steps="last")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (heads split over ranks)")
    p.add_argument("--ring", type=int, default=1, help="ring degree (keys and values passed around)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81, help="num_frames (4k + 1)")
    p.add_argument("--image", default=None)
    p.add_argument("--pool", type=int, nargs="+", default=[1, 4, 4], help="(t, h, w) pool factors or one int")
    p.add_argument("--relations", nargs="+", default=["video->text"])
    args = parse(p, argv)
    from diffusers import ContextParallelConfig

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    else:
        torch.accelerator.device_count = lambda: 1  # diffusers divides by it; each CPU rank is its own device
        args.device = "cpu"
    if args.ulysses * args.ring != dist.get_world_size():
        raise SystemExit(f"--ulysses {args.ulysses} x --ring {args.ring} must equal the {dist.get_world_size()} ranks")
    pipe, call = pipeline(args, load)
    if args.tiny:  # diffusers' equal shards need a token count the ranks divide: 3 x 4 x 5 video tokens
        call.update(height=64, width=80)
    config = ContextParallelConfig(ulysses_degree=args.ulysses, ring_degree=args.ring)
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).enable_parallelism(config=config)
    pool = args.pool[0] if len(args.pool) == 1 else tuple(args.pool)
    with attncap.capture(pipe, relations=args.relations, steps=args.capture_steps, pool=pool) as store:
        frames = pipe(**call).frames[0]
    if rank == 0:
        save(store, args.out, list(frames))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
