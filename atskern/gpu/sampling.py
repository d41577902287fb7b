"""CuPy sampling kernels (CUDA source: ``sampling.cu``); the twins of ``atskern.cpu.sampling``.

Inputs arrive flattened to ``(B, N)`` CuPy weights; :func:`sample` is the backend interface
of ``atskern.sampling`` (indices, probs and a per-row status in one call). The draws
equal the CPU kernel's for the same seed (the same Philox numbers and keys),
up to rounding ties.
"""

from __future__ import annotations

import numpy as np

from .._backend import cupy
from .._validation import SCALE_FREE_EXPONENTS
from . import _module

SOURCE = "sampling.cu"
SORT_SIZE = 2048  # ATS_SORT_SIZE in sampling.cu
PER_THREAD = 4  # ATS_PER_THREAD in sampling.cu
MIN_CHUNK = 1 << 14
MAX_GRID_Y = 65535
NO_INDEX = 0x7FFFFFFFFFFFFFFF  # ATS_NO_INDEX in sampling.cu


def _suffix(weights) -> str:
    return "f32" if weights.dtype == np.float32 else "f64"


def row_status(weights):
    """The int64 ``(B + 1, 4)`` status (per row, then the summary row; see ``atskern.sampling``)
    and the float64 row totals.

    Still CuPy reductions: the GPU rewrite (issue 10) fuses them into the sampling pass.
    """
    cp = cupy()
    rows = weights.shape[0]
    finite = cp.isfinite(weights)
    status = cp.empty((rows + 1, 4), cp.int64)
    status[:rows, 0] = (~finite).sum(axis=1)
    status[:rows, 1] = (weights < 0).sum(axis=1)
    status[:rows, 2] = (weights > 0).sum(axis=1)
    top = cp.where(finite, weights, 0).max(axis=1).astype(cp.float64)
    status[:rows, 3] = cp.where(top > 0, cp.frexp(top)[1], 0)
    status[rows, :2] = status[:rows, :2].max(axis=0)
    status[rows, 2] = status[:rows, 2].min()
    low, high = SCALE_FREE_EXPONENTS
    status[rows, 3] = ((status[:rows, 3] < low) | (status[:rows, 3] > high)).sum()
    totals = weights.sum(axis=1, dtype=cp.float64)
    return status, totals


def sample(weights, n, grid, seed, replace):
    """The GPU sampling backend, the CPU's interface (see ``atskern.sampling``).

    Returns int32 ``indices`` ``(B, n, D)``, float64 ``probs`` ``(B, n)`` and the int64
    ``status`` ``(B + 1, 4)``, all CuPy arrays (nothing is read back here).
    """
    cp = cupy()
    rows = weights.shape[0]
    status, totals = row_status(weights)
    flat = cp.empty((rows, n), dtype=cp.int64)
    if replace:
        sample_with_replacement(weights, n, seed, flat)
    else:
        sample_without_replacement(weights, n, seed, flat)
    drawn = cp.take_along_axis(weights, flat, axis=1).astype(cp.float64)
    probs = cp.where(drawn > 0, drawn / totals[:, None], 0.0)
    indices = cp.empty((rows, n, len(grid)), dtype=cp.int32)
    rest = flat
    for d in range(len(grid) - 1, -1, -1):  # integer division and remainder, never unravel_index (R4)
        indices[..., d] = rest % int(grid[d])
        rest = rest // int(grid[d])
    return indices, probs, status


def max_selection_n(threads: int | None = None) -> int:
    """Largest ``n`` the one-pass shared-memory selection handles; larger ``n`` sorts all keys."""
    threads = _module.THREADS_PER_BLOCK if threads is None else threads
    return SORT_SIZE - PER_THREAD * threads


def chunk_size(rows: int, size: int, threads: int) -> int:
    """Positions per block: enough blocks to fill the device, at least ``MIN_CHUNK`` positions each.

    The draws do not depend on it: each block keeps its exact n smallest keys.
    """
    cp = cupy()
    target_blocks = 4 * cp.cuda.Device().attributes["MultiProcessorCount"]
    pieces = max(1, -(-target_blocks // rows))
    tile = PER_THREAD * threads
    chunk = max(MIN_CHUNK, -(-size // pieces))
    return -(-chunk // tile) * tile


def sample_without_replacement(weights, n, seed, out, chunk=None):
    """Write into ``out`` (B, n) int64 the flat positions of a successive-sampling draw per row."""
    cp = cupy()
    rows, size = weights.shape
    threads = _module.THREADS_PER_BLOCK
    if n > max_selection_n(threads):
        return _sample_by_sorting(weights, n, seed, out)
    chunk = chunk_size(rows, size, threads) if chunk is None else chunk
    nchunks = -(-size // chunk)
    cand_keys = cp.empty((rows, nchunks, n), cp.float64)
    cand_idx = cp.empty((rows, nchunks, n), cp.int64)
    cand_count = cp.empty((rows, nchunks), cp.int32)
    kernel = _module.function(SOURCE, f"chunk_topn_{_suffix(weights)}")
    for row0 in range(0, rows, MAX_GRID_Y):
        row1 = min(rows, row0 + MAX_GRID_Y)
        kernel(
            (nchunks, row1 - row0),
            (threads,),
            (
                weights[row0:row1],
                np.int64(size),
                np.uint32(row0),
                np.int32(n),
                np.uint64(seed),
                np.int64(chunk),
                cand_keys[row0:row1],
                cand_idx[row0:row1],
                cand_count[row0:row1],
            ),
        )
    merge = _module.function(SOURCE, "merge_topn")
    merge((rows,), (threads,), (cand_keys, cand_idx, cand_count, np.int32(nchunks), np.int32(n), out))
    _fill_short_rows(weights, n, out)
    return out


def _fill_short_rows(weights, n, out):
    """Pad rows whose draw ended early (``NO_INDEX`` entries) with fillers (rule R1)."""
    rows, size = weights.shape
    threads = _module.THREADS_PER_BLOCK
    kernel = _module.function(SOURCE, f"fill_short_rows_{_suffix(weights)}")
    kernel((-(-rows // threads),), (threads,), (weights, np.int64(size), np.int32(rows), np.int32(n), out))


def _sample_by_sorting(weights, n, seed, out):
    cp = cupy()
    rows, size = weights.shape
    threads = _module.THREADS_PER_BLOCK
    keys = cp.empty((rows, size), cp.float64)
    total = rows * size
    blocks = min(-(-total // threads), 1 << 20)
    kernel = _module.function(SOURCE, f"exponential_keys_{_suffix(weights)}")
    kernel((blocks,), (threads,), (weights, np.int64(size), np.int64(total), np.uint32(0), np.uint64(seed), keys))
    out[...] = cp.argsort(keys, axis=1)[:, :n]
    positive = cp.take_along_axis(weights, out, axis=1) > 0
    out[...] = cp.where(positive, out, NO_INDEX)
    _fill_short_rows(weights, n, out)
    return out


def sample_with_replacement(weights, n, seed, out):
    """Write into ``out`` (B, n) int64 the flat positions of ``n`` independent draws per row."""
    cp = cupy()
    rows, size = weights.shape
    threads = _module.THREADS_PER_BLOCK
    cdf = cp.cumsum(weights, axis=1, dtype=cp.float64)
    kernel = _module.function(SOURCE, f"replacement_draws_{_suffix(weights)}")
    blocks = -(-(rows * n) // threads)
    kernel((blocks,), (threads,), (weights, cdf, np.int64(size), np.int32(rows), np.int32(n), np.uint64(seed), out))
    return out
