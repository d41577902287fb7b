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


def too_large(shape, itemsize: int, dtype_name, what: str, error: BaseException) -> ValueError:
    """The ValueError for an output of ``shape`` that cannot be allocated, naming ``what`` sized it (every front
    end's words for it)."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * itemsize
    return ValueError(f"{what} give an output of shape {shape} ({nbytes / 2**30:.3g} GiB of {dtype_name}), more than "
                      f"can be allocated here ({type(error).__name__})")


def output_array(shape, dtype, what: str, empty=aligned_empty):
    """``empty(shape, dtype)``, or :func:`too_large`'s ValueError where it cannot be allocated (a size past memory,
    or more elements than an index holds), instead of a bare MemoryError."""
    try:
        return empty(shape, dtype)
    except (MemoryError, ValueError) as error:
        raise too_large(shape, np.dtype(dtype).itemsize, np.dtype(dtype), what, error) from None
