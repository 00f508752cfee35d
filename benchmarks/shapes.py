"""Benchmark shapes (real model attention calls and their CPU-scaled stand-ins) and capture tasks.

Shape legend: B batch (one classifier-free-guidance branch, so 1), H query heads (= key heads),
Nq queries, Nk keys, D head dim. Image/video tokens lie row-major on ``grid`` ((h, w) or (t, h, w)).
Kinds: "self" (image->image, Nq = Nk = tokens of the grid), "cross" (image->text, Nk = text tokens),
"joint" (one sequence [text, image] as in Flux: Nq = Nk = text + image tokens).

Tasks, each a MapRequest over the image queries (normalised over ALL keys, heads averaged):
    head_mean_map          map [B, 1, image queries, keys of the relation], unpooled
    pooled_map             map pooled 4 on (h, w) grids, (1, 4, 4) on (t, h, w) grids, both axes
                           where the keys are image tokens too (self, joint), queries only for cross
    token_maps             tokens [B, 1, image queries, Ks]: 8 (CLIP) or 16 (T5) selected text keys
    colsum                 colsum [B, 1, Nk]: attention each key receives from the image queries
    entropy                entropy [B, 1, image queries] in nats
    peak                   peak [B, 1, image queries]: each query's largest probability
    rows                   rows [B, 1, 16, keys of the relation]: full rows of 16 image queries
    pooled+colsum+entropy  pooled_map plus colsum and entropy: the main capture of one call
    everything             every product at once: pooled map, token columns (where the shape has
                           selected keys), 16 rows, colsum, entropy and peak
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from attncap import MapRequest
from attncap.request import DEFAULT_MAX_BYTES

MAIN = "pooled+colsum+entropy"
TASKS = ("head_mean_map", "pooled_map", "token_maps", "colsum", "entropy", "peak", "rows", MAIN, "everything")
ROWS = 16  # query rows of the rows task, evenly spaced over the image queries


@dataclass(frozen=True)
class Shape:
    name: str
    model: str          # what the call is in the real model
    kind: str           # "self", "cross" or "joint"
    H: int
    D: int
    grid: tuple[int, ...]
    text: int = 0       # text tokens: the keys of "cross", the prefix of a "joint" sequence
    selected: int = 0   # text keys picked for token_maps (0: no token_maps task)
    B: int = 1
    tasks: tuple[str, ...] = TASKS

    @property
    def image(self) -> int:
        return math.prod(self.grid)

    @property
    def Nq(self) -> int:
        return self.image + (self.text if self.kind == "joint" else 0)

    @property
    def Nk(self) -> int:
        return {"self": self.image, "cross": self.text, "joint": self.Nq}[self.kind]

    def describe(self) -> str:
        grid = "x".join(map(str, self.grid))
        keys = {"self": "", "cross": f" x {self.text} text", "joint": f" + {self.text} text"}[self.kind]
        return f"{self.model}: B={self.B} H={self.H} {grid}={self.image} image{keys} tokens, D={self.D}"


REAL = {s.name: s for s in (
    Shape("sd15_self", "SD 1.5 64x64 latent self-attn", "self", 8, 40, (64, 64)),
    Shape("sd15_cross", "SD 1.5 64x64 latent cross-attn", "cross", 8, 40, (64, 64), text=77, selected=8),
    Shape("sdxl_cross", "SDXL 128x128 latent cross-attn", "cross", 10, 64, (128, 128), text=77, selected=8),
    Shape("flux_joint", "Flux 1024px joint attn", "joint", 24, 128, (64, 64), text=512, selected=16),
    Shape("wan480_self", "WAN 2.1 14B 480p self-attn", "self", 40, 128, (21, 30, 52)),
    Shape("wan480_cross", "WAN 2.1 14B 480p cross-attn", "cross", 40, 128, (21, 30, 52), text=512, selected=16),
    Shape("wan720_self", "WAN 2.1 14B 720p self-attn", "self", 40, 128, (21, 45, 80)),
    # The reference shapes of the torch path's target (at most 2x SDPA alone for every product).
    Shape("ref_h8_n2048", "reference self-attn, 32x64 grid", "self", 8, 64, (32, 64), selected=16),
    Shape("ref_h24_n4096", "reference self-attn, 64x64 grid", "self", 24, 64, (64, 64), selected=16),
)}

# CPU stand-ins: fewer heads, a smaller grid with the real aspect, the real head dim. Each timed call
# takes well under 2 s on 2 cores except wan720_self: it is the one shape big enough for the
# probability tensor (1 GiB) to dwarf the 256 MiB workspaces of the chunked paths, so it runs only
# the main task. Besides these, "wan_self_N" points (WAN 720p aspect, H=1) feed the plot.
CPU = {s.name: s for s in (
    replace(REAL["sd15_self"], H=2, grid=(48, 48)),
    replace(REAL["sd15_cross"], H=4),
    replace(REAL["sdxl_cross"], H=2, grid=(64, 64)),
    replace(REAL["flux_joint"], H=2, grid=(32, 32), text=128),
    replace(REAL["wan480_self"], H=1, grid=(7, 15, 26)),
    replace(REAL["wan480_cross"], H=1, grid=(7, 15, 26)),
    replace(REAL["wan720_self"], H=1, grid=(7, 36, 64), tasks=(MAIN,)),
    REAL["ref_h8_n2048"],
    REAL["ref_h24_n4096"],
)}
SWEEP = {f"wan_self_{math.prod(g)}": replace(REAL["wan720_self"], name=f"wan_self_{math.prod(g)}", H=1, grid=g,
                                              model="WAN 720p-aspect self-attn sweep", tasks=(MAIN,))
         for g in ((4, 9, 16), (4, 27, 48))}


def shapes_for(device: str) -> list[tuple[Shape, str]]:
    """(shape to run, scaled_from) for a device: real shapes on CUDA, CPU stand-ins on CPU."""
    if device == "cuda":
        return [(s, "not scaled") for s in REAL.values()]
    rows = []
    for name, s in CPU.items():
        rows.append((s, "not scaled" if s == REAL[name] else REAL[name].describe()))
    rows += [(s, REAL["wan720_self"].describe()) for s in SWEEP.values()]
    return rows


def real_shape(shape: Shape) -> Shape:
    """The real shape a (possibly scaled) shape stands for."""
    return REAL.get(shape.name, REAL["wan720_self"])


def request_for(task: str, shape: Shape) -> MapRequest | str:
    """The MapRequest of ``task`` at ``shape``, or a string saying why the task does not apply."""
    image = (shape.Nq - shape.image, shape.Nq)  # the image segment (all queries unless joint)
    pool = 4 if len(shape.grid) == 2 else (1, 4, 4)
    if shape.kind == "cross":
        keys = dict(key_range=(0, shape.Nk))
    else:  # self, joint: the image->image block, pooled like the queries
        keys = dict(key_range=image, key_grid=shape.grid, key_pool=pool)
    queries = dict(query_range=image, query_grid=shape.grid)
    pooled = dict(queries, query_pool=pool, **keys)
    if task == "head_mean_map":
        real = real_shape(shape)
        map_bytes = real.B * real.image * (real.image if real.kind != "cross" else real.text) * 4
        if map_bytes > DEFAULT_MAX_BYTES:
            return f"the real map would be {map_bytes / 2**30:.1f} GiB (over max_bytes); pool it instead"
        return MapRequest(heads="mean", map=True, query_range=image, key_range=keys["key_range"])
    if task == "pooled_map":
        return MapRequest(heads="mean", map=True, **pooled)
    selected = tuple(range(1, 1 + shape.selected)) if shape.selected else None
    if task == "token_maps":
        if not shape.selected:
            return "no text keys in self-attention"
        return MapRequest(heads="mean", query_range=image, keys=selected)
    rows = tuple(range(image[0], image[1], max(1, (image[1] - image[0]) // ROWS)))[:ROWS]
    if task == "rows":
        return MapRequest(heads="mean", queries=rows, key_range=keys["key_range"])
    if task == "peak":
        return MapRequest(heads="mean", query_range=image, stats=("peak",))
    if task == "everything":
        return MapRequest(heads="mean", map=True, keys=selected, queries=rows, stats=("colsum", "entropy", "peak"),
                          **pooled)
    if task == "colsum":
        return MapRequest(heads="mean", query_range=image, stats=("colsum",))
    if task == "entropy":
        return MapRequest(heads="mean", query_range=image, stats=("entropy",))
    if task == MAIN:
        return MapRequest(heads="mean", map=True, stats=("colsum", "entropy"), **pooled)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
