"""Shared pieces of the attncap verbs: the CLIError every verb raises for a problem the user can fix,
and argument types that name their flag and what would work."""
from __future__ import annotations

import argparse
import re

RELATION = re.compile(r"^[A-Za-z_][\w]*->[A-Za-z_][\w]*$")
STATS = ("entropy", "peak", "colsum")


class CLIError(Exception):
    """A problem the user can fix; printed as 'attncap: error: ...' with exit status 2."""


class Interrupted(Exception):
    """Ctrl-C, after a verb kept what it had: printed as 'attncap: ...' (no traceback), exit status 130."""


OUT_ALIASES = ("--output-dir", "--output_dir")  # how the attention scripts people use spell --out

# Python keyword arguments in library messages (budgets, plans) and the `attncap run` flags that set them
_FLAG_WORDS = [
    (r"\bwith spill_dir=", "(attncap run spills to its run folder already)"),
    (r"\ba larger max_bytes\b", "a larger --max-gib"),
    (r"\bpast max_bytes=", "past the --max-gib limit of "),
    (r"\bmax_bytes(?:=|\s+is\s+)", "--max-gib is "),
    (r"\bfewer steps or layers\b", "fewer --capture-steps or --layers"),
    (r"\b(?:query_|key_)?pool=(\d+)", r"--pool \1"),
    (r"\bpool=", "--pool N"),
    (r"\bheads='mean'", "--heads mean"),
    (r"\b(?:tokens|keys)=\[\.\.\.\]", "--tokens WORD,WORD"),
    (r"\btokens=(?=[\s,])", "--tokens WORD,WORD"),
    (r"\bheads=", "--heads "),
    (r"\brelations=", "--relations "),
    (r"\blayers=", "--layers "),
    (r"\bstats=", "--stats "),
    (r"\bsteps='last'", "--capture-steps last"),
    (r"\bsteps=", "--capture-steps "),
    (r"fewer layers \(e\.g\. ('[^']*')\)", r"fewer layers (--layers \1)"),
    (r"query_range/key_range, or ", ""),
]


def in_flag_words(message: str) -> str:
    """A library message with its keyword arguments spelt as the CLI flags that set them."""
    for pattern, repl in _FLAG_WORDS:
        message = re.sub(pattern, repl, message)
    return message


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def relations(text: str):
    if text in ("auto", "all"):
        return text
    items = csv(text)
    bad = [r for r in items if not RELATION.match(r)]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{bad or text!r} is not a relation; use 'auto', 'all' or a comma list "
                                         "like image->text,image->image (quote it: '->' is a shell redirect)")
    return items


def pool(text: str):
    try:
        vals = [int(v) for v in csv(text)]
    except ValueError:
        vals = []
    if not vals or len(vals) not in (1, 2, 3) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive int (4) or per-axis factors h,w or t,h,w (1,4,4)")
    return vals[0] if len(vals) == 1 else tuple(vals)


def keyword_or_indices(text: str, keywords: tuple[str, ...], what: str, example: str):
    """One of ``keywords``, or a comma list of indices >= 0."""
    if text in keywords:
        return text
    try:
        vals = [int(v) for v in csv(text)]
    except ValueError:
        vals = []
    if not vals or min(vals) < 0:
        named = ", ".join(repr(k) for k in keywords)
        raise argparse.ArgumentTypeError(f"{text!r}: use {named} or {what} like {example}")
    return vals


def heads(text: str):
    return keyword_or_indices(text, ("mean", "all"), "head indices", "0,3,5")


def capture_steps(text: str):
    return keyword_or_indices(text, ("all", "last"), "step indices", "0,10,20")


def stats(text: str):
    if text in ("", "none"):
        return ()
    items = csv(text)
    bad = [s for s in items if s not in STATS]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} unknown; choose from {', '.join(STATS)} (comma list) or 'none'")
    return tuple(items)


def positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive {kind.__name__}")
        return v
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def groups(items: list[str] | None) -> dict | None:
    """--groups NAME=word,word ... as {name: [words]}."""
    if not items:
        return None
    out = {}
    for it in items:
        name, sep, words = it.partition("=")
        if not sep or not name or not csv(words):
            raise CLIError(f"--groups {it!r}: use NAME=word,word (e.g. animal=cat,tail)")
        out[name] = csv(words)
    return out


def check_words(store, words: list[str] | None):
    """--words: prompt words, or key indices given as numbers; unknown words are a readable error."""
    if not words:
        return None
    from ..viz import resolve_words

    items = [int(w) if w.isdigit() else w for w in words]
    try:
        resolve_words(store, items)
    except ValueError as e:
        raise CLIError(f"--words: {e}") from None
    return items
