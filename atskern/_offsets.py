"""Exact patch offsets: ``rint(c - P / 2)`` with round half to even, in integer arithmetic.

A cell ``s`` of a grid of ``G`` cells has its centre at
``c = L * (m + (s + 1/2) / G * (1 - 2 m))`` in a level of ``L`` pixels. With the
margin an exact fraction ``m = num / den`` (``receptive_field / (2 low_size)``
in a model), ``c - P / 2 = N / D`` with ``D = 2 G den`` and
``N = L X - P G den``, ``X = 2 G num + (2 s + 1)(den - 2 num)``: integers, so a
tie (``N / D`` exactly half-way) is recognised exactly. Float arithmetic lands
beside the ties (``L = 150, G = 8, s = 3``: ``c = 10.5`` exactly, float64 gives
10.500000000000002).

The functions take any integer arrays with floor division (NumPy, CuPy,
torch and TensorFlow tensors) or Python ints; every front end computes with
these same lines. ``X`` is split as ``qx D + rx`` so that int64 holds every
intermediate for grids, levels and patches far beyond real images
(:func:`fits_int64` says when it does).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

INT32_MAX = 2**31 - 1
SAMPLE_LIMIT = 2**31
"""Samples are clamped to ``[-SAMPLE_LIMIT, SAMPLE_LIMIT]`` (grid cells are far inside)."""


def round_half_even_div(y, d, to_int, base=0):
    """``rint(base + y / d)``, half to even, for integers ``base``, ``y`` and ``d > 0`` (``to_int`` casts a
    boolean array): a tie goes to the even one of ``base + q`` and ``base + q + 1``, so the parity is the sum's,
    not ``q``'s alone."""
    q = y // d
    twice_rest = 2 * (y - q * d)
    whole = base + q
    up = (twice_rest > d) | ((twice_rest == d) & (whole % 2 == 1))
    return whole + to_int(up)


def start(s, grid, level, patch, num, den, to_int):
    """Exact first pixel ``rint(L (m + (s + 1/2) / G (1 - 2 m)) - P / 2)`` with ``m = num / den`` (unclipped).

    ``L X / D`` is split as ``L qx + L rx / D``; outside the grid (``s < 0`` or ``s >= G``) ``L qx`` may be odd,
    and a tie then rounds by the parity of the whole (it once took ``q``'s: ``s = -2, G = 15, L = 1105, P = 132``
    gave -177 for -176.5)."""
    d = 2 * grid * den
    x = 2 * grid * num + (2 * s + 1) * (den - 2 * num)
    qx = x // d
    rx = x - qx * d
    return round_half_even_div(level * rx - patch * grid * den, d, to_int, base=level * qx)


def table(grid: int, level: int, patch: int, num: int, den: int) -> np.ndarray:
    """The unclipped :func:`start` of every cell ``0 .. grid - 1``: int64 where :func:`fits_int64` says int64 holds
    the arithmetic, else Python ints (an object array, exact and slower)."""
    dtype = np.int64 if fits_int64(grid, level, patch, num, den) else object
    cells = np.arange(grid, dtype=np.int64).astype(dtype)
    return start(cells, grid, level, patch, num, den, to_int=lambda mask: mask.astype(dtype))


def fits_int64(grid: int, level: int, patch: int, num: int, den: int) -> bool:
    """Whether :func:`start` stays within int64 for ``|s| <= SAMPLE_LIMIT``."""
    d = 2 * grid * den
    x = 2 * grid * num + (2 * SAMPLE_LIMIT + 1) * den
    largest = max(x, level * d + patch * grid * den, 4 * d, level * (x // d + 2))
    return largest < 2**62


def simplest_fraction(value) -> Fraction:
    """A margin as an exact fraction: Fractions and ints as they are; a float as the simplest fraction
    with denominator at most 2**24 that rounds to it (``3 / 2 / 50`` gives 3/100), else its exact value."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, np.floating):  # float16/float32/longdouble: Fraction takes Python floats only
        value = float(value)
    exact = Fraction(value)
    if exact.denominator == 1:
        return exact
    simple = exact.limit_denominator(1 << 24)
    return simple if float(simple) == float(value) else exact
