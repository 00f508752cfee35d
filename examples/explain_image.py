"""Explain an existing picture: where a model reads each word of a prompt in an image (or video) it did
not generate, with attncap.explain.

    python examples/explain_image.py                      # the embedded demo model on a rendered scene
    python examples/explain_image.py --tiny sd            # tiny random-weight pipelines, by family group:
    python examples/explain_image.py --tiny sd3           #   UNet (sd, sdxl), MM-DiT (sd3, flux), video (wan)
    python examples/explain_image.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --image photo.jpg --prompt "a cat on a sofa"
    python examples/explain_image.py --model black-forest-labs/FLUX.1-dev --image photo.jpg --prompt "a cat"
    python examples/explain_image.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --image clip.mp4 --prompt "a dog"

Writes the store (reload with attncap.load(dir)) and words.png (the picture, then each word's map over
it) to --out. With the demo model the scene generator knows the truth: the script prints each word's
IoU with its object. Tiny pipelines have random weights: their maps show the plumbing, not meaning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import attncap  # noqa: E402
from attncap.prompts import Alignment  # noqa: E402

TINY = {"sd": None, "sdxl": None, "sd3": (32, 48), "flux": (32, 48), "wan": (48, 80)}  # size each runs at
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(args):
    """The pipeline: a tiny one (tests/tiny_text_encoders.py), the demo model, or real weights."""
    if args.tiny:
        from _tiny import TESTS

        sys.path.insert(0, str(TESTS))
        import tiny_text_encoders

        return getattr(tiny_text_encoders, f"tiny_{args.tiny}")()
    if args.model == "shapes":
        from attncap.demo_model import load_pipeline

        return load_pipeline(args.device)
    from diffusers import DiffusionPipeline

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    return DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)


def picture(args, video: bool):
    """(the input, its prompt, the demo scene or None): --image if given, else a rendered demo scene."""
    from attncap.demo_model import make_scene
    from attncap.demo_model.scenes import HELDOUT_SEED

    if args.image:
        from attncap.viz.core import as_frames, as_rgb

        suffix = Path(args.image).suffix.lower()
        image = as_frames(args.image) if suffix in (".mp4", ".gif", ".webm", ".mov") else as_rgb(args.image)
        return (list(image) if image.ndim == 4 else image), args.prompt, None
    scene = make_scene(HELDOUT_SEED + 3000 + args.scene)
    if not video:
        return scene.image, args.prompt or scene.caption, scene
    frames = [np.roll(scene.image, shift=i, axis=1) for i in range(9)]  # the scene panning right
    return frames, args.prompt or scene.caption, None


def draw(store, image, words, path: Path) -> None:
    """words.png: the (first frame of the) picture, then each word's map at its size, over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = np.asarray(image[0] if isinstance(image, list) else image, np.float32)
    first = first / 255 if first.max() > 1 else first
    size = first.shape[:2]
    fig, axes = plt.subplots(1, 1 + len(words), figsize=(2 * (1 + len(words)), 2.2), squeeze=False)
    axes[0, 0].imshow(first)
    for ax, word in zip(axes[0, 1:], words):
        heat = store.token_map(word)
        heat = heat[0] if heat.dim() == 3 else heat      # a video's first frame
        ax.imshow(first)
        ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(word, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(f"{len(store)} records, input {size[0]}x{size[1]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="hub id, local pipeline folder, or 'shapes' (the demo model)")
    p.add_argument("--tiny", choices=sorted(TINY), default=None, help="a tiny random-weight pipeline (no download)")
    p.add_argument("--image", default=None, help="picture or video file (default: a rendered demo scene)")
    p.add_argument("--prompt", default=None, help="default: the rendered scene's caption")
    p.add_argument("--scene", type=int, default=0, help="which held-out demo scene to render")
    p.add_argument("--noise-levels", default=None, help="comma list of fractions (default: attncap.explain's)")
    p.add_argument("--seeds", default=None, help="comma list of noise seeds (default: attncap.explain's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="real models: default bfloat16 on CUDA")
    p.add_argument("--out", default="attncap_explain")
    args = p.parse_args(argv)
    if args.image is None and args.prompt is None and args.model != "shapes" and not args.tiny:
        p.error("give --image and --prompt for a real model (the rendered scenes only mean something to 'shapes')")

    pipe = load(args)
    video = args.tiny == "wan" or "Wan" in type(pipe).__name__
    image, prompt, scene = picture(args, video)
    options = {}
    if args.noise_levels:
        options["noise_levels"] = tuple(float(v) for v in args.noise_levels.split(","))
    if args.seeds:
        options["seeds"] = tuple(int(v) for v in args.seeds.split(","))
    if args.tiny:
        options.update(size=TINY[args.tiny], max_sequence_length=32)
    # maps_at="input": every record is resized to the picture, so token_map(word) lies on it directly
    store = attncap.explain(pipe, image, prompt, maps_at="input", **options)

    out = store.save(args.out)
    words = [w for w, _ in Alignment.from_tokens(store.tokens).words if len(w) > 2 and w != "and"]
    draw(store, image, words, out / "words.png")
    print(store.summary())
    if scene is not None and not args.tiny:  # random tiny weights ground nothing: no scores for them
        from attncap.demo_model.grounding import binarise, iou

        for obj in scene.objects:
            for word in (obj.colour, obj.shape):
                print(f"{word:>9}: IoU {iou(binarise(store.token_map(word).numpy()), obj.mask):.2f} with the {obj.colour} "
                      f"{obj.shape}")
    print(f"saved {len(store)} records and words.png to {out}")


if __name__ == "__main__":
    main()
