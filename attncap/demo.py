"""A small end-to-end run of the kernel-level API that writes heatmaps (``attncap demo``).

It builds an "image" of 48x64 query tokens and 6 "text" keys whose embeddings match planted
regions (a disc, a bar, a corner), runs attncap.attention once, and writes, per text token, the
map of where the image attends to it, plus the pooled image self-attention of one query point.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import torch

from .ops import attention
from .request import MapRequest

GRID = (48, 64)
WORDS = ["a", "red", "disc", "beside", "a", "bar"]


def _planted_tokens(d: int = 64, heads: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """q [1, H, Nimg, D] image tokens, k/v [1, H, Ntext, D] text tokens; regions where image tokens
    carry the direction of a text token's key, so that token's attention lands there."""
    gen = torch.Generator().manual_seed(0)
    h, w = GRID
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    regions = {
        2: ((yy - 20) ** 2 + (xx - 18) ** 2 < 10 ** 2),   # "disc"
        5: ((xx - 46).abs() < 4) & (yy > 6) & (yy < 42),  # "bar"
        1: ((yy - 20) ** 2 + (xx - 18) ** 2 < 10 ** 2),   # "red" colours the disc
    }
    k = torch.randn(1, heads, len(WORDS), d, generator=gen)
    k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(d)
    q = 0.3 * torch.randn(1, heads, h * w, d, generator=gen)
    for tok, region in regions.items():
        q[:, :, region.flatten()] += 0.6 * k[:, :, tok : tok + 1]
    v = torch.randn(1, heads, len(WORDS), d, generator=gen)
    return q, k, v, regions


def run(out_dir: str | Path | None = None) -> Path:
    """Run the demo and return the folder it wrote (results/<timestamp>/ by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir else Path("results") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    q, k, v, _ = _planted_tokens()
    _, products = attention(q, k, v, request=MapRequest(heads="mean", keys=list(range(len(WORDS))),
                                                         query_grid=GRID, stats=("entropy",)))
    token_maps = products["tokens"][0, 0].T.reshape(len(WORDS), *GRID)
    fig, axes = plt.subplots(1, len(WORDS), figsize=(3 * len(WORDS), 3))
    for i, ax in enumerate(axes):
        ax.imshow(token_maps[i], cmap="inferno")
        ax.set_title(f"{i}: {WORDS[i]}")
        ax.axis("off")
    fig.suptitle("where the image attends to each text token (head mean)")
    fig.savefig(out / "token_maps.png", dpi=80, bbox_inches="tight")
    plt.close(fig)

    # Image self-attention, pooled 4x4 on both axes: the row of one query bin, as a picture.
    _, self_products = attention(q, q, q, request=MapRequest(query_grid=GRID, key_grid=GRID, query_pool=4, key_pool=4))
    pooled = self_products["map"][0, 0]
    bins = (GRID[0] // 4, GRID[1] // 4)
    point = 5 * bins[1] + 4
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(pooled[point].reshape(bins), cmap="inferno")
    ax.plot(4, 5, "c+", markersize=14)
    ax.set_title("self-attention of one query bin (pool 4x4)")
    ax.axis("off")
    fig.savefig(out / "self_attention_point.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"attncap demo: wrote {out}/token_maps.png and {out}/self_attention_point.png")
    return out
