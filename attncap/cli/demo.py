"""``attncap demo``: the embedded shapes model draws a few captions with capture on (no download)."""
from __future__ import annotations

from pathlib import Path

from .common import OUT_ALIASES, CLIError, positive


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded demo and write pictures to results/<timestamp>/")
    p.add_argument("--out", *OUT_ALIASES, dest="out", default=None, help="output folder (default results/<timestamp>)")
    p.add_argument("--prompt", nargs="+", default=None, metavar="CAPTION",
                   help="captions to draw, like 'a red circle and a blue square' (colours: red, green, blue, "
                        "yellow, cyan, magenta; shapes: circle, square, triangle)")
    p.add_argument("--steps", type=positive(int), default=20, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def check_captions(captions: list[str]) -> None:
    """Every caption in the demo model's vocabulary, within its token length, naming a coloured shape:
    checked before the model loads or anything is drawn."""
    from ..demo_model.grounding import caption_objects
    from ..demo_model.tokenizer import MAX_LENGTH, PAD, UNK, VOCAB
    from ..prompts import split_words

    known = [w for w in VOCAB if w not in (PAD, UNK)]
    for caption in captions:
        words = [w.lower() for w, _, _ in split_words(caption)]
        unknown = sorted({w for w in words if w not in known})
        if unknown:
            raise CLIError(f"--prompt {caption!r}: the demo model does not know {unknown}; its words: {', '.join(known)}")
        if len(words) > MAX_LENGTH:
            raise CLIError(f"--prompt {caption!r}: {len(words)} words; the demo model reads at most {MAX_LENGTH}")
        try:
            caption_objects(caption)
        except ValueError as e:
            raise CLIError(f"--prompt: {e}") from None


def run(args) -> Path:
    from ..demo import CAPTIONS, run as run_demo

    captions = args.prompt or list(CAPTIONS)
    check_captions(captions)
    return run_demo(args.out, captions=captions, steps=args.steps, seed=args.seed, progress=not args.quiet)
