"""The counter-based random numbers that every backend draws (Philox4x32-10).

One generator, three implementations: vectorized NumPy here (used by
``reference.py``), Numba in ``cpu/philox.py`` and CUDA C in ``gpu/philox.cuh``.
A draw depends only on (seed, row, stream, position), never on thread count,
block size or backend.

Layout of the streams (``row`` is the batch row, ``q`` a 64-bit counter):

- ``STREAM_HI`` / ``STREAM_LO``: for sampling without replacement, position
  ``p`` of a row takes word ``p % 4`` of ``philox(q=p // 4, row, stream)``;
  the HI word gives the top 32 bits of the uniform and the LO word the next
  21. Most positions are rejected from the HI word alone, so the LO block is
  computed only for the few survivors.
- ``STREAM_REPLACE``: draw ``k`` of a row (with replacement) takes words
  ``2 (k % 2)`` (high) and ``2 (k % 2) + 1`` (low) of ``philox(q=k // 2, row, stream)``.

A uniform is ``u = (((hi << 21) | (lo >> 11)) + 1) * 2**-53``, in ``(0, 1]``.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

STREAM_HI = 0
STREAM_LO = 1
STREAM_REPLACE = 2

TWO_POW_M53 = 2.0**-53
TWO_POW_M32 = 2.0**-32

_MASK32 = np.uint64(0xFFFFFFFF)


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a 64-bit seed."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on arrays of 32-bit counter words (held in uint64); returns 4 uint64 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    shift = np.uint64(32)
    for round_ in range(PHILOX_ROUNDS):
        p0 = c0 * m0
        p1 = c2 * m1
        c0, c1, c2, c3 = (
            (p1 >> shift) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> shift) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        if round_ < PHILOX_ROUNDS - 1:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
    return c0, c1, c2, c3


def _block_words(q, row: int, stream: int, seed: int):
    q = np.asarray(q, dtype=np.uint64)
    k0, k1 = split_seed(seed)
    return philox4x32(q & _MASK32, q >> np.uint64(32), np.full_like(q, row), np.full_like(q, stream), k0, k1)


def to_uniform(hi, lo):
    """The float64 uniform in (0, 1] made of a high and a low 32-bit word."""
    hi = np.asarray(hi, dtype=np.uint64)
    lo = np.asarray(lo, dtype=np.uint64)
    mantissa = (hi << np.uint64(21)) | (lo >> np.uint64(11))
    return (mantissa + np.uint64(1)).astype(np.float64) * TWO_POW_M53


def position_words(positions, row: int, stream: int, seed: int):
    """Word ``p % 4`` of ``philox(p // 4, row, stream)`` for every position ``p``."""
    positions = np.asarray(positions, dtype=np.uint64).ravel()
    words = np.stack(_block_words(positions >> np.uint64(2), row, stream, seed))
    lane = (positions & np.uint64(3)).astype(np.intp)
    return words[lane, np.arange(positions.size)]


def position_uniforms(size: int, row: int, seed: int):
    """The uniform of every position ``0..size-1`` of a row, for sampling without replacement."""
    positions = np.arange(size, dtype=np.uint64)
    hi = position_words(positions, row, STREAM_HI, seed)
    lo = position_words(positions, row, STREAM_LO, seed)
    return to_uniform(hi, lo)


def replacement_uniforms(n: int, row: int, seed: int):
    """The uniform of draws ``0..n-1`` of a row, for sampling with replacement."""
    draws = np.arange(n, dtype=np.uint64)
    words = np.stack(_block_words(draws >> np.uint64(1), row, STREAM_REPLACE, seed))
    lane = (draws & np.uint64(1)).astype(np.intp) * 2
    columns = np.arange(n)
    return to_uniform(words[lane, columns], words[lane + 1, columns])


def random_seed() -> int:
    """A fresh 64-bit seed from the operating system's entropy."""
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
