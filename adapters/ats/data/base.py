"""``ats.data.base``: the 2019 module of ``MultiResolutionBatch`` (defined in :mod:`ats.keras.data`)."""

from ..keras.data import MultiResolutionBatch

__all__ = ["MultiResolutionBatch"]
