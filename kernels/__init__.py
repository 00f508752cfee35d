"""Triton kernels of attncap (installed as attncap.kernels): the fused forward and the map pass."""
from .forward import forward
from .map_pass import map_pass

__all__ = ["forward", "map_pass"]
