"""``attncap demo``: the embedded shapes model draws a few captions with capture on.

For each caption the demo generates a 32x32 picture with the shipped demo model (attncap.demo_model,
no download), capturing every cross-attention layer (image->text, all denoising steps, heads averaged)
and the self-attention of the 16x16 layers, and writes into results/<timestamp>/<n>-<caption>/:

    image.png, maps.safetensors + index.json   the picture and the store (attncap render DIR redraws it)
    token_heatmaps.png, words/, montage_*.png  each word's map, alone and over the picture
    evolution.gif / .mp4                       the words' maps over the denoising steps
    masks/                                     LEDITS++-style masks of each word
    self_attention.png, report.md / .html      query points' self-attention, statistics
    grounding.json                             IoU of each colour/shape word's mask with its object,
                                               the object segmented by colour in the generated picture

and an index.md at the top that links them. About a minute on two CPU cores.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import time
from pathlib import Path
from typing import Sequence

CAPTIONS = ("a red circle and a blue square",
            "a yellow triangle and a green circle and a magenta square",
            "a cyan square and a red triangle")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def run(out_dir: str | Path | None = None, captions: Sequence[str] = CAPTIONS, steps: int = 20,
        guidance: float = 1.0, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo and return the folder it wrote (results/<timestamp>/ by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from .capture import capture
    from .demo_model import grounding, load_pipeline
    from .demo_model.pipeline import as_numpy
    from .render import render_all
    from .viz.core import as_rgb, save_png

    out = Path(out_dir) if out_dir else Path("results") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a: None)
    pipe = load_pipeline("cpu", progress_bar=progress)
    lines = ["# attncap demo", "", f"The embedded shapes model, {steps} DDIM steps, guidance {guidance}, seed {seed}.",
             "Cross-attention maps (image->text) of every layer and step, heads averaged, and the",
             "self-attention (image->image) of the 16x16 layers.", ""]
    for n, caption in enumerate(captions):
        t0 = time.perf_counter()
        folder = out / f"{n}-{_slug(caption)}"
        # attn2: the text cross-attention of every resolution; attn1 of the 16x16 blocks: self-attention
        with capture(pipe, relations=("image->text", "image->image"), stats=("entropy", "peak"),
                     layers=("*attn2*", "unet.down_blocks.1.*attn1*", "unet.up_blocks.1.*attn1*")) as store:
            result = pipe(caption, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                          generator=torch.Generator().manual_seed(seed))
        image = as_numpy(result.images)[0]
        store.save(folder)
        save_png(as_rgb(image), folder / "image.png")
        render_all(store, folder, image=image, tree=False, progress=progress,
                   meta={"model": "attncap demo (embedded shapes model)", "prompt": caption, "steps": steps,
                         "guidance": guidance, "seed": seed})
        scores = grounding.score_image(store, caption, image)
        (folder / "grounding.json").write_text(json.dumps(scores, indent=1) + "\n")
        seconds = time.perf_counter() - t0
        ious = ", ".join(f"{w} {s['iou']:.2f}" for w, s in scores.items() if s["iou"] is not None)
        missing = sorted({s["object"] for s in scores.values() if s["iou"] is None})
        ious += f" (not drawn by the model: {', '.join(missing)})" if missing else ""
        say(f"attncap demo: {caption!r}: {len(store)} records, {seconds:.1f} s; IoU {ious or 'n/a'} -> {folder}")
        lines += [f"## {caption}", "", f"![picture and word maps]({folder.name}/token_heatmaps.png)", "",
                  f"Animation: [{folder.name}/evolution.gif]({folder.name}/evolution.gif); report: "
                  f"[{folder.name}/report.md]({folder.name}/report.md); grounding IoU: {ious or 'n/a'}", ""]
    (out / "index.md").write_text("\n".join(lines))
    say(f"attncap demo: wrote {out}/index.md")
    return out
