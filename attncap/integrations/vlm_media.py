"""Where each image's tokens sit in a VLM's language-model sequence, family by family.

A rule reads the inputs the model's ``get_image_features`` / ``get_video_features`` received (the
same in a plain forward and in generate(), which encodes the media before the first forward) and
the model's config, and returns one MediaItem per image (or per tile, for tiled families), in the
order the model places them. Each item says, token by token, which named piece its tokens belong
to: the image's patch grid, a thumbnail, newline / break / end tokens. Grids are row-major in the
order the model's own packing puts the features, after its reductions (merge, pixel shuffle,
pooling). A family without a rule gets no items: its media tokens become grid-less segments and the
capture warns (a wrong grid is worse than none).

Shape legend: N images (or tiles), C channels, H, W pixels, p patch size, (h, w) token grid.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Piece:
    """A named part of one medium: ``media`` pieces fill media-token positions (features), the others
    are tokens of their own ids that the model places inside the medium (Pixtral's [IMG_BREAK]).
    ``no_grid`` says why a medium's piece has no grid, ``no_layout`` why a tile's row and column in
    its image are not recorded (the capture warns with both)."""
    name: str
    grid: tuple[int, ...] | None = None
    tag: str | None = None
    media: bool = True
    no_grid: str | None = None
    no_layout: str | None = None  # why a tile's place among its image's tiles is not recorded (the capture warns)


@dataclass
class MediaItem:
    """One image / video (or tile): ``chunks`` are contiguous runs of the sequence, each a tensor of
    piece indices (one per token); text may sit between chunks (Qwen3-VL's frame timestamps)."""
    modality: str
    pieces: tuple[Piece, ...]
    chunks: tuple[torch.Tensor, ...]

    @property
    def media_count(self) -> int:
        """Media-token positions (feature rows) the item fills."""
        media = torch.tensor([p.media for p in self.pieces])
        return int(sum(int(media[c].sum()) for c in self.chunks))


def grid_item(modality: str, grid: tuple[int, ...], tag: str | None = None, chunks: int = 1) -> MediaItem:
    """A medium that is just its row-major grid (in ``chunks`` equal runs)."""
    n = math.prod(grid)
    per = n // chunks
    return MediaItem(modality, (Piece(modality, tuple(grid), tag),),
                     tuple(torch.zeros(per, dtype=torch.long) for _ in range(chunks)))


# ----------------------------------------------------------------------------------- the rules
def _vc(cfg) -> Any:
    return getattr(cfg, "vision_config", None)


def patch_side(p: Any) -> int | None:
    """A square patch size as an int (InternVL writes [14, 14]); None for anything else."""
    if isinstance(p, (list, tuple)) and len(set(p)) == 1:
        p = p[0]
    return p if isinstance(p, int) and not isinstance(p, bool) else None


def _patch(cfg) -> int | None:
    return patch_side(getattr(_vc(cfg), "patch_size", None))


def _strategy(cfg, inp) -> str:
    return inp.get("vision_feature_select_strategy") or getattr(cfg, "vision_feature_select_strategy", None) or "default"


def thw_rule(cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    """Qwen2-VL / 2.5-VL / 3-VL(-MoE), the Qwen2.5-Omni / Qwen3-Omni thinkers, GLM-4V, Kimi-K2.5:
    grid_thw [N, 3] of patches, merged by spatial_merge_size (or merge_kernel_size) blocks. Images (t = 1) get (h, w) grids,
    videos (t, h, w); a video whose frames the prompt separates (Qwen3-VL timestamps) is t chunks."""
    g = inp.get("image_grid_thw" if modality == "image" else "video_grid_thw", inp.get("grid_thw"))
    vc = _vc(cfg)
    merge = getattr(vc, "spatial_merge_size", None)
    kernel = getattr(vc, "merge_kernel_size", None)
    if not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[1] != 3:
        return None
    mh, mw = (merge, merge) if isinstance(merge, int) else tuple(kernel) if kernel else (None, None)
    if mh is None:
        return None
    items = []
    pooled_time = kernel is not None and merge is None  # Kimi pools its frames' time axis
    for t, h, w in g.tolist():
        hm, wm = h // mh, w // mw
        if t == 1 or pooled_time:
            items.append(grid_item(modality, (hm, wm)))
        else:
            items.append(grid_item(modality, (t, hm, wm), chunks=t))
    return items


def _reduction(cfg) -> float:
    """Tokens per patch side after the family's reduction (pixel shuffle / merge)."""
    for name, invert in (("downsample_factor", True), ("scale_factor", True), ("downsample_ratio", False)):
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return 1.0 / v if invert else float(v)
    r = getattr(_vc(cfg), "pixel_shuffle_ratio", None)  # Llama 4
    return float(r) if r else 1.0


def patch_rule(cfg, inp: dict, modality: str, tiles: bool = False) -> list[MediaItem] | None:
    """LLaVA, Aya Vision, InternVL, Gemma 3, PaliGemma, Llama 4, Idefics3, SmolVLM: each row of
    pixel_values [N, C, H, W] (5-D [B, N, ...] keeps only non-blank tiles, as Idefics3 does) is one
    image or tile on an (H/p, W/p) patch grid, reduced by the family's pixel shuffle / pooling.
    LLaVA's "full" strategy keeps the class token in front of the grid."""
    pv = inp.get("pixel_values")
    p = _patch(cfg)
    if modality != "image" or not isinstance(pv, torch.Tensor) or p is None or pv.dim() not in (4, 5):
        return None
    if pv.dim() == 5:  # [B, N, C, H, W]: tiles numbered within their batch element
        real = (pv != 0).flatten(2).any(2)
        tile = [(j, int(n)) for n in real.sum(1).tolist() for j in range(n)]
    else:
        tile = [(j, pv.shape[0]) for j in range(pv.shape[0])]
    gh, gw = pv.shape[-2] // p, pv.shape[-1] // p
    mm = getattr(cfg, "mm_tokens_per_image", None)
    if isinstance(mm, int):  # Gemma 3: average pooling to mm_tokens_per_image (a square)
        side = math.isqrt(mm)
        grid = (side, side) if side * side == mm else None
    else:
        r = _reduction(cfg)
        grid = (int(gh * r), int(gw * r)) if abs(gh * r - round(gh * r)) < 1e-6 else None
    if grid is None:
        return None
    cls = _strategy(cfg, inp) == "full" and getattr(cfg, "model_type", "") in ("llava", "vipllava") \
        and getattr(_vc(cfg), "model_type", "") == "clip_vision_model"
    items = []
    for j, n in tile:
        tag = f"tile {j} of {n}" if tiles else None
        item = grid_item("image", grid, tag)
        if cls:
            item = MediaItem("image", (Piece("cls"), item.pieces[0]),
                             (torch.cat([torch.zeros(1, dtype=torch.long), torch.ones(math.prod(grid), dtype=torch.long)]),))
        items.append(item)
    return items


def anyres_rule(model, cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    """LLaVA-NeXT / LLaVA-OneVision anyres: per image a base tile (g, g), then the high-resolution
    tiles stitched and unpadded by the model into one (h, w) grid with a newline token after each row.
    The layout comes from the model's own pack_image_features run on marker features (zeros, newline
    = 1), so unpadding and OneVision's downscaling are the model's."""
    sizes = inp.get("image_sizes")
    pack = getattr(model, "pack_image_features", None)
    module = sys.modules.get(type(model).__module__)
    to_tiles = getattr(module, "image_size_to_num_patches", None)
    vc = _vc(cfg)
    if modality != "image" or not isinstance(sizes, torch.Tensor) or pack is None or to_tiles is None:
        return None
    if (_strategy(cfg, inp) == "full") == (getattr(vc, "model_type", "") == "clip_vision_model"):
        return None  # a tile would not be its g x g patches (class token kept, or a patch dropped)
    g = vc.image_size // vc.patch_size
    params = inspect.signature(pack).parameters
    extra = {}
    if "vision_feature_select_strategy" in params:
        extra["vision_feature_select_strategy"] = "default"
    if "vision_aspect_ratio" in params:  # OneVision downscales large unpadded grids
        extra["vision_aspect_ratio"] = inp.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
    items = []
    for size in sizes:
        n = to_tiles(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=vc.image_size)
        (marks,), _ = pack([torch.zeros(n, g * g, 1)], size[None], image_newline=torch.ones(1), **extra)
        newline = marks[:, 0] == 1
        if n == 1:  # the base tile and one newline
            items.append(MediaItem("image", (Piece("image", (g, g)), Piece("image_newline")), (newline.long(),)))
            continue
        rows, hires = int(newline.sum()), int((~newline).sum()) - g * g
        if rows == 0 or hires <= 0 or hires % rows or bool(newline[:g * g].any()):
            return None
        piece = torch.where(newline, 2, 1)
        piece[:g * g] = 0
        pieces = (Piece("image", (g, g), "base"),
                  Piece("image", (rows, hires // rows), f"{n - 1} anyres tiles, stitched and unpadded"),
                  Piece("image_newline"))
        items.append(MediaItem("image", pieces, (piece,)))
    return items


def llava_video_rule(cfg, inp: dict) -> list[MediaItem] | None:
    """LLaVA-NeXT-Video / LLaVA-OneVision videos: pixel_values_videos [B, F, C, H, W], one video per
    batch element; every frame's (g, g) patches pooled per frame, frames one after another: NeXT-Video
    pools with kernel = stride = spatial_pool_stride (floor), OneVision interpolates to ceil(g / 2) and
    ends the video with one image_newline token."""
    pv = inp.get("pixel_values_videos")
    p = _patch(cfg)
    vc = _vc(cfg)
    if not isinstance(pv, torch.Tensor) or pv.dim() != 5 or p is None or pv.shape[-1] != pv.shape[-2]:
        return None
    if (_strategy(cfg, inp) == "full") == (getattr(vc, "model_type", "") == "clip_vision_model"):
        return None  # a frame would not be its g x g patches (class token kept, or a patch dropped)
    g, frames = pv.shape[-1] // p, pv.shape[1]
    if getattr(cfg, "model_type", None) == "llava_onevision":
        side = math.ceil(g / 2)
        n = frames * side * side
        piece = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(1, dtype=torch.long)])
        item = MediaItem("video", (Piece("video", (frames, side, side)), Piece("image_newline")), (piece,))
        return [item] * pv.shape[0]
    stride = getattr(cfg, "spatial_pool_stride", None)
    if not isinstance(stride, int) or stride < 1:
        return None
    return [grid_item("video", (frames, g // stride, g // stride)) for _ in range(pv.shape[0])]


def latents_rule(cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    """Idefics2: each real image (or crop) of pixel_values [B, N, C, H, W] (blank padding images dropped,
    as the model does) becomes perceiver_config.resampler_n_latents learned latents that a perceiver
    resampler filled: tokens with no position on the image, so the segment has no grid (and says why)."""
    pv = inp.get("pixel_values")
    n = getattr(getattr(cfg, "perceiver_config", None), "resampler_n_latents", None)
    if modality != "image" or not isinstance(pv, torch.Tensor) or pv.dim() != 5 or not isinstance(n, int):
        return None
    real = (pv != 0).flatten(2).any(2)
    why = "they are perceiver latents, which have no position on the image"
    return [MediaItem("image", (Piece("image", None, f"tile {j} of {int(k)}" if k > 1 else None, no_grid=why),),
                      (torch.zeros(n, dtype=torch.long),))
            for k in real.sum(1).tolist() for j in range(int(k))]


def phi4_rule(cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    """Phi-4-multimodal (its image embedding's inputs): image_pixel_values [B, 1 + crops, C, H, W] (a
    global view, then the crops), image_sizes [B, 2] in pixels, image_attention_mask [B, 1 + crops, h, w]
    over patches. Each of the B images is laid out by the model as: its crops stitched into one grid
    (rows x cols of (b, b) each, cut to the mask's useful size), a newline after each row, one separator
    (image_break), then the global view (b, b) with a newline after each row; b = patches per side / 2
    (2x2 average pooling, an odd side padded by one)."""
    pv, sizes, mask = inp.get("image_pixel_values"), inp.get("image_sizes"), inp.get("image_attention_mask")
    vc = _vc(cfg)
    p, side, crop = _patch(cfg), patch_side(getattr(vc, "image_size", None)), getattr(vc, "crop_size", None)
    if modality != "image" or not isinstance(pv, torch.Tensor) or pv.dim() != 5 or not isinstance(sizes, torch.Tensor) \
            or p is None or side is None or not isinstance(crop, int):
        return None
    n = side // p
    b = (n + n % 2) // 2
    items = []
    for i, (height, width) in enumerate(sizes.reshape(-1, 2).tolist()):
        rows, cols = int(height) // crop, int(width) // crop
        uh, uw = rows * b, cols * b
        if isinstance(mask, torch.Tensor):  # the useful part of the stitched crops, read as the model reads it
            m = mask[i, 1:rows * cols + 1, 0::2, 0::2].reshape(rows, cols, b, b).transpose(1, 2).reshape(uh, uw)
            uh, uw = int(m[:, 0].sum()), int(m[0, :].sum())
        crops = torch.cat([torch.zeros(uw, dtype=torch.long), torch.ones(1, dtype=torch.long)]).repeat(uh)
        glob = torch.cat([torch.full((b,), 3, dtype=torch.long), torch.full((1,), 4, dtype=torch.long)]).repeat(b)
        pieces = (Piece("image", (uh, uw), f"{rows}x{cols} crops, stitched"), Piece("image_newline"),
                  Piece("image_break", tag="between the crops and the global view"),
                  Piece("image", (b, b), "global view"), Piece("image_newline", tag="global view"))
        items.append(MediaItem("image", pieces, (torch.cat([crops, torch.tensor([2]), glob]),)))
    return items


def soft_tokens_rule(cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    """Gemma 3n: each image of pixel_values [N, C, H, W] is its tower's final [C, h, w] feature map, read
    row-major as vision_soft_tokens_per_image tokens, h == w (get_image_features reshapes it so)."""
    pv = inp.get("pixel_values")
    n = getattr(cfg, "vision_soft_tokens_per_image", None)
    if modality != "image" or not isinstance(pv, torch.Tensor) or pv.dim() != 4 or not isinstance(n, int):
        return None
    side = math.isqrt(n)
    return [grid_item("image", (side, side)) for _ in range(pv.shape[0])] if side * side == n else None


def _llava_next(model, cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    return anyres_rule(model, cfg, inp, modality) if modality == "image" else llava_video_rule(cfg, inp)


def pixtral_rule(cfg, inp: dict, modality: str) -> list[MediaItem] | None:
    """Mistral 3 / Pixtral: image_sizes [N, 2] in pixels, grid (H, W) / (patch * spatial_merge_size);
    each row of w [IMG] tokens ends with [IMG_BREAK], the last with [IMG_END] (ids of their own)."""
    sizes = inp.get("image_sizes")
    p = _patch(cfg)
    if modality != "image" or not isinstance(sizes, torch.Tensor) or p is None:
        return None
    unit = p * int(getattr(cfg, "spatial_merge_size", 1) or 1)
    items = []
    for hp, wp in sizes.tolist():
        h, w = int(hp) // unit, int(wp) // unit
        row = torch.cat([torch.zeros(w, dtype=torch.long), torch.ones(1, dtype=torch.long)])
        piece = row.repeat(h)
        piece[-1] = 2
        items.append(MediaItem("image", (Piece("image", (h, w)), Piece("image_break", media=False),
                                         Piece("image_end", media=False)), (piece,)))
    return items


def _is_pixtral(cfg) -> bool:
    return getattr(_vc(cfg), "model_type", None) == "pixtral"


# ----------------------------------------------------------------------------------- tile arrangements
def token_runs(row: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """(start, stop) of every maximal run of ``token`` in the 1-D ``row``."""
    edge = torch.cat([row.new_zeros(1), (row == token).long(), row.new_zeros(1)]).diff()
    return list(zip((edge == 1).nonzero().flatten().tolist(), (edge == -1).nonzero().flatten().tolist()))


# An image's tiles: (rows, cols) of tiles, then its global view; None: one view, not split.
Arrangement = tuple[int, int] | None


def _one_place_per_tag(tags: list[list[int]], arrangements: list[Arrangement]) -> bool:
    """A separator / tag id stands for one place (row, col) and a place for one id, over every image."""
    place, tag = {}, {}
    for ids, arr in zip(tags, arrangements):
        for j, t in enumerate(ids):
            where = divmod(j, arr[1]) if arr else None
            if place.setdefault(t, where) != where or tag.setdefault(where, t) != t:
                return False
    return True


def idefics3_arrangement(row: torch.Tensor, runs: list[tuple[int, int]], cfg) -> tuple[list[Arrangement], str | None]:
    """Idefics3 / SmolVLM processors: a split image is, row after row, ``<fake_token_around_image>
    <row_r_col_c>`` and a tile's image tokens, a newline after each row of tiles, then ``\n<fake_token_around_image>
    <global-img>``, the global view's tokens and ``<fake_token_around_image>``; an image that is not split
    is only that last part. Those ids are in no config, so the structure is read instead: one shared id
    (the fake token) then a tag before every run; a run followed by the fake token and, 2 tokens on, the
    next run goes on in its row; a run followed by another token (the newline) ends a row; any other run
    is its image's global view. The global views share one tag; each other tag is one (row, col).
    Returns per image its arrangement, or why the prompt does not say it."""
    if not runs or runs[0][0] < 2:
        return [], "an image-token run lacks the two tokens the processor writes before it"
    fake = {int(row[s - 2]) for s, _ in runs}
    if len(fake) != 1:
        return [], "the token two before each image-token run is not one shared id (<fake_token_around_image>)"
    fake = fake.pop()
    flags = []
    for k, (s, e) in enumerate(runs):
        after = int(row[e]) if e < row.numel() else None
        nxt = runs[k + 1][0] if k + 1 < len(runs) else None
        flags.append("next" if after == fake and nxt == e + 2 else
                     "row" if after not in (None, fake) and nxt is not None else "end")
    tags = [int(row[s - 1]) for s, _ in runs]
    views = {t for t, f in zip(tags, flags) if f == "end"}
    if len(views) != 1 or flags[-1] != "end":
        return [], "the images' global views do not share one tag (<global-img>) or the last run is not one"
    out, tile_tags, first = [], [], 0
    for k in (k for k, f in enumerate(flags) if f == "end"):
        tiles, ids = flags[first:k], tags[first:k]
        first = k + 1
        rows = tiles.count("row")
        cols = len(tiles) // rows if rows else 0
        if tiles and (rows * cols != len(tiles) or tiles != (["next"] * (cols - 1) + ["row"]) * rows or views & set(ids)):
            return [], f"image {len(out)}'s {len(tiles)} tiles do not end a row every same number of tiles"
        out.append((rows, cols) if tiles else None)
        tile_tags.append(ids)
    if not _one_place_per_tag(tile_tags, out):
        return [], "a <row_r_col_c> tag would stand for two places (or a place for two tags)"
    return out, None


def llama4_arrangement(row: torch.Tensor, runs: list[tuple[int, int]], cfg) -> tuple[list[Arrangement], str | None]:
    """Llama 4's processor: ``<|image_start|>``, for a split image rows of tiles (a tile's patch tokens,
    ``<|tile_x_separator|>`` between the tiles of a row, ``<|tile_y_separator|>`` after each row), then
    ``<|image|>``, the global view's patch tokens and ``<|image_end|>``. The start and end ids are in
    the config (boi_token_index, eoi_token_index), the separators' are not: the y separator is the
    first of the two tokens before the global view, the x separator the one other id between tiles
    (both the same in every image). Returns per image its arrangement, or why the prompt does not say it."""
    boi, eoi = getattr(cfg, "boi_token_index", None), getattr(cfg, "eoi_token_index", None)
    if not isinstance(boi, int) or not isinstance(eoi, int):
        return [], "its config has no boi_token_index / eoi_token_index"
    opened, closed = (row == boi).nonzero().flatten(), (row == eoi).nonzero().flatten()
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in runs:
        i = int((opened < s).sum()) - 1
        if i < 0 or int((closed < s).sum()) != i or int((closed < e).sum()) != i or e >= row.numel():
            return [], "an image-token run is not inside an <|image_start|> ... <|image_end|> span"
        groups.setdefault(i, []).append((s, e))
    out, seps, tile_tags = [], {}, []
    for i in sorted(groups):
        g = groups[i]
        if len(g) == 1:
            out.append(None)
            tile_tags.append([])
            continue
        gaps = [g[k + 1][0] - g[k][1] for k in range(len(g) - 1)]
        ids = [int(row[g[k][1]]) for k in range(len(g) - 1)]
        y = ids[-1]
        rows = 1 + ids[:-1].count(y)
        cols = (len(g) - 1) // rows
        x = {t for t in ids[:-1] if t != y}
        pattern = [y if (k + 1) % cols == 0 else "x" for k in range(len(g) - 2)]
        if gaps[-1] != 2 or any(d != 1 for d in gaps[:-1]) or rows * cols != len(g) - 1 or len(x) > 1 or \
                [t if t == y else "x" for t in ids[:-1]] != pattern or seps.setdefault("y", y) != y or \
                (x and seps.setdefault("x", min(x)) != min(x)):
            return [], f"image {len(out)}'s tiles are not rows separated by one shared <|tile_y_separator|> id"
        out.append((rows, cols))
    return out, None


def _tile_tag(j: int, arrangement: Arrangement) -> str | None:
    if arrangement is None:
        return None
    rows, cols = arrangement
    n = rows * cols
    return "global view" if j == n else f"tile {j} of {n}: row {j // cols}, col {j % cols} of {rows}x{cols}"


def _retag(item: MediaItem, tag: str | None = None, no_layout: str | None = None, keep: bool = False) -> MediaItem:
    pieces = tuple(dataclasses.replace(p, tag=p.tag if keep else tag, no_layout=no_layout) for p in item.pieces)
    return MediaItem(item.modality, pieces, item.chunks)


def _numbered(i: int, m: int, tag: str | None) -> str | None:
    """"image i of m, " before a tag when the prompt holds several images."""
    if m < 2:
        return tag
    return f"image {i} of {m}" + (f", {tag}" if tag else "")


# model_type -> the structure its processor gives each image's tiles in input_ids
ARRANGEMENTS: dict[str, Callable] = {"idefics3": idefics3_arrangement, "smolvlm": idefics3_arrangement,
                                     "llama4": llama4_arrangement}
NOT_IN_INPUTS = {
    "internvl": "InternVL's processor picks each image's tile arrangement (and whether a thumbnail follows) "
                "from the original image size, which the model does not receive",
    "aya_vision": "Aya Vision's processor picks each image's tile arrangement from the original image size, which "
                  "the model does not receive (and marks tiles with plain text, no ids in the config)",
}


def arrange_tiles(kind: str, cfg, items: list[MediaItem], input_ids: torch.Tensor | None) -> list[MediaItem]:
    """Each tile item of a tiled family tagged with its place in its image, read from the structure the
    family's processor gives input_ids [B, L] (items: every tile of the batch, element after element):
    "tile 3 of 6: row 1, col 0 of 2x3", "global view", "image 1 of 2, ..." when a prompt holds several
    images. Where the prompt does not say it, the items keep their tags and say why (no_layout)."""
    if kind in NOT_IN_INPUTS:
        why = NOT_IN_INPUTS[kind]
        token = getattr(cfg, "image_token_id", None)
        per_tile = {it.media_count for it in items}
        if kind != "internvl" or input_ids is None or len(per_tile) != 1:
            return [_retag(it, no_layout=why, keep=True) for it in items]
        # InternVL writes each image as one run of its tiles' tokens: the tiles of each image are known.
        size, out = per_tile.pop(), []
        for row in input_ids:
            runs = token_runs(row, token)
            for i, (s, e) in enumerate(runs):
                n = (e - s) // size
                out += [(i, len(runs), f"tile {j} of {n}" if n > 1 else None) for j in range(n)]
        if len(out) != len(items) or sum(e - s for row in input_ids for s, e in token_runs(row, token)) != size * len(items):
            return [_retag(it, no_layout=why, keep=True) for it in items]
        return [_retag(it, _numbered(i, m, tag), no_layout=why) for it, (i, m, tag) in zip(items, out)]
    parse = ARRANGEMENTS.get(kind)
    if parse is None:
        return items
    if input_ids is None:
        return [_retag(it, no_layout="the prompt's input_ids were not seen with its images", keep=True) for it in items]
    token = getattr(cfg, "image_token_id", None)
    tags, why = [], None
    for b, row in enumerate(input_ids):
        runs = token_runs(row, token)
        arrangements, why = parse(row, runs, cfg)
        if why is not None:
            why = f"prompt {b}: {why}"
            break
        k = 0
        for i, arr in enumerate(arrangements):
            for j in range(1 if arr is None else arr[0] * arr[1] + 1):
                tags.append((i, len(arrangements), _tile_tag(j, arr), runs[k][1] - runs[k][0] if k < len(runs) else None))
                k += 1
    if why is None and (len(tags) != len(items) or any(n != it.media_count for (_, _, _, n), it in zip(tags, items))):
        why = f"the prompt's image-token runs ({len(tags)}) are not the {len(items)} tiles of pixel_values"
    if why is not None:
        return [_retag(it, no_layout=why, keep=True) for it in items]
    return [_retag(it, _numbered(i, m, tag)) for it, (i, m, tag, _) in zip(items, tags)]


# Families whose processors write a video's frames with the image token (and whose forward takes images
# or a video, not both): a call with video inputs only places its video items at the image tokens.
VIDEO_IN_IMAGE_TOKENS = ("glm4v", "glm4v_moe")

# model_type -> rule(model, cfg, inputs, modality)
RULES: dict[str, Callable] = {
    **{t: (lambda m, c, i, mod: thw_rule(c, i, mod)) for t in (
        "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen2_5_omni_thinker",
        "qwen3_omni_moe_thinker", "kimi_k25")},
    **{t: (lambda m, c, i, mod: patch_rule(c, i, mod)) for t in ("llava", "vipllava", "gemma3", "paligemma")},
    **{t: (lambda m, c, i, mod: patch_rule(c, i, mod, tiles=True)) for t in (
        "aya_vision", "internvl", "llama4", "idefics3", "smolvlm")},
    **{t: _llava_next for t in ("llava_next", "llava_onevision", "llava_next_video")},
    "mistral3": lambda m, c, i, mod: pixtral_rule(c, i, mod),
    "idefics2": lambda m, c, i, mod: latents_rule(c, i, mod),
    "phi4_multimodal": lambda m, c, i, mod: phi4_rule(c, i, mod),
    "gemma3n": lambda m, c, i, mod: soft_tokens_rule(c, i, mod),
}


def media_items(model: torch.nn.Module, cfg, inputs: dict, modality: str,
                input_ids: torch.Tensor | None = None) -> list[MediaItem] | None:
    """The items of one modality from a ``get_<modality>_features`` call's inputs and the prompt's
    input_ids [B, L] (tiled families read their tile arrangement there); None: no rule."""
    kind = getattr(cfg, "model_type", None)
    if kind == "llava" and _is_pixtral(cfg):
        return pixtral_rule(cfg, inputs, modality)
    rule = RULES.get(kind)
    if rule is None:
        return None
    items = rule(model, cfg, inputs, modality)
    if items is None or modality != "image":
        return items
    return arrange_tiles(kind, cfg, items, None if input_ids is None else input_ids.detach().cpu())
