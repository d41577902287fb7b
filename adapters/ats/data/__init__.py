"""Multi-resolution data (2019 names): ``MultiResolutionBatch`` and ``FromTensors``.

The data have ``n`` spatial dimensions and are available at several
resolutions, the **levels** (0 the lowest); every level shows the same
region, so a position in one level maps to a region of another by the ratio
of their shapes.
"""

from .base import MultiResolutionBatch
from .from_tensors import FromTensors

__all__ = ["MultiResolutionBatch", "FromTensors"]
