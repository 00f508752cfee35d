"""The grounding benchmark: do the demo model's cross-attention maps of a word land on its object?

For held-out scenes (seeds from scenes.HELDOUT_SEED up; training never sees them) the scene's
caption is the prompt. The pipeline generates an image with attncap capturing image->text maps of
the cross-attention layers (all denoising steps, heads averaged, the "cond" CFG branch). Each
object the caption names is found in the GENERATED image by its colour (pixels nearest to the
pure colour, segment_colour); the word maps of its colour word and of its shape word are the
store's token maps, bilinearly resized to the image and averaged over layers and steps
(Store.token_map), and binarised with Otsu's threshold. The score is the IoU of that binary map
with the object's mask; objects the model failed to draw (fewer than MIN_PIXELS pixels of their
colour) are counted as missing and not scored.

As a control, each word's map is also scored against the mask of another object of the same
scene (a map that merely lights up "the objects" scores high there too; a grounded one does not).

    >>> from attncap.demo_model import load_pipeline
    >>> result = evaluate(load_pipeline(), samples=32)
    >>> result.summary()            # {'iou_colour': ..., 'iou_shape': ..., 'objects': ..., ...}
"""
from __future__ import annotations

import datetime as _dt
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .scenes import COLOURS, HELDOUT_SEED, SHAPES, make_scene, segment_colour

MIN_PIXELS = 4
DEFAULT_LAYERS = "*attn2"        # every cross-attention layer: 16x16 and 8x8
SECTION = "## Grounding benchmark (embedded demo model)"


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    mt = m0[-1]
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[1:][int(np.argmax(between))])


def binarise(m: np.ndarray, method: str = "otsu") -> np.ndarray:
    """bool mask of a map: "otsu", or "q<0..1>" (above that quantile, e.g. "q0.85")."""
    if method == "otsu":
        return m > otsu_threshold(m)
    if method.startswith("q"):
        return m > np.quantile(m, float(method[1:]))
    raise ValueError(f"threshold method must be 'otsu' or 'q<quantile>'; got {method!r}")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@dataclass
class Row:
    seed: int
    caption: str
    word: str
    word_class: str        # "colour" or "shape"
    iou: float
    control_iou: float | None   # the same map against another object's mask


@dataclass
class GroundingResult:
    rows: list[Row] = field(default_factory=list)
    scenes: int = 0
    objects: int = 0
    missing: int = 0
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self, word_class: str | None = None, control: bool = False) -> float:
        vals = [(r.control_iou if control else r.iou) for r in self.rows
                if (word_class is None or r.word_class == word_class) and (not control or r.control_iou is not None)]
        return float(np.mean(vals)) if vals else float("nan")

    def summary(self) -> dict:
        return {"scenes": self.scenes, "objects": self.objects, "objects_found": self.objects - self.missing,
                "iou_colour": self.mean("colour"), "iou_shape": self.mean("shape"), "iou_all": self.mean(),
                "control_iou_colour": self.mean("colour", True), "control_iou_shape": self.mean("shape", True),
                "seconds": round(self.seconds, 1), **self.settings}


def heldout_seeds(samples: int, start: int = 0) -> list[int]:
    return [HELDOUT_SEED + start + i for i in range(samples)]


def generate_with_maps(pipe, seeds: Sequence[int], layers=DEFAULT_LAYERS, steps="all", num_inference_steps: int = 20,
                       guidance_scale: float = 1.0, objects=(2, 3)):
    """(scenes, images float32 [B, H, W, 3], store) for the held-out scenes of ``seeds``; each image's
    noise comes from its own seed, so a sample does not depend on how seeds are batched."""
    import attncap
    from attncap import prompts

    scenes = [make_scene(int(s), objects=objects) for s in seeds]
    captions = [s.caption for s in scenes]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with attncap.capture(pipe, relations="image->text", layers=layers, steps=steps, heads="mean") as store:
        out = pipe(captions, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="np")
    store.tokens = {"text": [prompts.for_pipeline(pipe, c).tokens for c in captions]}
    return scenes, np.asarray(out.images, np.float32), store


def score(scenes, images: np.ndarray, store, threshold: str = "otsu", result: GroundingResult | None = None
          ) -> GroundingResult:
    """Add the IoU rows of one generated batch to ``result``."""
    result = result or GroundingResult()
    size = images.shape[1:3]
    for b, scene in enumerate(scenes):
        result.scenes += 1
        masks = {}
        for obj in scene.objects:
            result.objects += 1
            m = segment_colour(images[b], obj.colour)
            if m.sum() < MIN_PIXELS:
                result.missing += 1
            else:
                masks[obj.colour] = m
        for i, obj in enumerate(scene.objects):
            if obj.colour not in masks:
                continue
            others = [o.colour for o in scene.objects[i + 1:] + scene.objects[:i] if o.colour in masks]
            for word, cls in ((obj.colour, "colour"), (obj.shape, "shape")):
                heat = store.token_map(word, size=tuple(size), batch=b).numpy()
                pred = binarise(heat, threshold)
                control = iou(pred, masks[others[0]]) if others else None
                result.rows.append(Row(scene.seed, scene.caption, word, cls, iou(pred, masks[obj.colour]), control))
    return result


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs of a scene caption: "a red circle and a blue square" -> [(red, circle), ...]."""
    pairs = re.findall(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\b", caption.lower())
    if not pairs:
        raise ValueError(f"caption {caption!r} names no '<colour> <shape>' object; colours {list(COLOURS)}, "
                         f"shapes {list(SHAPES)}")
    return pairs


def score_image(store, caption: str, image: np.ndarray, threshold: str = "otsu", batch: int = 0) -> dict:
    """{word: {"object", "iou", "pixels"}} for one generated image float32 [H, W, 3]: each colour and
    shape word's binarised map against its object, segmented by colour (iou None when not drawn)."""
    out = {}
    for colour, shape in caption_objects(caption):
        mask = segment_colour(image, colour)
        drawn = mask.sum() >= MIN_PIXELS
        for word in (colour, shape):
            heat = store.token_map(word, size=tuple(image.shape[:2]), batch=batch).numpy()
            out[word] = {"object": f"{colour} {shape}", "pixels": int(mask.sum()),
                         "iou": round(iou(binarise(heat, threshold), mask), 4) if drawn else None}
    return out


def evaluate(pipe, samples: int = 48, batch: int = 8, start: int = 0, layers=DEFAULT_LAYERS, steps="all",
             num_inference_steps: int = 20, guidance_scale: float = 1.0, threshold: str = "otsu",
             progress: bool = False) -> GroundingResult:
    """Run the benchmark on ``samples`` held-out scenes (seeds HELDOUT_SEED + start + i)."""
    import time

    t0 = time.perf_counter()
    seeds = heldout_seeds(samples, start)
    result = GroundingResult(settings={"layers": layers if isinstance(layers, str) else list(layers),
                                       "steps": steps if isinstance(steps, str) else list(steps),
                                       "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                                       "threshold": threshold,
                                       "seeds": f"HELDOUT_SEED+{start}..+{start + samples - 1}"})
    for i in range(0, samples, batch):
        scenes, images, store = generate_with_maps(pipe, seeds[i:i + batch], layers, steps, num_inference_steps,
                                                   guidance_scale)
        score(scenes, images, store, threshold, result)
        if progress:
            print(f"  {min(i + batch, samples)}/{samples} scenes: colour {result.mean('colour'):.3f} "
                  f"shape {result.mean('shape'):.3f}", flush=True)
    result.seconds = time.perf_counter() - t0
    return result


def environment(pipe=None) -> dict:
    import diffusers

    try:
        import transformers
        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = None
    device = "cpu"
    if pipe is not None and pipe.device.type == "cuda":
        device = torch.cuda.get_device_name(pipe.device)
    elif device == "cpu":
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    import attncap
    return {"date": _dt.date.today().isoformat(), "device": device, "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": tv,
            "attncap": attncap.__version__}


def results_section(result: GroundingResult, env: dict, info: dict | None = None) -> str:
    """The markdown section for benchmarks/RESULTS.md."""
    s = result.summary()
    info = info or {}
    lines = [SECTION, "",
             f"Measured {env['date']} on {env['device']}; Python {env['python']}, torch {env['torch']}, "
             f"diffusers {env['diffusers']}, transformers {env['transformers']}, attncap {env['attncap']}. "
             "Reproduce with `python benchmarks/grounding.py --write-results`.", "",
             "The embedded demo model (`attncap/assets/shapes_model`, loaded by `attncap.demo_model.load_pipeline()`)"
             + (f": {info['parameters'] / 1e6:.2f} M parameters, trained {info['train_seconds'] / 60:.0f} min on "
                f"{info['device']} ({info['steps']} steps of {info['batch']}, seed {info['seed']}, final loss "
                f"{info['final_loss']:.4f})" if info else "") + ". "
             f"{s['scenes']} held-out scenes ({s['seeds']}) with 2-3 objects each are generated from their captions "
             f"({s['num_inference_steps']} DDIM steps, guidance {s['guidance_scale']}) with "
             f"`attncap.capture(pipe, relations=\"image->text\", layers=\"{s['layers']}\", steps=\"{s['steps']}\")`; "
             "each object is segmented in the generated image by its pure colour, and the token map of its colour "
             "word and of its shape word (cond branch, heads averaged, all layers and steps, resized to 32x32) is "
             f"binarised with {'Otsu' if s['threshold'] == 'otsu' else s['threshold']} and scored by IoU with the "
             "object's mask. Control: the same binary map against another object of the scene.", "",
             *([f"The model was trained with an auxiliary loss (weight {info['attn_loss']}) that pulls each colour and "
                "shape word's cross-attention towards its object (`--attn-loss`, see attncap/demo_model/train.py), "
                "besides the diffusion loss: this benchmark checks that capture finds that grounding in generated "
                "images of unseen captions, not that grounding emerges unaided.", ""]
               if info.get("attn_loss") else []),
             "| word class | mean IoU | control IoU (another object) | words scored |",
             "|---|---|---|---|",
             f"| colour words | {s['iou_colour']:.3f} | {s['control_iou_colour']:.3f} | "
             f"{sum(r.word_class == 'colour' for r in result.rows)} |",
             f"| shape words | {s['iou_shape']:.3f} | {s['control_iou_shape']:.3f} | "
             f"{sum(r.word_class == 'shape' for r in result.rows)} |",
             f"| all | {s['iou_all']:.3f} | | {len(result.rows)} |", "",
             f"Objects drawn: {s['objects_found']} of {s['objects']} (an object counts as drawn when at least "
             f"{MIN_PIXELS} pixels of its colour appear; missing ones are not scored). Wall time {s['seconds']:.0f} s.",
             ""]
    return "\n".join(lines)


def save_figure(scenes, images: np.ndarray, store, path: str | Path, threshold: str = "otsu",
                max_scenes: int = 6) -> Path:
    """A grid: per scene the generated image, then each caption word's map (colour and shape words)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_scenes, len(scenes))
    cols = 1 + 2 * max(len(s.objects) for s in scenes[:n])
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for b in range(n):
        axes[b, 0].imshow(images[b])
        axes[b, 0].set_title(scenes[b].caption.replace(" and ", "\n"), fontsize=6)
        words = [w for o in scenes[b].objects for w in (o.colour, o.shape)]
        for j, w in enumerate(words, start=1):
            heat = store.token_map(w, size=images.shape[1:3], batch=b).numpy()
            axes[b, j].imshow(heat, cmap="inferno")
            axes[b, j].contour(binarise(heat, threshold), levels=[0.5], colors="cyan", linewidths=0.6)
            axes[b, j].set_title(w, fontsize=7)
        for ax in axes[b]:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["COLOURS", "SHAPES", "GroundingResult", "evaluate", "generate_with_maps", "score", "otsu_threshold",
           "binarise", "iou", "caption_objects", "score_image", "results_section", "save_figure", "environment", "heldout_seeds"]
