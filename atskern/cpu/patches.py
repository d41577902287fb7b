"""Numba patch gather and its adjoint scatter, on the canonical layout of ``atskern.patches``.

Images arrive as ``(B, R, S0, S1, W)`` and patches as ``(B, K, R, P0, P1, Wp)``:
missing spatial dims are leading 1s, and in channels-last the channels are
folded into the last dim (``W = S2 * C``), so the inner copy is one contiguous
run per patch row. Offsets are int64 ``(B, K, 3)``, already clipped to
``[-P, S]`` and scaled to the last dim's unit. Gathers see the bytes only
(uint8/16/32/64 views made by the caller).
"""

from __future__ import annotations

import numba
from numba import prange

from ._copy import copy_run
from ._jit import jit


@jit(inline="always")
def _span(o2, width, image_width):
    """The in-bounds part ``[lo, hi)`` of a patch row of ``width`` starting at ``o2``."""
    lo = max(0, -o2)
    hi = max(lo, min(width, image_width - o2))
    return lo, hi


@jit(parallel=True)
def gather(x, offsets, fill, out):
    """``out[b, k, r, i0, i1, t] = x[b, r, o0 + i0, o1 + i1, o2 + t]``, or ``fill`` outside ``x``."""
    batch, count, rows, p0, p1, width = out.shape
    s0_size, s1_size, image_width = x.shape[2], x.shape[3], x.shape[4]
    for item in prange(batch * count):
        b = item // count
        k = item - b * count
        o0 = offsets[b, k, 0]
        o1 = offsets[b, k, 1]
        o2 = offsets[b, k, 2]
        lo, hi = _span(o2, width, image_width)
        for r in range(rows):
            for i0 in range(p0):
                s0 = o0 + i0
                for i1 in range(p1):
                    s1 = o1 + i1
                    dst = out[b, k, r, i0, i1]
                    if s0 < 0 or s0 >= s0_size or s1 < 0 or s1 >= s1_size:
                        dst[:] = fill
                        continue
                    for t in range(lo):
                        dst[t] = fill
                    copy_run(dst, lo, x[b, r, s0, s1], o2 + lo, hi - lo)
                    for t in range(hi, width):
                        dst[t] = fill


@jit(parallel=True)
def scatter(grad, offsets, bands, out):
    """The adjoint of :func:`gather`: ``out`` (overwritten) sums every patch at its offset.

    Work items are ``(b, r, band)``, a band being a range of the image's
    ``S0 * S1`` rows; each adds the patches into its own rows in index order,
    so every output element is the same ordered sum for any ``bands`` and
    any thread count.
    """
    batch, count, rows, p0, p1, width = grad.shape
    s0_size, s1_size, image_width = out.shape[2], out.shape[3], out.shape[4]
    image_rows = s0_size * s1_size
    for item in prange(batch * rows * bands):
        b = item // (rows * bands)
        rest = item - b * rows * bands
        r = rest // bands
        band = rest - r * bands
        row_lo = band * image_rows // bands
        row_hi = (band + 1) * image_rows // bands
        for row in range(row_lo, row_hi):
            s0 = row // s1_size
            out[b, r, s0, row - s0 * s1_size, :] = 0
        if row_hi == row_lo:
            continue
        first_s0 = row_lo // s1_size
        last_s0 = (row_hi - 1) // s1_size
        for k in range(count):
            o0 = offsets[b, k, 0]
            o1 = offsets[b, k, 1]
            o2 = offsets[b, k, 2]
            lo, hi = _span(o2, width, image_width)
            if hi == lo:
                continue
            for i0 in range(max(0, first_s0 - o0), min(p0, last_s0 - o0 + 1)):
                s0 = o0 + i0
                for i1 in range(max(0, -o1), min(p1, s1_size - o1)):
                    s1 = o1 + i1
                    row = s0 * s1_size + s1
                    if row < row_lo or row >= row_hi:
                        continue
                    dst = out[b, r, s0, s1]
                    src = grad[b, k, r, i0, i1]
                    for t in range(lo, hi):
                        dst[o2 + t] += src[t]


BAND_VISIT_COST = 32
"""About how many added elements a band's visit of one patch costs (its bounds test); see :func:`scatter_bands`."""


def scatter_bands(batch: int, rows: int, image_rows: int, patch_elements: int) -> int:
    """Row bands per image so that there are a few work items per thread (does not change results).

    Each band visits every patch of its image, so more bands than ``patch_elements / BAND_VISIT_COST`` (a patch's
    elements per channel row) would spend more on visits than on additions: 100,000 patches of 1x1 on one image
    took 15-20 ms with the 8 bands of 2 threads, 2-3 ms with one."""
    wanted = 4 * numba.get_num_threads()
    per_image = -(-wanted // max(1, batch * rows))
    return int(max(1, min(image_rows, per_image, patch_elements // BAND_VISIT_COST)))
