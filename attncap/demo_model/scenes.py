"""Synthetic scenes for the embedded demo model: pure-coloured shapes on a plain grey background.

    >>> s = make_scene(7)                       # seeded: the same seed gives the same scene
    >>> s.caption                               # 'a blue triangle and a red circle'
    >>> s.image.shape, s.image.dtype            # (32, 32, 3) float32 in [0, 1]
    >>> [(o.colour, o.shape, int(o.mask.sum())) for o in s.objects]

Every object of a scene has its own colour and its own shape, so each caption word names exactly
one object and an object is recovered from a (generated) image by its colour alone
(``segment_colour``). The caption mentions the objects in a random order, not left to right.

Seeds: training draws scenes from seeds below HELDOUT_SEED; the grounding benchmark and the tests
use seeds from HELDOUT_SEED up, which training never sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (0.5, 0.5, 0.5)
SIZE = 32
MIN_SIDE, MAX_SIDE = 9, 15   # side of an object's bounding box in pixels (at SIZE 32; scaled with size)
HELDOUT_SEED = 1_000_000_000


@dataclass
class SceneObject:
    colour: str
    shape: str
    mask: np.ndarray              # bool [H, W]
    box: tuple[int, int, int, int]  # top, left, height, width


@dataclass
class Scene:
    image: np.ndarray             # float32 [H, W, 3] in [0, 1]
    objects: list[SceneObject] = field(default_factory=list)
    caption: str = ""
    seed: int | None = None

    def mask_of(self, word: str) -> np.ndarray:
        """The mask of the object a colour or shape word names."""
        for o in self.objects:
            if word in (o.colour, o.shape):
                return o.mask
        raise KeyError(f"no object in {self.caption!r} is named {word!r}")


def shape_mask(shape: str, top: int, left: int, side: int, size: int) -> np.ndarray:
    """bool [size, size]: a circle, square or (upright) triangle filling the box at (top, left)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    y, x = yy - top, xx - left
    inside = (y >= 0) & (y <= side) & (x >= 0) & (x <= side)
    if shape == "square":
        return inside
    if shape == "circle":
        r = side / 2
        return (y - r) ** 2 + (x - r) ** 2 <= r * r
    if shape == "triangle":
        return inside & (np.abs(x - side / 2) <= y / 2 + 0.25)
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def caption_of(objects: list[tuple[str, str]]) -> str:
    return " and ".join(f"a {c} {s}" for c, s in objects)


def make_scene(seed: int, size: int = SIZE, objects: int | tuple[int, int] = (2, 3)) -> Scene:
    """A seeded scene of ``objects`` shapes (an int, or an inclusive (min, max) range) with distinct
    colours and distinct shapes at non-overlapping positions (one pixel apart at least)."""
    lo, hi = (objects, objects) if isinstance(objects, int) else objects
    if not 1 <= lo <= hi <= len(SHAPES):
        raise ValueError(f"objects must lie in 1..{len(SHAPES)}; got {objects!r}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(lo, hi + 1))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    scale = size / SIZE
    min_side, max_side = max(3, round(MIN_SIDE * scale)), max(4, round(MAX_SIDE * scale))
    while True:  # rejection-sample non-overlapping boxes; shrink the size range if it gets crowded
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200):
            side = int(rng.integers(min_side, max_side + 1))
            top, left = (int(v) for v in rng.integers(1, size - side, size=2))
            if all(top + side + 1 < t or t + s + 1 < top or left + side + 1 < l or l + s + 1 < left
                   for t, l, s in boxes):
                boxes.append((top, left, side))
                if len(boxes) == n:
                    break
        if len(boxes) == n:
            break
        max_side = max(min_side, max_side - 1)
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    objs = []
    for colour, shape, (top, left, side) in zip(colours, shapes, boxes):
        mask = shape_mask(shape, top, left, side, size)
        image[mask] = COLOURS[colour]
        objs.append(SceneObject(colour, shape, mask, (top, left, side, side)))
    order = rng.permutation(n)
    caption = caption_of([(objs[i].colour, objs[i].shape) for i in order])
    return Scene(image, [objs[i] for i in order], caption, seed)


def segment_colour(image: np.ndarray, colour: str, max_distance: float = 0.45) -> np.ndarray:
    """bool [H, W]: pixels of a (generated) image [H, W, 3] in [0, 1] whose nearest colour among the
    palette and the background is ``colour``, within ``max_distance`` (Euclidean, RGB in [0, 1])."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3]; got shape {image.shape}")
    names = list(COLOURS) + ["background"]
    palette = np.array([COLOURS[c] for c in COLOURS] + [BACKGROUND], np.float32)
    dist = np.linalg.norm(image[:, :, None, :] - palette, axis=-1)  # [H, W, colours]
    nearest = dist.argmin(-1)
    k = names.index(colour)
    return (nearest == k) & (dist[..., k] < max_distance)


def batch(seeds, size: int = SIZE, objects: int | tuple[int, int] = (2, 3)):
    """(images float32 [B, 3, H, W] in [-1, 1] as numpy, captions) for a list of seeds."""
    scenes = [make_scene(int(s), size, objects) for s in seeds]
    images = np.stack([s.image.transpose(2, 0, 1) for s in scenes]) * 2.0 - 1.0
    return images.astype(np.float32), [s.caption for s in scenes]
