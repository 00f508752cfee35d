"""The attncap command line: one module per verb.

    attncap run MODEL --prompt "a cat on a sofa" [--steps 30 --layers '*attn2*' --pool 2 ...]
    attncap render DIR      re-draws a saved run (or any saved store) into DIR (or --out)
    attncap demo            the embedded demo (no download)
    attncap explore RUN     an interactive offline HTML page of a run's maps (RUN/explorer.html)
    attncap explain MODEL IMAGE --prompt TEXT --out DIR   word maps of an existing picture or video

Each verb is a module of this package with ``add_parser(subparsers)`` (adds its sub-parser, named
after the verb) and ``run(args)`` (does the work, raising CLIError for problems the user can fix).
Registering a new verb is one line: import its module below and append it to VERBS (the module's
name is the verb's name). Ctrl-C is no traceback: a verb that kept partial work raises
common.Interrupted with where it is; any other KeyboardInterrupt prints "interrupted"; both exit 130.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import demo, explain, explore, render, run
from .common import CLIError, Interrupted

VERBS = (demo, run, render, explore, explain)

__all__ = ["CLIError", "VERBS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncap", description="Attention maps from fused flash-attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verb = next(v for v in VERBS if v.__name__.rsplit(".", 1)[-1] == args.command)
    try:
        verb.run(args)
    except CLIError as e:
        if os.environ.get("ATTNCAP_DEBUG"):
            raise
        print(f"attncap: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # Ctrl-C after the verb kept what it had
        print(f"attncap {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if os.environ.get("ATTNCAP_DEBUG"):
            raise
        print(f"attncap {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
