"""Attention-grid cells to slide pixels for batches of slides of different sizes (pad and mask), in NumPy."""

from __future__ import annotations

import numpy as np


def valid_cells(grid, padded, sizes) -> np.ndarray:
    """Bool ``(B, *grid)``: the cells whose centre lies inside each slide's valid low-resolution area, and the
    first cell of an axis along which a slide is shorter than half a cell (so that every slide has a cell).

    ``grid`` ``(gh, gw)`` covers a padded low view of ``padded`` ``(Hp, Wp)``
    pixels; ``sizes`` ``(B, 2)`` are the slides' own low-view sizes (their
    views sit at the top left, padding at the bottom and right).
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    masks = []
    for axis in range(2):
        cells, view = int(grid[axis]), int(padded[axis])
        # centre (s + 1/2) Hp / G < h, on integers as slide_offsets decides it (floats put exact ties inside)
        twice_centres = (2 * np.arange(cells, dtype=np.int64) + 1) * view
        mask = twice_centres[None, :] < 2 * cells * sizes[:, axis:axis + 1]
        mask[:, 0] |= sizes[:, axis] > 0
        masks.append(mask)
    return masks[0][:, :, None] & masks[1][:, None, :]


def slide_offsets(samples, grid, padded, low_size, level_shape, patch) -> np.ndarray:
    """Level offsets ``(K, 2)`` int64 of grid cells ``samples`` ``(K, 2)`` for one slide, in exact integer arithmetic.

    A cell ``s`` of a grid ``G`` laid over a padded low view of ``Hp`` pixels
    has its centre at ``(s + 0.5) Hp / G`` low pixels, i.e. at
    ``c = (s + 0.5) Hp / G * L / h`` pixels of a level of size ``L`` (``h``
    the slide's own low size); the patch starts at ``rint(c - P / 2)``, round
    half to even, computed on integers (no float lands beside a .5 tie). For
    an unpadded slide (``Hp == h``) this is ``atskern.patch_offsets`` with
    margin 0. A cell whose centre lies outside the slide's view (the first
    cell of a slide shorter than half a cell, which :func:`valid_cells` keeps)
    is centred on the slide instead: ``c = L / 2``.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be (K, 2) grid cells, got shape {samples.shape}")
    out = np.empty((len(samples), 2), np.int64)
    for axis in range(2):
        s = samples[:, axis].astype(np.int64)
        G, Hp, h, L, P = (int(grid[axis]), int(padded[axis]), int(low_size[axis]), int(level_shape[axis]),
                          int(patch[axis]))
        num = (2 * s + 1) * Hp * L - P * G * h  # c - P / 2 == num / den
        num = np.where((2 * s + 1) * Hp >= 2 * G * h, (L - P) * G * h, num)  # centre outside: the slide's middle
        den = 2 * G * h
        q, r = np.divmod(num, den)
        out[:, axis] = q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1)))
    return out
