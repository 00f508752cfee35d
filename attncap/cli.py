"""The attncap command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attncap", description="Attention maps from fused flash-attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded demo and write pictures to results/<timestamp>/")
    demo.add_argument("--out", default=None, help="output folder (default results/<timestamp>)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
