"""Print the README's table of diffusers families from the adapters themselves.

    python tools/family_table.py    # paste over the table under "Where capture works in diffusers"
"""
from __future__ import annotations

from attncap.integrations.diffusers.families import FAMILIES


def rows() -> list[str]:
    out = ["| adapter | denoiser classes | segments | default relations | guidance calls | not captured |",
           "|---|---|---|---|---|---|"]
    for f in FAMILIES:
        skipped = "; ".join(f"`{glob}`: {why.split(' (')[0]}" for glob, why in f.no_softmax)
        out.append(f"| {f.name} | {', '.join(f'`{d}`' for d in f.denoisers)} | {', '.join(f.segments)} | "
                   f"{', '.join(f.default_relations)} | {'one per branch' if f.separate_cfg_calls else 'batched'} | "
                   f"{skipped} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
