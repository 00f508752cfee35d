"""Render a second CPU run of benchmarks/run.py (another thread count) as its own RESULTS.md section.

    python benchmarks/run.py --threads 2 --paired --shapes ... --providers sdpa,attncap_fused,peer \
        --out benchmarks/results-cpu-2threads.json
    python benchmarks/threads_section.py benchmarks/results-cpu-2threads.json [--write-results benchmarks/RESULTS.md]

The table is report.py's torch-path table (the same ratios, targets and misses as the "## CPU"
section), under its own heading with this run's device, date and command. Figures come only from
the JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report import torch_path_table  # noqa: E402


def section(doc: dict, source: str) -> str:
    rows = {(r["shape"], r["task"], r["provider"]): r for r in doc["rows"]}
    shapes = list(dict.fromkeys(r["shape"] for r in doc["rows"] if r["provider"] == "attncap_fused"))
    first = next(r for r in doc["rows"] if r["provider"] == "attncap_fused" and "date" in r)
    lines = [f"## Torch path at {first['device'].split(', ')[-1]} (issue 15)", "",
             f"Measured {first['date'][:10]} on CPU ({first['device']}), torch {first['torch']}, attncap source "
             f"{first['attncap_src']}, `{doc['command']}`; rendered from `{source}` by "
             "`python benchmarks/threads_section.py`.", ""]
    return "\n".join(lines + torch_path_table(rows, shapes)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON file written by benchmarks/run.py")
    parser.add_argument("--write-results", help="RESULTS.md to write this section into")
    args = parser.parse_args()
    with open(args.results) as f:
        doc = json.load(f)
    text = section(doc, os.path.relpath(args.results, os.path.dirname(HERE)))
    print(text)
    if args.write_results:
        sys.path.append(os.path.dirname(HERE))
        from attncap.report import replace_section
        replace_section(args.write_results, text)


if __name__ == "__main__":
    main()
