"""CuPy launches of ``patches.cu``: coalesced gather, deterministic (or atomic) scatter.

Arguments arrive on the canonical layout of ``atskern.patches`` (contiguous
CuPy arrays, int64 offsets clipped to ``[-P, S]``).
"""

from __future__ import annotations

import numpy as np

from .._backend import cupy
from . import _module

SOURCE = "patches.cu"
WORD_NAMES = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}
FLOAT_NAMES = {4: "f32", 8: "f64"}
INT32_LIMIT = 2**31 - 1
MAX_BLOCKS = 1 << 20


def _shape_args(patches, images):
    """The scalar ``SHAPE_PARAMS`` of the kernels: K, R, P0, P1, Wp, S0, S1, W."""
    _, count, rows, p0, p1, width = patches.shape
    s0, s1, image_width = images.shape[2:]
    return tuple(np.int64(v) for v in (count, rows, p0, p1, width, s0, s1, image_width))


def _index_suffix(*arrays) -> str:
    """32-bit index arithmetic when every element index, plus one grid stride, fits; else 64-bit."""
    headroom = MAX_BLOCKS * 1024
    return "i32" if max(a.size for a in arrays) < INT32_LIMIT - headroom else "i64"


def _grid(total: int):
    threads = _module.THREADS_PER_BLOCK
    return (max(1, min(MAX_BLOCKS, -(-total // threads))),), (threads,)


def gather(images, offsets, fill_word, patches):
    """``patches[b, k, r, i0, i1, t] = images[b, r, o0 + i0, o1 + i1, o2 + t]`` or ``fill_word``."""
    name = f"gather_{WORD_NAMES[images.dtype.itemsize]}_{_index_suffix(images, patches)}"
    kernel = _module.function(SOURCE, name)
    blocks, threads = _grid(patches.size)
    kernel(blocks, threads, (images, offsets, patches, np.int64(patches.size)) + _shape_args(patches, images) + (fill_word,))
    return patches


def _overlap_lists(offsets, shape_args, patches_count):
    """CSR lists of the patches overlapping each patch of the same image, in increasing index."""
    cp = cupy()
    kernel = _module.function(SOURCE, "overlaps")
    blocks, threads = _grid(patches_count)
    counts = cp.empty(patches_count, dtype=cp.int32)
    starts = cp.zeros(patches_count + 1, dtype=cp.int64)
    kernel(blocks, threads, (offsets, np.int64(patches_count)) + shape_args + (starts, counts, counts, np.int32(0)))
    starts[1:] = cp.cumsum(counts, dtype=cp.int64)
    total = int(starts[-1])
    lists = cp.empty(max(1, total), dtype=cp.int32)
    kernel(blocks, threads, (offsets, np.int64(patches_count)) + shape_args + (starts, counts, lists, np.int32(1)))
    return starts, lists


def scatter(patches, offsets, images, *, deterministic=True):
    """``images`` (overwritten) = sum of the patches at their offsets.

    Deterministic: every covered element is written once, by the thread of
    its first covering patch, summing the covering patches in index order.
    ``deterministic=False`` uses atomic adds instead.
    """
    images.fill(0)
    suffix = f"{FLOAT_NAMES[patches.dtype.itemsize]}_{_index_suffix(images, patches)}"
    shape_args = _shape_args(patches, images)
    blocks, threads = _grid(patches.size)
    total = np.int64(patches.size)
    if not deterministic:
        kernel = _module.function(SOURCE, f"scatter_atomic_{suffix}")
        kernel(blocks, threads, (patches, offsets, images, total) + shape_args)
        return images
    starts, lists = _overlap_lists(offsets, shape_args, patches.shape[0] * patches.shape[1])
    kernel = _module.function(SOURCE, f"scatter_{suffix}")
    kernel(blocks, threads, (patches, offsets, starts, lists, images, total) + shape_args)
    return images
