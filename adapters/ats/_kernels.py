"""The atskern functions the adapters call, resolved once.

The patch kernels (``atskern.extract_patches`` / ``atskern.scatter_patches``)
come from atskern when it has them. Until then (an atskern without the patch
kernels) a plain NumPy stand-in with the same contract is used so that the
adapters stay usable; it is slower but gives the same results.
"""

from __future__ import annotations

import itertools

import numpy as np

import atskern

ALIGNMENT = 64


def _aligned_empty(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialized C-contiguous array whose data pointer is a multiple of ``alignment``."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


try:  # atskern >= the patches merge
    from atskern._memory import aligned_empty
except ImportError:  # pragma: no cover - depends on the atskern version
    aligned_empty = _aligned_empty


def _patch_slices(offset, patch_size, spatial):
    """(source slices, destination slices) of one patch, clipped to the image; None if empty."""
    src, dst = [], []
    for o, p, s in zip(offset, patch_size, spatial):
        lo, hi = max(int(o), 0), min(int(o) + p, s)
        if lo >= hi:
            return None
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(o), hi - int(o)))
    return tuple(src), tuple(dst)


def _numpy_extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False, out=None):
    """NumPy stand-in for ``atskern.extract_patches`` (channels-last and channels-first)."""
    x = np.asarray(x)
    offsets = np.asarray(offsets)
    xl = np.moveaxis(x, 1, -1) if channels_first else x
    batch, k = offsets.shape[:2]
    spatial = xl.shape[1:-1]
    result = np.full((batch, k, *patch_size, xl.shape[-1]), fill, dtype=x.dtype)
    for b, i in itertools.product(range(batch), range(k)):
        slices = _patch_slices(offsets[b, i], patch_size, spatial)
        if slices is not None:
            result[(b, i) + slices[1]] = xl[(b,) + slices[0]]
    if channels_first:
        result = np.moveaxis(result, -1, 2)
    if out is not None:
        out[...] = result
        return out
    return result


def _numpy_scatter_patches(grad, offsets, spatial_shape, *, channels_first=False, out=None):
    """NumPy stand-in for ``atskern.scatter_patches``: adds every patch back at its offset."""
    grad = np.asarray(grad)
    offsets = np.asarray(offsets)
    gl = np.moveaxis(grad, 2, -1) if channels_first else grad
    batch, k = offsets.shape[:2]
    patch_size = gl.shape[2:-1]
    dtype = np.float64 if grad.dtype == np.float64 else np.float32
    result = np.zeros((batch, *spatial_shape, gl.shape[-1]), dtype=dtype)
    for b, i in itertools.product(range(batch), range(k)):
        slices = _patch_slices(offsets[b, i], patch_size, spatial_shape)
        if slices is not None:
            result[(b,) + slices[0]] += gl[(b, i) + slices[1]]
    if channels_first:
        result = np.moveaxis(result, -1, 1)
    if out is not None:
        out[...] = result
        return out
    return result


extract_patches = getattr(atskern, "extract_patches", _numpy_extract_patches)
scatter_patches = getattr(atskern, "scatter_patches", _numpy_scatter_patches)
HAS_PATCH_KERNELS = hasattr(atskern, "extract_patches")
sample = atskern.sample
