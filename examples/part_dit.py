"""Part-wise attention analysis of a custom part-based DiT, captured generically.

    python examples/part_dit.py [--parts 3] [--steps 4] [--out part_attention.json]

A plain torch module (examples/_part_dit_model.py: 3 parts x 4x4x4 latent tokens + 8 text tokens,
random weights) runs a few denoising-like steps inside attncap.capture with a layout of parts. For each
step the script reports, from the captured maps, how much attention each part's tokens give to every
part and to the text (the mean over a part's query tokens of the probability summed over the target
segment's keys; rows sum to 1 because attention normalises over all keys), averaged over the global
attention layers, plus the mean attention entropy of each part's queries from the same pass.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attncap  # noqa: E402
from _part_dit_model import PartDiT  # noqa: E402

GRID = (4, 4, 4)
TEXT = 8


def denoise(model: PartDiT, latents: torch.Tensor, text: torch.Tensor, steps: int) -> torch.Tensor:
    """A deterministic Euler-style loop: each model call is one step for attncap."""
    x = latents
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps)
        with torch.no_grad():
            eps = model(x, text, t)
        x = x - eps / steps
    return x


def part_mass(store: attncap.Store, step: int, queries: str, keys: str) -> float:
    """Mean over the query segment's tokens (and batch, layers) of the attention summed over the key segment."""
    recs = store.get(step=step, relation=f"{queries}->{keys}", kind="map")
    return float(torch.stack([r.data.sum(-1).mean() for r in recs]).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the part-wise table as JSON here")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = PartDiT(parts=args.parts, grid=GRID).eval()
    n = model.part_tokens
    parts = [f"part{i}" for i in range(args.parts)]
    layout = [(p, n, GRID) for p in parts] + [("text", TEXT, None)]
    latents = torch.randn(args.batch, args.parts, n, 8)
    text = torch.randn(args.batch, TEXT, 24)

    plain = denoise(model, latents, text, args.steps)
    with attncap.capture(model, layout=layout, layers="blocks.*.global_attn", relations="all",
                         stats=("entropy",)) as store:
        captured = denoise(model, latents, text, args.steps)
    diff = float((plain - captured).abs().max())
    print(f"captured {len(store)} records from {len({r.layer for r in store})} global attention layers over "
          f"{args.steps} steps; output max |difference| with capture off: {diff:.2e}")
    print(store.summary().splitlines()[1])

    targets = parts + ["text"]
    table: dict = {}
    for step in range(args.steps):
        t = 1.0 - step / args.steps
        print(f"\nstep {step} (t={t:.2f}): share of each part's attention given to ->")
        print("            " + "".join(f"{k:>8}" for k in targets) + "   own part   entropy")
        table[step] = {}
        for q in parts:
            row = {k: part_mass(store, step, q, k) for k in targets}
            ent = float(torch.stack([r.data.mean() for r in store.get(step=step, relation=f"{q}->text",
                                                                       kind="entropy")]).mean())
            assert abs(sum(row.values()) - 1.0) < 1e-4, row  # normalised over all keys
            table[step][q] = {**row, "entropy": ent}
            print(f"  {q:<10}" + "".join(f"{row[k]:8.3f}" for k in targets) + f"   {row[q]:8.3f}   {ent:7.3f}")
    print("\ntext share per step (mean over parts): "
          + "  ".join(f"{s}: {sum(table[s][q]['text'] for q in parts) / len(parts):.3f}" for s in table))
    cross = {s: sum(table[s][q][k] for q in parts for k in parts if k != q) / len(parts) for s in table}
    print("cross-part share per step (attention to the other parts): "
          + "  ".join(f"{s}: {v:.3f}" for s, v in cross.items()))
    if args.out is not None:
        args.out.write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
