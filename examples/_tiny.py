"""Tiny random-weight pipelines for the examples' --tiny flag: no weights, no downloads, seconds on a CPU.

The builders live with the tests (tests/tiny_pipelines.py, tests/tiny_transformers.py) so both use one
definition; this module only finds them in a source checkout and hands out (pipeline, call kwargs).
Text encoders are left out of tiny pipelines, so the kwargs carry random prompt embeddings.
"""
from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"

# name -> (module, builder, its kwargs, inputs function)
TINY = {
    "sd": ("tiny_pipelines", "tiny_sd", {}, "sd_inputs"),
    "sdxl": ("tiny_pipelines", "tiny_sdxl", {}, "sdxl_inputs"),
    "sd3": ("tiny_transformers", "tiny_sd3", {"dual": True}, "sd3_inputs"),
    "flux": ("tiny_transformers", "tiny_flux", {}, "flux_inputs"),
    "wan": ("tiny_transformers", "tiny_wan", {}, "wan_inputs"),
    "wan22": ("tiny_transformers", "tiny_wan", {"two": True}, "wan_inputs"),
    "wan_i2v": ("tiny_transformers", "tiny_wan_i2v", {}, "wan_i2v_inputs"),
    "wan_ti2v": ("tiny_transformers", "tiny_wan_ti2v", {}, "wan_ti2v_inputs"),
}


def tiny(name: str, steps: int = 2, seed: int = 0):
    """(pipeline, kwargs for pipe(**kwargs)) of the tiny random pipeline ``name`` (see TINY)."""
    import importlib

    if name not in TINY:
        raise ValueError(f"no tiny pipeline {name!r}; choose from {sorted(TINY)}")
    if not (TESTS / "tiny_transformers.py").exists():
        raise FileNotFoundError(f"--tiny needs the builders in {TESTS} (a source checkout of attncap)")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    module, builder, kwargs, inputs = TINY[name]
    mod = importlib.import_module(module)
    pipe = getattr(mod, builder)(seed=seed, **kwargs)
    return pipe, getattr(mod, inputs)(steps=steps, seed=seed)
