"""Multi-resolution data (2019 names): ``MultiResolutionBatch`` and ``FromTensors``.

The classes live in :mod:`ats.keras.data` (every Keras 3 backend); this is
their 2019 import path, with the 2019 submodules :mod:`ats.data.base` and
:mod:`ats.data.from_tensors`.
"""

from . import base, from_tensors  # noqa: F401
from .base import MultiResolutionBatch
from .from_tensors import FromTensors

__all__ = ["MultiResolutionBatch", "FromTensors"]
