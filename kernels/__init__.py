"""Triton kernels of attncap (installed as attncap.kernels): the fused forward and the map pass."""
if __name__ == "kernels":
    # This folder is imported by the top-level name only where an attncap checkout's root is on
    # sys.path ahead of site-packages (Python started in it: python -m, python -c, pytest). The name
    # belongs to Hugging Face's kernels package, which transformers 5 depends on and imports: hand
    # the importer that package instead (a module may replace itself in sys.modules while it is
    # imported), or, where it is not installed, say why the name is taken.
    import importlib.metadata
    import importlib.util
    import os
    import sys

    try:
        _init = str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        _init = None
    if _init is None or not os.path.isfile(_init):
        raise ImportError(
            f"'kernels' resolved to attncap's Triton folder ({__file__}) because the attncap checkout's root "
            "is on sys.path, and Hugging Face's kernels package, which owns that name, is not installed; "
            "attncap's kernels are imported as attncap.kernels")
    _spec = importlib.util.spec_from_file_location("kernels", _init, submodule_search_locations=[os.path.dirname(_init)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .forward import forward
    from .map_pass import map_pass

    __all__ = ["forward", "map_pass"]
