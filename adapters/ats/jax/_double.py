"""Double-float arithmetic in float32, for the with-replacement draw when JAX has no float64.

A double-float is an unevaluated sum ``hi + lo`` of two float32 arrays,
``|lo|`` about an ulp of ``hi`` at most: about 48 significant bits. The
products that must be exact are exact by construction (products of 12-bit
halves), so XLA contracting a product and a sum into a fused multiply-add,
as its CPU backend does, changes nothing but the rounding of inexact terms.
XLA's CPU flushes subnormal numbers to zero: error terms below about 1e-38
are lost, nothing against rows whose largest weight is in [1/2, 1).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import _rng


def two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly, whatever the magnitudes (Knuth)."""
    s = a + b
    b_part = s - a
    a_part = s - b_part
    return s, (a - a_part) + (b - b_part)


def fast_two_sum(a, b):
    """:func:`two_sum` where ``|a| >= |b|`` (or ``a`` is 0)."""
    s = a + b
    return s, b - (s - a)


def add(x, y):
    """``x + y`` of two non-negative double-floats ``(hi, lo)``, to within a few units of 2**-48 of the sum."""
    s, e = two_sum(x[0], y[0])
    return fast_two_sum(s, e + (x[1] + y[1]))


def subtract(x, y):
    """``x - y`` of double-floats with ``x >= y >= 0`` or nearly so, to within a few units of 2**-48 of ``x``."""
    s, e = two_sum(x[0], -y[0])
    return fast_two_sum(s, e + (x[1] - y[1]))


def reaches(x, target):
    """``x >= target`` for double-floats: the sign of ``(x_hi - t_hi) + (x_lo - t_lo)``, whose first difference is
    exact wherever the lows matter, so neither needs to be normalized."""
    return (x[0] - target[0]) + (x[1] - target[1]) >= 0


def halves(a):
    """``(high, low)`` with ``high + low = a`` exactly, ``high`` of 12 significant bits and ``|low|`` at most half
    an ulp of them (Veltkamp's split, by rounding the bit pattern instead of multiplying by ``2**12 + 1``)."""
    bits = lax.bitcast_convert_type(a, jnp.uint32)
    high = lax.bitcast_convert_type((bits + jnp.uint32(0x800)) & jnp.uint32(0xFFFFF000), jnp.float32)
    return high, a - high


def two_product(a, b):
    """``(p, e)`` with ``p + e = a b`` to within about 2**-47 of it, for non-negative float32 ``a`` and ``b`` whose
    partial products stay normal: the sum of the four exact products of their :func:`halves`. Dekker's
    ``(a_high b_high - p) + ...`` with ``p = fl(a b)`` is exact only while ``p`` is rounded: XLA's CPU contracts
    ``a_high b_high - a b`` into a fused multiply-add, which dropped ``p``'s rounding error."""
    a_high, a_low = halves(a)
    b_high, b_low = halves(b)
    middle, middle_error = two_sum(a_high * b_low, a_low * b_high)
    p, e = two_sum(a_high * b_high, middle)
    return p, e + (middle_error + a_low * b_low)


def multiply(x, y):
    """``x y`` of two non-negative double-floats, to within a few units of 2**-48 of the product."""
    p, e = two_product(x[0], y[0])
    return fast_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def uniforms(hi, lo):
    """atskern's 53-bit uniform ``(((hi << 21) | (lo >> 11)) + 1) 2**-53`` as a double-float: the top 24 bits in
    ``hi``, the other 29 (plus 1) rounded to float32, an error of at most 2**-49."""
    top = lax.shift_right_logical(hi, jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
    rest = ((hi & jnp.uint32(0xFF)) << 21 | lax.shift_right_logical(lo, jnp.uint32(11))) + jnp.uint32(1)
    return fast_two_sum(top, rest.astype(jnp.float32) * jnp.float32(_rng.TWO_POW_M53))
