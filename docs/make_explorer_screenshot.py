"""Rebuild the README's explorer screenshot (docs/gallery/explorer.png) from the embedded demo model.

    python docs/make_explorer_screenshot.py [--out docs/gallery/explorer.png]

Does what the README's two lines do (``attncap run shapes ...`` then ``attncap explore RUN``) in a
temporary folder, opens the page in the explorer tests' browser (tests/browser.py: the system
chromium through playwright), picks a word and the last step, clicks a position and takes the picture.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import browser  # noqa: E402

from attncap.cli import main as attncap_main  # noqa: E402

PROMPT = "a red circle and a blue square"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "gallery" / "explorer.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if attncap_main(["run", "shapes", "--prompt", PROMPT, "--steps", "12", "--relations",
                         "image->text,image->image", "--no-render", "--quiet", "--out", tmp]) != 0:
            sys.exit("attncap run failed")
        (run,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if attncap_main(["explore", str(run)]) != 0:
            sys.exit("attncap explore failed")
        with browser.browser() as b:
            page = browser.Page(b, run / "explorer.html", width=1100, height=900)
            page.js("attncap.setStep(attncap.steps().slice(-1)[0]); attncap.select('circle')")
            box = page.page.locator("#main").bounding_box()
            at = (box["x"] + 0.35 * box["width"], box["y"] + 0.4 * box["height"])
            page.page.mouse.click(*at)
            page.page.mouse.move(*at)
            if page.errors:
                sys.exit(f"the page logged errors: {page.errors}")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.page.screenshot(path=args.out, full_page=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
