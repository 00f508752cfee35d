"""Triton kernels of attncap (installed as attncap.kernels): the fused forward and the map pass."""
if __name__ == "kernels":
    # Imported by that name only when an attncap checkout's root is on sys.path (python started in it,
    # or a script putting it first): then this folder hides Hugging Face's "kernels" package, which
    # transformers and diffusers import, and their imports would fail with a confusing missing name.
    raise ImportError(
        f"'kernels' resolved to attncap's Triton folder ({__file__}), not Hugging Face's kernels package, "
        "because the attncap checkout's root is on sys.path (Python started there, or PYTHONPATH). "
        "Start Python outside the checkout, or put the root last on sys.path; attncap's kernels are "
        "imported as attncap.kernels")

from .forward import forward  # noqa: E402
from .map_pass import map_pass  # noqa: E402

__all__ = ["forward", "map_pass"]
