"""Token layouts of transformers vision-language models: where the text, image and video tokens of
a call are, and on which patch grid (used by attncap.integrations.transformers).

TokenSequence   the language model's sequence: the media items of attncap.integrations.vlm_media placed
                at the media token ids of input_ids (one segment per named piece: grid, thumbnail,
                newline, break; one "audio" segment per run of audio tokens), text everywhere else,
                grown by one token per generated step.
MergeTower      Qwen2-VL / Qwen2.5-VL vision towers: one attention call per frame (per window in
                Qwen2.5-VL's window blocks), rows in the spatial-merge block (and window) order,
                reordered to row-major on the frame's (h, w) or the window's patch grid.
PatchTower      CLIP / SigLIP towers (LLaVA-style): [cls] + the (H/patch, W/patch) grid.
TileTower       Mllama's tiled tower, and the tile layout of its cross-attention keys.
AudioTower      audio encoders (Qwen-Omni): each call is one "audio" segment.
perceiver_layout  Idefics2's perceiver resampler: latents over [image patches on the tower's grid, latents].
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..session import CallLayout, Segment
from .vlm_media import MediaItem, patch_side

if TYPE_CHECKING:  # the towers call back into the capture that owns them
    from .transformers import TransformersCapture

MEDIA = ("image", "video", "audio")  # audio tokens (Qwen-Omni thinkers) are a time sequence: no grid


class TokenSequence:
    """Which segment every position of the language model's running sequence belongs to.

    segid [B, L]: 0 text, j >= 1 segment segments[j - 1] = (name, token count, grid, tag), numbered in
    the order the segments start; shared by the batch when every element has the same media structure.
    """

    def __init__(self, segid: torch.Tensor, segments: list[tuple[str, int | None, tuple | None, str | None]]):
        self.segid = segid
        self.segments = segments

    @property
    def length(self) -> int:
        return self.segid.shape[1]

    @staticmethod
    def start(input_ids: torch.Tensor, token_ids: dict[str, int | None],
              items: dict[str, list[MediaItem] | None]) -> tuple["TokenSequence", list[str]]:
        """The sequence of ``input_ids`` [B, L] with each modality's items placed in order (items are
        for the whole batch, element after element). Returns it and what could not be placed."""
        ids = input_ids.detach().cpu()
        kinds = torch.zeros_like(ids)
        for code, name in enumerate(MEDIA, 1):
            if token_ids.get(name) is not None:
                kinds[ids == token_ids[name]] = code
        queues = {name: list(items.get(name) or ()) for name in MEDIA}
        rows, structures, problems = [], [], []
        for b in range(ids.shape[0]):
            row, segs = _place(kinds[b], queues, problems)
            rows.append(row)
            structures.append(segs)
        left = {name: len(q) for name, q in queues.items() if q}
        if left:
            problems.append(f"{left} media items found no tokens of theirs in input_ids")
        untagged = [[seg[:3] for seg in s] for s in structures]
        if all(u == untagged[0] for u in untagged):
            # The same layout in every element; a tag (tile 3 of 4) is kept where all elements agree.
            tags = [t[0] if len(set(t)) == 1 else None for t in zip(*[[seg[3] for seg in s] for s in structures])]
            return TokenSequence(torch.stack(rows), [u + (t,) for u, t in zip(untagged[0], tags)]), problems
        # Different media per element: one segment per modality, no grid (a call is captured only if
        # the counts agree).
        problems.append("the batch elements lay their media out differently (capture one prompt at a time for grids)")
        return TokenSequence(kinds.clone(), [(name, None, None, None) for name in MEDIA]), problems

    def extend(self, n: int) -> None:
        self.segid = torch.cat([self.segid, self.segid.new_zeros(self.segid.shape[0], n)], 1)

    def axis(self, start: int, stop: int) -> tuple[tuple[Segment, ...], torch.Tensor | None] | None:
        """Segments of positions start:stop and the per-element order that makes them contiguous."""
        sid = self.segid[:, start:stop]
        nseg = len(self.segments) + 1
        counts = torch.stack([torch.bincount(r, minlength=nseg) for r in sid])
        if not bool((counts == counts[0]).all()):
            return None
        order = torch.argsort(sid, dim=1, stable=True)
        identity = bool((order == torch.arange(sid.shape[1])).all())
        segs, pos = [], 0
        for j, c in enumerate(counts[0].tolist()):
            if c == 0:
                continue
            name, full, grid, tag = ("text", None, None, None) if j == 0 else self.segments[j - 1]
            segs.append(Segment(name, pos, pos + c, grid if full == c else None, tag))
            pos += c
        return tuple(segs), None if identity else order


def _place(kinds: torch.Tensor, queues: dict[str, list[MediaItem]], problems: list[str]) -> tuple[torch.Tensor, list]:
    """Segment ids of one batch element: the queued items placed at the media tokens, in order; a
    media run no item fits becomes one grid-less segment (and a problem). An item's chunks may have
    other media between them (Qwen-Omni's use_audio_in_video interleaves a video's frames with audio
    runs): the scan goes on at the first media token nothing holds yet."""
    segid = torch.zeros_like(kinds)
    segs: list[list] = []  # [name, count, grid, tag]
    pos, n = 0, kinds.numel()
    while pos < n:
        free = ((kinds[pos:] != 0) & (segid[pos:] == 0)).nonzero()
        if free.numel() == 0:
            break
        pos += int(free[0])
        code = int(kinds[pos])
        name = MEDIA[code - 1]
        queue = queues[name]
        if queue:
            if _place_item(queue[0], kinds, code, pos, segid, segs) is not None:
                queue.pop(0)
                continue
            problems.append(f"a {name} at position {pos} does not have the token layout its inputs describe")
            queue.clear()
        same = (kinds[pos:] != code) | (segid[pos:] != 0)
        run_end = pos + (int(same.nonzero()[0]) if bool(same.any()) else n - pos)
        segs.append([name, run_end - pos, None, None])
        segid[pos:run_end] = len(segs)
        pos = run_end
    out = []
    for name, count, grid, tag in segs:
        out.append((name, count, grid if grid is not None and math.prod(grid) == count else None, tag))
    return segid, out


def _place_item(item: MediaItem, kinds: torch.Tensor, code: int, pos: int, segid: torch.Tensor,
                segs: list[list]) -> int | None:
    """Place ``item`` from position ``pos``; the end position, or None (nothing written) if it does not fit."""
    media = torch.tensor([p.media for p in item.pieces])
    spans, p = [], pos
    for i, chunk in enumerate(item.chunks):
        if i:  # text may separate chunks: go on at the next media token
            nxt = (kinds[p:] == code).nonzero()
            if nxt.numel() == 0:
                return None
            p += int(nxt[0])
        if p + chunk.numel() > kinds.numel() or not torch.equal(kinds[p:p + chunk.numel()] == code, media[chunk]):
            return None
        spans.append((p, chunk))
        p += chunk.numel()
    first = len(segs) + 1
    used = sorted(set(torch.cat(item.chunks).tolist()), key=lambda j: min(
        int(s + (c == j).nonzero()[0]) for s, c in spans if bool((c == j).any())))
    number = {j: first + k for k, j in enumerate(used)}  # segments numbered by where they start
    for j in used:
        piece = item.pieces[j]
        segs.append([piece.name, 0, piece.grid, piece.tag])
    for s, chunk in spans:
        ids = torch.tensor([number[j] for j in chunk.tolist()])
        segid[s:s + chunk.numel()] = ids
        for j in chunk.unique().tolist():
            segs[number[j] - 1][1] += int((chunk == j).sum())
    return p


def perceiver_layout(context: int | None, nq: int, nk: int, tower) -> tuple[CallLayout, str | None]:
    """A perceiver resampler's call (Idefics2): its queries are the latents, its keys the context it
    resamples then the latents again (Idefics2 concatenates [context, latents]). The context is the
    vision tower's patches: on the tower's patch grid when the tower that just ran holds one image
    grid of that many patches (masked padding patches keep their cells), else without a grid. Returns
    the layout and what could not be known (None when nothing)."""
    latents = Segment("latents", 0, nq)
    if context is None or nk != context + nq:
        return CallLayout((latents,), (Segment("tokens", 0, nk),)), \
            f"its keys ({nk}) are not its context ({context}) and its {nq} latents; they are one 'tokens' segment"
    grids = getattr(tower, "grids", None) or []
    grid = grids[0] if len(grids) == 1 and grids[0][0] * grids[0][1] == context else None
    keys = (Segment("image", 0, context, grid), Segment("latents", context, nk))
    problem = None if grid is not None else \
        f"the {context} image patches it resamples have no known grid (the vision tower's grid is {grids or None})"
    return CallLayout((latents,), keys), problem


# ----------------------------------------------------------------------------------- vision towers
class MergeTower:
    """Qwen2-VL / Qwen2.5-VL vision tower: patches of each frame in merge-block order (and, for
    Qwen2.5-VL, window order). A full-attention block calls attention once per frame (cu_seqlens):
    one segment on the frame's (h, w) patch grid. A Qwen2.5-VL window block calls it once per window
    (cu_window_seqlens): one segment on the window's own (rows, cols) patch grid, tagged with where the
    window lies on its frame ("window 2 of 6: rows 0:4, cols 8:12 of (8, 12)"). When the call holds
    several images or videos (or a video several frames), tags start with which ("image 1 of 3, ",
    "video 0 of 2, frame 1 of 4, "); a full-attention frame is tagged with that alone. Rows of both are put
    in row-major order. Kimi-K2.5's tower is the same with row-major patches (it merges after the tower).

    Shape legend: n tokens of the tower's sequence (every frame of the call), u = n / m² merge units."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.m = int(getattr(root, "spatial_merge_size", 1))  # Kimi-K2.5 merges after its tower: rows stay row-major
        self.chunks: list[tuple[str, tuple[int, int], torch.Tensor, str | None]] | None = None
        self.full_cu: torch.Tensor | None = None
        self.window_cu: torch.Tensor | None = None
        self._where: tuple[torch.Tensor, torch.Tensor, list] | None = None  # (frame [n], row-major index [n], frames)
        self._windows: list | None = None
        self._modality = "image"
        self.calls: dict[int, list] = {}

    def begin(self, owner: "TransformersCapture", args, kwargs) -> None:
        self.chunks = self.full_cu = self.window_cu = self._where = self._windows = None
        self.calls = {}
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(grid_thw, torch.Tensor):
            return
        modality = owner.modality or "image"
        grids = [tuple(int(x) for x in row) for row in grid_thw.tolist()]
        m, unit = self.m, self.m * self.m
        total_units = sum(t * h * w for t, h, w in grids) // unit
        window_index = torch.arange(total_units)
        if hasattr(self.root, "window_size") and hasattr(self.root, "fullatt_block_indexes"):
            given = kwargs.get("window_index"), kwargs.get("cu_window_seqlens")  # the tower's own override
            try:
                if given[0] is not None and given[1] is not None:
                    window_index, window_cu = given
                else:
                    from transformers.vision_utils import get_vision_window_index

                    window_index, window_cu = get_vision_window_index(
                        grid_thw, spatial_merge_size=m, window_size=self.root.window_size,
                        patch_size=self.root.patch_size)
                window_index = window_index.cpu().long()
                self.window_cu = window_cu.detach().cpu().long()
            except Exception:  # another transformers layout: leave the tower uncaptured
                return
        # Merge unit u (original order) -> its frame chunk and the row-major index of its top-left patch.
        frame_of = torch.empty(total_units, dtype=torch.long)
        corner = torch.empty(total_units, dtype=torch.long)
        frames = []  # per frame chunk: (h, w, frame index in its medium, frames of the medium, its medium's tag)
        u0 = 0
        for i, (t, h, w) in enumerate(grids):
            medium = f"{modality} {i} of {len(grids)}" if len(grids) > 1 else None
            hm, wm = h // m, w // m
            local = torch.arange(hm * wm)
            hb, wb = local // wm, local % wm
            for f in range(t):
                frame_of[u0:u0 + hm * wm] = len(frames)
                corner[u0:u0 + hm * wm] = hb * m * w + wb * m
                frames.append((h, w, f, t, medium))
                u0 += hm * wm
        sub = torch.arange(unit)  # token (ih, iw) = divmod(sub, m) inside its merge unit
        token_frame = frame_of[window_index].repeat_interleave(unit)
        width = torch.tensor([frame[1] for frame in frames])[token_frame]
        rowmajor = corner[window_index].repeat_interleave(unit) + (sub // m).repeat(total_units) * width + \
            (sub % m).repeat(total_units)
        chunks, start = [], 0
        for c, (h, w, f, t, medium) in enumerate(frames):
            n = h * w
            if not bool((token_frame[start:start + n] == c).all()):
                return
            order = torch.argsort(rowmajor[start:start + n])
            if not bool((rowmajor[start:start + n][order] == torch.arange(n)).all()):
                return
            chunks.append((modality, (h, w), order, ", ".join(x for x in (medium, f"frame {f} of {t}" if t > 1 else None)
                                                               if x) or None))
            start += n
        self.chunks = chunks
        self.full_cu = torch.tensor([0] + [frame[0] * frame[1] for frame in frames]).cumsum(0)
        self._where = (token_frame, rowmajor, frames)
        self._modality = modality

    def windows(self) -> list[tuple[str, tuple[int, int] | None, torch.Tensor | None, str]] | None:
        """Per window call (cu_window_seqlens order): its segment name, its (rows, cols) patch grid, the
        order that makes its rows row-major, and its tag. A window whose tokens are not a full rectangle
        of one frame (a window rule attncap does not know) gets no grid and keeps the tower's order."""
        if self._windows is None and self._where is not None and self.window_cu is not None:
            token_frame, rowmajor, frames = self._where
            bounds = self.window_cu.tolist()
            per_frame: dict[int, int] = {}
            out = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                c = int(token_frame[s])
                per_frame[c] = per_frame.get(c, 0) + 1
                out.append([c, per_frame[c] - 1, s, e])
            self._windows = []
            for c, j, s, e in out:
                h, w, f, t, medium = frames[c]
                idx = rowmajor[s:e]
                r, col = idx // w, idx % w
                r0, r1, c0, c1 = int(r.min()), int(r.max()) + 1, int(col.min()), int(col.max()) + 1
                local = (r - r0) * (c1 - c0) + (col - c0)
                order = torch.argsort(local)
                exact = bool((token_frame[s:e] == c).all()) and (r1 - r0) * (c1 - c0) == e - s and \
                    bool((local[order] == torch.arange(e - s)).all())
                frame = (f"{medium}, " if medium else "") + (f"frame {f} of {t}, " if t > 1 else "")
                tag = f"{frame}window {j} of {per_frame[c]}: rows {r0}:{r1}, cols {c0}:{c1} of ({h}, {w})"
                self._windows.append((self._modality, (r1 - r0, c1 - c0), order, tag) if exact else
                                     (self._modality, None, None, f"{frame}window {j} of {per_frame[c]}"))
        return self._windows

    def on_attention_module(self, module, args, kwargs) -> None:
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)

        def same(ref):
            return isinstance(cu, torch.Tensor) and ref is not None and cu.numel() == ref.numel() and \
                bool((cu.detach().cpu().long() == ref).all())
        # A frame-sized window (windows as large as the frame) is the full block's layout: either reading is exact.
        self.calls[id(module)] = [0, "full" if same(self.full_cu) else "window" if same(self.window_cu) else None]

    def layout(self, module, q, k):
        state = self.calls.get(id(module))
        if state is None or self.chunks is None:
            return None
        c = state[0]
        state[0] += 1
        chunks = self.chunks if state[1] == "full" else self.windows() if state[1] == "window" else None
        if chunks is None or c >= len(chunks):
            return None
        name, grid, order, tag = chunks[c]
        n = q.shape[2]
        if k.shape[2] != n or (grid is not None and grid[0] * grid[1] != n):
            return None
        seg = Segment(name, 0, n, grid, tag)
        return CallLayout((seg,), (seg,)), None if order is None else order.to(q.device)


class PatchTower:
    """A ViT tower on pixel_values [N, C, H, W] (5-D [B, N, ...] tiles are flattened, blank tiles dropped,
    as Idefics3 does): each call holds one image's (H/p, W/p) patches, row-major, with a class token
    first (CLIP), last (Llama 4) or none (SigLIP). Pixtral packs every image of the call into one
    sequence (image_sizes [N, 2]): one segment per image, in order."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.grids: list[tuple[int, int]] | None = None
        self.packed = getattr(getattr(root, "config", None), "model_type", None) == "pixtral"
        self.cls_last = getattr(getattr(root, "config", None), "model_type", None) == "llama4_vision_model"
        self.name = "image"

    def begin(self, owner: "TransformersCapture", args, kwargs) -> None:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        patch = patch_side(getattr(getattr(self.root, "config", None), "patch_size", None))
        self.grids = None
        self.name = "video" if owner.modality == "video" else "image"  # a video's frames are encoded here too
        if not isinstance(pv, torch.Tensor) or pv.dim() not in (4, 5) or not isinstance(patch, int):
            return
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        if self.packed:
            if isinstance(sizes, torch.Tensor):
                self.grids = [(int(h) // patch, int(w) // patch) for h, w in sizes.tolist()]
            return
        self.grids = [(pv.shape[-2] // patch, pv.shape[-1] // patch)]

    def on_attention_module(self, module, args, kwargs) -> None:
        pass

    def layout(self, module, q, k):
        n = q.shape[2]
        if k.shape[2] != n:
            return None
        grids = self.grids or []
        if self.packed and sum(h * w for h, w in grids) == n:
            segs, pos = [], 0
            for h, w in grids:
                segs.append(Segment(self.name, pos, pos + h * w, (h, w)))
                pos += h * w
            segs = tuple(segs)
        elif len(grids) == 1 and n - grids[0][0] * grids[0][1] in (0, 1):
            hw = grids[0][0] * grids[0][1]
            if n == hw:
                segs = (Segment(self.name, 0, n, grids[0]),)
            elif self.cls_last:
                segs = (Segment(self.name, 0, hw, grids[0]), Segment("cls", hw, n))
            else:
                segs = (Segment("cls", 0, 1), Segment(self.name, 1, n, grids[0]))
        else:  # a layout this tower does not explain: no grid rather than a wrong one
            segs = (Segment(self.name, 0, n),)
        return CallLayout(segs, segs), None


class AudioTower:
    """An audio encoder (Qwen-Omni's audio_tower attends within windows of its mel frames): every call
    is one "audio" segment, a time sequence with no grid."""

    def __init__(self, root: torch.nn.Module):
        self.root = root

    def begin(self, owner: "TransformersCapture", args, kwargs) -> None:
        pass

    def on_attention_module(self, module, args, kwargs) -> None:
        pass

    def layout(self, module, q, k):
        if k.shape[2] != q.shape[2]:
            return None
        seg = (Segment("audio", 0, q.shape[2]),)
        return CallLayout(seg, seg), None


class TileTower:
    """Mllama's vision tower on pixel_values [B, I, T, C, H, W] (I images of T tiles, aspect_ratio_mask
    [B, I, T] marks the real ones): every call holds the T tiles of one image, each [cls, (g, g) patches,
    padding up to a multiple of 8], g = image_size / patch_size. The language model's cross-attention
    layers read the same tiles without the padding: ``cross_keys`` is their layout (I * T * (1 + g * g)
    keys per batch element), kept until the next image is encoded (generate() caches those keys).
    Tiles are tagged with their place: aspect_ratio_ids [B, I] index (from 1) the vision config's
    supported_aspect_ratios, (rows, cols) of tiles, filled row-major as the processor splits the image
    ("tile 2 of 6: row 0, col 2 of 2x3", "padding tile"; "image i of I, " first when I > 1)."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.tiles: list[list[str | None]] | None = None  # per image, one tag per tile
        self.tower_tags: list[str | None] | None = None  # per tile, shared by every image of the call
        self.cross_keys: tuple[Segment, ...] | None = None
        cfg = getattr(root, "config", None)
        patch, side = patch_side(getattr(cfg, "patch_size", None)), patch_side(getattr(cfg, "image_size", None))
        self.g = side // patch if patch and side and side % patch == 0 else None
        self.ratios = [tuple(r) for r in getattr(cfg, "supported_aspect_ratios", None) or ()]

    def _tags(self, real: torch.Tensor, ratio: torch.Tensor | None) -> tuple[list[str | None], str | None]:
        """Tile tags shared by the images of real [R, T] (and aspect ratio ids [R]), and what is not known."""
        if not bool((real == real[0]).all()):
            return [None] * real.shape[1], None
        n = int(real[0].sum())
        arrangement, why = None, None
        if ratio is None or not bool((ratio == ratio[0]).all()):
            why = "no aspect_ratio_ids shared by the images reached the vision tower"
        elif not 1 <= int(ratio[0]) <= len(self.ratios):
            why = f"aspect ratio id {int(ratio[0])} is not one of the config's {len(self.ratios)} supported_aspect_ratios"
        else:
            rows, cols = self.ratios[int(ratio[0]) - 1]
            if rows * cols != n or not bool(real[0, :n].all()):
                why = f"aspect ratio {rows}x{cols} does not hold the {n} real tiles of aspect_ratio_mask"
            else:
                arrangement = (rows, cols)
        tags = []
        for j in range(real.shape[1]):
            tag = f"tile {j} of {n}" if bool(real[0, j]) else "padding tile"
            if arrangement is not None and bool(real[0, j]):
                tag += f": row {j // arrangement[1]}, col {j % arrangement[1]} of {arrangement[0]}x{arrangement[1]}"
            tags.append(tag)
        return tags, why

    def begin(self, owner: "TransformersCapture", args, kwargs) -> None:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        ids = kwargs.get("aspect_ratio_ids", args[1] if len(args) > 1 else None)
        mask = kwargs.get("aspect_ratio_mask", args[2] if len(args) > 2 else None)
        self.tiles = self.tower_tags = self.cross_keys = None
        if self.g is None or not isinstance(pv, torch.Tensor) or pv.dim() != 6 or pv.shape[-1] != pv.shape[-2]:
            return
        b, images, n_tiles = pv.shape[:3]
        real = mask.reshape(b, images, n_tiles).bool().cpu() if isinstance(mask, torch.Tensor) and \
            mask.numel() == b * images * n_tiles else torch.ones(b, images, n_tiles, dtype=torch.bool)
        ids = ids.reshape(b, images).cpu() if isinstance(ids, torch.Tensor) and ids.numel() == b * images else None
        # The tower's calls hold one image each: tags there only where every image of the call agrees.
        self.tower_tags, _ = self._tags(real.flatten(0, 1), None if ids is None else ids.flatten())
        self.tiles, why = [], None
        for i in range(images):  # the cross-attention keys: each image's tiles, tags shared by the batch
            tags, why_i = self._tags(real[:, i], None if ids is None else ids[:, i])
            self.tiles.append([tag if images == 1 or tag is None else f"image {i} of {images}, {tag}" for tag in tags])
            why = why or why_i
        if why is not None:
            owner._warn(f"tiles:{why}", f"attncap: mllama: the tile arrangement (rows x cols of tiles) is not "
                                        f"recorded: {why}; each tile keeps its grid")
        self.cross_keys = self._segments(0, self.tiles)

    def _segments(self, pad: int, tiles: list[list[str | None]]) -> tuple[Segment, ...]:
        segs, pos, hw = [], 0, self.g * self.g
        for tags in tiles:
            for tag in tags:
                segs.append(Segment("cls", pos, pos + 1, None, tag))
                segs.append(Segment("image", pos + 1, pos + 1 + hw, (self.g, self.g), tag))
                pos += 1 + hw
                if pad:
                    segs.append(Segment("padding", pos, pos + pad, None, tag))
                    pos += pad
        return tuple(segs)

    def on_attention_module(self, module, args, kwargs) -> None:
        pass

    def layout(self, module, q, k):
        n = q.shape[2]
        if self.tower_tags is None or k.shape[2] != n:
            return None
        per = 1 + self.g * self.g
        per_padded = per + (8 - per % 8) % 8  # the tower pads each tile to a multiple of 8 tokens
        if n != len(self.tower_tags) * per_padded:
            segs = (Segment("image", 0, n),)  # a layout this tower does not explain: no grid
        else:
            segs = self._segments(per_padded - per, [self.tower_tags])
        return CallLayout(segs, segs), None
