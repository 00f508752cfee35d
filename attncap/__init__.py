"""attncap: attention maps from flash-attention kernels, without materialising [B, H, Nq, Nk]."""
from .capture import CaptureIncomplete, capture
from .explain import explain
from .ops import attention, maps_from_lse
from .request import MapRequest
from .session import CallLayout, Segment
from .store import BudgetExceeded, Record, Store, load
from .viz.explorer import explore

__version__ = "0.1.0"
__all__ = ["attention", "explore", "maps_from_lse", "capture", "CaptureIncomplete", "explain", "load", "MapRequest", "Record", "Store", "BudgetExceeded", "CallLayout",
           "Segment", "__version__"]
