"""Token layouts of transformers vision-language models: where the text, image and video tokens of
a call are, and on which patch grid (used by attncap.integrations.transformers).

TokenSequence   the language model's sequence: one segment per media item found from the media token
                ids in input_ids, text everywhere else, grown by one token per generated step.
MergeTower      Qwen2-VL / Qwen2.5-VL vision towers: one attention call per frame, rows in the
                spatial-merge block order, reordered to row-major on the (h, w) patch grid.
PatchTower      CLIP / SigLIP towers (LLaVA-style): [cls] + the (H/patch, W/patch) grid.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..session import CallLayout, Segment

if TYPE_CHECKING:  # the towers call back into the capture that owns them
    from .transformers import TransformersCapture

MEDIA = ("image", "video")


class TokenSequence:
    """Which segment every position of the language model's running sequence belongs to.

    segid [B, L]: 0 text, j >= 1 media segment j (media[j - 1] = (name, token count, grid)), in the
    order the media appear; shared by the batch when every element has the same media structure.
    """

    def __init__(self, segid: torch.Tensor, media: list[tuple[str, int | None, tuple | None]]):
        self.segid = segid
        self.media = media

    @property
    def length(self) -> int:
        return self.segid.shape[1]

    @staticmethod
    def start(input_ids: torch.Tensor, token_ids: dict[str, int | None], specs: dict[str, list]) -> "TokenSequence":
        ids = input_ids.detach().cpu()
        kinds = torch.zeros_like(ids)
        for code, name in enumerate(MEDIA, 1):
            if token_ids.get(name) is not None:
                kinds[ids == token_ids[name]] = code
        queues = {name: list(specs.get(name, ())) for name in MEDIA}
        rows, structures = [], []
        for b in range(ids.shape[0]):
            row, media = assign_media(kinds[b], queues)
            rows.append(row)
            structures.append(media)
        if all(s == structures[0] for s in structures):
            return TokenSequence(torch.stack(rows), structures[0])
        # Different media per element: one segment per modality, no grid (a call is captured only if
        # the counts agree).
        return TokenSequence(kinds.clone(), [(name, None, None) for name in MEDIA])

    def extend(self, n: int) -> None:
        self.segid = torch.cat([self.segid, self.segid.new_zeros(self.segid.shape[0], n)], 1)

    def axis(self, start: int, stop: int) -> tuple[tuple[Segment, ...], torch.Tensor | None] | None:
        """Segments of positions start:stop and the per-element order that makes them contiguous."""
        sid = self.segid[:, start:stop]
        nseg = len(self.media) + 1
        counts = torch.stack([torch.bincount(r, minlength=nseg) for r in sid])
        if not bool((counts == counts[0]).all()):
            return None
        order = torch.argsort(sid, dim=1, stable=True)
        identity = bool((order == torch.arange(sid.shape[1])).all())
        segs, pos = [], 0
        for j, c in enumerate(counts[0].tolist()):
            if c == 0:
                continue
            name, full, grid = ("text", None, None) if j == 0 else self.media[j - 1]
            segs.append(Segment(name, pos, pos + c, grid if full == c else None))
            pos += c
        return tuple(segs), None if identity else order


def assign_media(kinds: torch.Tensor, queues: dict[str, list]) -> tuple[torch.Tensor, list]:
    """Segment ids of one batch element: each media run split into images by the queued token counts."""
    segid = torch.zeros_like(kinds)
    media: list[tuple[str, int | None, tuple | None]] = []
    pos, n = 0, kinds.numel()
    while pos < n:
        code = int(kinds[pos])
        if code == 0:
            pos += 1
            continue
        name = MEDIA[code - 1]
        run_end = pos
        while run_end < n and int(kinds[run_end]) == code:
            run_end += 1
        while pos < run_end:
            queue = queues[name]
            if queue and queue[0][0] <= run_end - pos:
                count, grid = queue.pop(0)
            else:  # no (fitting) spec: the rest of the run is one segment without a grid
                count, grid = run_end - pos, None
            media.append((name, count, grid))
            segid[pos:pos + count] = len(media)
            pos += count
    return segid, media


# ----------------------------------------------------------------------------------- vision towers
class MergeTower:
    """Qwen2-VL / Qwen2.5-VL vision tower: patches of each frame in merge-block order (and, for
    Qwen2.5-VL, window order); attention is called once per frame (cu_seqlens) or once per window."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.m = int(root.spatial_merge_size)
        self.chunks: list[tuple[str, tuple[int, int], torch.Tensor]] | None = None
        self.full_cu: torch.Tensor | None = None
        self.calls: dict[int, list] = {}

    def begin(self, owner: "TransformersCapture", args, kwargs) -> None:
        self.chunks, self.full_cu, self.calls = None, None, {}
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(grid_thw, torch.Tensor):
            return
        modality = owner.modality_of(grid_thw)
        grids = [tuple(int(x) for x in row) for row in grid_thw.tolist()]
        m, unit = self.m, self.m * self.m
        total_units = sum(t * h * w for t, h, w in grids) // unit
        window_index = torch.arange(total_units)
        if hasattr(self.root, "window_size") and hasattr(self.root, "fullatt_block_indexes"):
            try:
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=m,
                                                          window_size=self.root.window_size,
                                                          patch_size=self.root.patch_size)
                window_index = window_index.cpu()
            except Exception:  # another transformers layout: leave the tower uncaptured
                return
        # Original merge unit u -> (frame chunk, row-major token index of its top-left patch).
        frame_of = torch.empty(total_units, dtype=torch.long)
        corner = torch.empty(total_units, dtype=torch.long)
        widths = []
        u0, chunk = 0, 0
        for t, h, w in grids:
            hm, wm = h // m, w // m
            local = torch.arange(hm * wm)
            hb, wb = local // wm, local % wm
            for _ in range(t):
                frame_of[u0:u0 + hm * wm] = chunk
                corner[u0:u0 + hm * wm] = hb * m * w + wb * m
                widths.append((h, w))
                u0 += hm * wm
                chunk += 1
        sub = torch.arange(unit)  # token (ih, iw) = divmod(sub, m) inside its merge unit
        tokens_frame = frame_of[window_index].repeat_interleave(unit)
        tokens_corner = corner[window_index].repeat_interleave(unit)
        ih, iw = (sub // m).repeat(total_units), (sub % m).repeat(total_units)
        chunks, start = [], 0
        for c, (h, w) in enumerate(widths):
            n = h * w
            if not bool((tokens_frame[start:start + n] == c).all()):
                return
            rowmajor = tokens_corner[start:start + n] + ih[start:start + n] * w + iw[start:start + n]
            order = torch.argsort(rowmajor)
            if not bool((rowmajor[order] == torch.arange(n)).all()):
                return
            chunks.append((modality, (h, w), order))
            start += n
        self.chunks = chunks
        self.full_cu = torch.tensor([0] + [h * w for h, w in widths]).cumsum(0)

    def on_attention_module(self, module, args, kwargs) -> None:
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        full = (isinstance(cu, torch.Tensor) and self.full_cu is not None and cu.numel() == self.full_cu.numel()
                and bool((cu.detach().cpu().long() == self.full_cu).all()))
        self.calls[id(module)] = [0, full]

    def layout(self, module, q, k):
        state = self.calls.get(id(module))
        if state is None or self.chunks is None:
            return None
        c = state[0]
        state[0] += 1
        if not state[1] or c >= len(self.chunks):
            return None  # a window-attention call (Qwen2.5-VL): not captured
        name, grid, order = self.chunks[c]
        n = grid[0] * grid[1]
        if q.shape[2] != n or k.shape[2] != n:
            return None
        seg = Segment(name, 0, n, grid)
        return CallLayout((seg,), (seg,)), order.to(q.device)


class PatchTower:
    """CLIP / SigLIP-style tower: [cls?] + row-major patches of pixel_values [B, C, H, W]."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.hw: tuple[int, int] | None = None

    def begin(self, owner: "TransformersCapture", args, kwargs) -> None:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        patch = getattr(getattr(self.root, "config", None), "patch_size", None)
        self.hw = None
        if isinstance(pv, torch.Tensor) and pv.dim() == 4 and isinstance(patch, int):
            self.hw = (pv.shape[-2] // patch, pv.shape[-1] // patch)

    def on_attention_module(self, module, args, kwargs) -> None:
        pass

    def layout(self, module, q, k):
        n = q.shape[2]
        if k.shape[2] != n:
            return None
        if self.hw is not None and n >= self.hw[0] * self.hw[1]:
            extra = n - self.hw[0] * self.hw[1]
            image = Segment("image", extra, n, self.hw)
            segs = (Segment("cls", 0, extra), image) if extra else (image,)
        else:
            segs = (Segment("image", 0, n),)
        return CallLayout(segs, segs), None


# ----------------------------------------------------------------------------------- the capture
