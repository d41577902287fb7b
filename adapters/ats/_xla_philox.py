"""atskern's Philox4x32-10 stream in framework ops (JAX or TensorFlow), 32-bit integers only.

The generator, stream layout and uniforms are those of ``atskern._rng``; this
module writes them once over a small table of unsigned 32-bit operations
(:class:`UInt32Ops`), which ``ats.jax`` and ``ats.tf.xla`` fill with ``jnp`` /
``tf`` functions. No 64-bit integer type is needed: the 32 x 32 -> 64-bit
products of a Philox round are assembled from 16-bit halves, so the code runs
under JAX's default 32-bit mode and compiles under XLA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from atskern._rng import (  # noqa: F401 - one set of constants for every implementation of the generator
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    STREAM_HI,
    STREAM_LO,
    STREAM_REPLACE,
)

MASK16 = 0xFFFF


@dataclass(frozen=True)
class UInt32Ops:
    """Wrapping unsigned 32-bit arithmetic of one framework (arguments broadcast)."""

    const: Callable[[int], Any]
    add: Callable[[Any, Any], Any]
    mul: Callable[[Any, Any], Any]
    xor: Callable[[Any, Any], Any]
    band: Callable[[Any, Any], Any]
    shr: Callable[[Any, int], Any]


def mulhilo(ops: UInt32Ops, a, m: int):
    """``(hi, lo)`` 32-bit words of the 64-bit product ``a * m`` (``m`` a Python constant)."""
    a_lo = ops.band(a, ops.const(MASK16))
    a_hi = ops.shr(a, 16)
    m_lo = ops.const(m & MASK16)
    m_hi = ops.const(m >> 16)
    ll = ops.mul(a_lo, m_lo)
    lh = ops.mul(a_lo, m_hi)
    hl = ops.mul(a_hi, m_lo)
    hh = ops.mul(a_hi, m_hi)
    mask = ops.const(MASK16)
    middle = ops.add(ops.add(ops.shr(ll, 16), ops.band(lh, mask)), ops.band(hl, mask))
    hi = ops.add(ops.add(ops.add(hh, ops.shr(lh, 16)), ops.shr(hl, 16)), ops.shr(middle, 16))
    lo = ops.mul(a, ops.const(m))
    return hi, lo


def philox4x32(ops: UInt32Ops, c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter words ``c0..c3`` under key ``(k0, k1)`` (uint32 tensors); 4 words."""
    w0, w1 = ops.const(PHILOX_W0), ops.const(PHILOX_W1)
    for round_ in range(PHILOX_ROUNDS):
        hi0, lo0 = mulhilo(ops, c0, PHILOX_M0)
        hi1, lo1 = mulhilo(ops, c2, PHILOX_M1)
        c0, c1, c2, c3 = ops.xor(ops.xor(hi1, c1), k0), lo1, ops.xor(ops.xor(hi0, c3), k1), lo0
        if round_ < PHILOX_ROUNDS - 1:
            k0 = ops.add(k0, w0)
            k1 = ops.add(k1, w1)
    return c0, c1, c2, c3


def block_words(ops: UInt32Ops, q, row, stream: int, k0, k1):
    """The four words of block ``q`` (< 2**32) of ``row``'s ``stream``: ``philox((q, 0, row, stream))``."""
    zero = ops.band(q, ops.const(0))
    return philox4x32(ops, q, zero, ops.add(row, zero), ops.add(zero, ops.const(stream)), k0, k1)
