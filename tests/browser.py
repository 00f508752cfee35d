"""A real headless browser for the explorer tests: Debian's chromium driven by playwright.

playwright's own browser download is not used (it is not reachable everywhere): the system chromium
is launched by path. Without chromium or playwright the tests skip, unless ATTNCAP_REQUIRE_BROWSER=1
(set by .ci/run, which installs both): then they fail, so CI cannot pass by skipping them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require() -> None:
    """Skip (or fail under ATTNCAP_REQUIRE_BROWSER=1) when no browser can be driven here."""
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install playwright)"
    if why is None and chromium_path() is None:
        why = "no chromium on PATH (apt-get install chromium)"
    if why:
        if os.environ.get("ATTNCAP_REQUIRE_BROWSER"):
            pytest.fail(f"ATTNCAP_REQUIRE_BROWSER is set but {why}")
        pytest.skip(why)


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """One explorer page open in the browser; ``errors`` collects console errors and page exceptions,
    ``requests`` every URL the page asked for other than itself (there must be none)."""

    def __init__(self, b, path: Path, width: int = 1200, height: int = 1000) -> None:
        self.page = b.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.requests: list[str] = []
        url = Path(path).resolve().as_uri()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url) if r.url != url and
                     not r.url.startswith("data:") else None)
        self.page.goto(url)
        self.page.wait_for_function("window.attncap !== undefined", timeout=30_000)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def pixels(self, canvas: str = "main"):
        """uint8 [H, W, 4] of a canvas (read back through a PNG: a JSON array of bytes is slow)."""
        import base64
        import io

        import numpy as np
        from PIL import Image

        url = self.js("(id) => document.getElementById(id).toDataURL('image/png')", canvas)
        png = base64.b64decode(url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))

    def close(self) -> None:
        self.page.close()
