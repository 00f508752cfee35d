"""Grounding benchmark of the embedded demo model (attncap.demo_model.grounding does the work).

    python benchmarks/grounding.py                      # 48 held-out scenes, prints the IoUs
    python benchmarks/grounding.py --write-results      # and replaces its section of benchmarks/RESULTS.md
    python benchmarks/grounding.py --figure results/grounding.png --samples 8

Scores, per held-out scene, the IoU between the Otsu-thresholded cross-attention map of each colour
and shape word and the mask of the object it names, segmented by colour in the generated image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(HERE))  # last: the checkout's kernels/ must not hide Hugging Face's "kernels"

import torch  # noqa: E402

from attncap.demo_model import grounding, load_pipeline  # noqa: E402
from attncap.demo_model.pipeline import MODEL_DIR  # noqa: E402
from attncap.report import replace_section  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="held-out scenes")
    ap.add_argument("--start", type=int, default=0, help="first held-out seed offset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=1.0, help="1: no CFG (the demo model draws best without it)")
    ap.add_argument("--layers", default=grounding.DEFAULT_LAYERS)
    ap.add_argument("--threshold", default="otsu", help="'otsu' or 'q<quantile>'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--write-results", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--json", default=None, help="also write the summary and rows as JSON")
    ap.add_argument("--figure", default=None, help="write a figure of the first batch's images and word maps")
    args = ap.parse_args(argv)

    pipe = load_pipeline(args.device, path=args.model)
    result = grounding.evaluate(pipe, samples=args.samples, batch=args.batch, start=args.start, layers=args.layers,
                                num_inference_steps=args.steps, guidance_scale=args.guidance,
                                threshold=args.threshold, progress=True)
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "env": grounding.environment(pipe),
                       "rows": [r.__dict__ for r in result.rows]}, f, indent=1)
    if args.figure:
        seeds = grounding.heldout_seeds(min(args.batch, args.samples), args.start)
        scenes, images, store = grounding.generate_with_maps(pipe, seeds, args.layers, "all", args.steps, args.guidance)
        print("figure:", grounding.save_figure(scenes, images, store, args.figure, args.threshold))
    if args.write_results:
        info_path = os.path.join(args.model or str(MODEL_DIR), "training_info.json")
        info = json.load(open(info_path)) if os.path.exists(info_path) else None
        replace_section(args.results, grounding.results_section(result, grounding.environment(pipe), info))
        print("updated", args.results)
    return summary


if __name__ == "__main__":
    main()
