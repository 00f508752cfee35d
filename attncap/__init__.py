"""attncap: attention maps from flash-attention kernels, without materialising [B, H, Nq, Nk]."""
from .ops import attention
from .request import MapRequest

__version__ = "0.1.0"
__all__ = ["attention", "MapRequest", "__version__"]
