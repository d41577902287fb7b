"""Host buffers that frameworks can import zero-copy.

TensorFlow refuses (aborts on) DLPack tensors whose data is not 64-byte
aligned, so every host buffer atskern allocates comes from :func:`aligned_empty`.
"""

from __future__ import annotations

import math

import numpy as np

ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous NumPy array whose data starts on an ``alignment``-byte boundary."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if not isinstance(shape, int) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """Like :func:`aligned_empty`, filled with zeros."""
    out = aligned_empty(shape, dtype, alignment)
    out.fill(0)
    return out


def output_array(shape, dtype, what: str, empty=aligned_empty):
    """``empty(shape, dtype)``, or a ValueError naming ``what`` sized it where it cannot be allocated (a size past
    memory, or more elements than an index holds), instead of a bare MemoryError."""
    try:
        return empty(shape, dtype)
    except (MemoryError, ValueError) as error:
        nbytes = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
        raise ValueError(f"{what} give an output of shape {tuple(int(s) for s in shape)} ({nbytes / 2**30:.3g} GiB "
                         f"of {np.dtype(dtype)}), more than can be allocated here ({type(error).__name__})") from None
