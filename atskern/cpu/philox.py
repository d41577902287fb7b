"""Philox4x32-10 for Numba kernels; the same numbers as ``atskern._rng`` (see its docstring)."""

from __future__ import annotations

import numpy as np

from .._rng import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, TWO_POW_M53
from ._jit import jit

_M0 = np.uint64(PHILOX_M0)
_M1 = np.uint64(PHILOX_M1)
_W0 = np.uint64(PHILOX_W0)
_W1 = np.uint64(PHILOX_W1)
_MASK = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_S21 = np.uint64(21)
_S11 = np.uint64(11)
_ONE = np.uint64(1)


@jit(inline="always")
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint64-held 32-bit words; returns the four output words."""
    for _ in range(9):
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = (p1 >> _S32) ^ c1 ^ k0, p1 & _MASK, (p0 >> _S32) ^ c3 ^ k1, p0 & _MASK
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    p0 = c0 * _M0
    p1 = c2 * _M1
    return (p1 >> _S32) ^ c1 ^ k0, p1 & _MASK, (p0 >> _S32) ^ c3 ^ k1, p0 & _MASK


@jit(inline="always")
def block_words(q, row, stream, k0, k1):
    """The four words of counter block ``q`` of ``(row, stream)``."""
    return philox4x32(q & _MASK, q >> _S32, np.uint64(row), np.uint64(stream), k0, k1)


@jit(inline="always")
def pick_word(w0, w1, w2, w3, lane):
    if lane == 0:
        return w0
    if lane == 1:
        return w1
    if lane == 2:
        return w2
    return w3


@jit(inline="always")
def to_uniform(hi, lo):
    """The float64 uniform in (0, 1] made of a high and a low 32-bit word."""
    return np.float64(((hi << _S21) | (lo >> _S11)) + _ONE) * TWO_POW_M53
