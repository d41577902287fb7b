"""atskern's Philox streams and uniforms in ``jax.numpy`` (uint32 only; no 64-bit integer needed).

``keys`` / ``seed_words`` turn a seed into the Philox key; ``position_words``
and ``replacement_words`` give the words of atskern's stream layout
(``atskern._rng``); ``exponentials`` gives ``-log(u)`` of the 53-bit uniform
in float64 when JAX's 64-bit mode is on and to within about one float32 ulp
otherwise; ``uniforms`` gives ``u`` itself.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _xla_philox as px

OPS = px.UInt32Ops(
    const=lambda value: jnp.uint32(value),
    add=lambda a, b: a + b,
    mul=lambda a, b: a * b,
    xor=lambda a, b: a ^ b,
    band=lambda a, b: a & b,
    shr=lambda a, bits: lax.shift_right_logical(a, jnp.uint32(bits)),
)

TWO_POW_M32 = 2.0**-32
TWO_POW_M53 = 2.0**-53


def x64_enabled() -> bool:
    """Whether JAX currently has 64-bit types (``jax_enable_x64``, global or a local context)."""
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)


def compute_dtype():
    """float64 under JAX's 64-bit mode, float32 otherwise."""
    return jnp.float64 if x64_enabled() else jnp.float32


def seed_words(key):
    """The Philox key ``(k0, k1)`` as uint32 scalars.

    ``key`` is an int in ``[0, 2**64)`` (atskern's ``seed``: ``k0 = seed % 2**32``,
    ``k1 = seed // 2**32``), a non-negative integer scalar array (the same seed;
    a Python int passed to a jitted function arrives traced as one), a uint32
    array ``[k0, k1]`` (may be traced), or a JAX PRNG key whose data are two
    uint32 words (the default threefry key), used as ``[k0, k1]``.
    """
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        key = int(key)
        if not 0 <= key < 2**64:
            raise ValueError(f"key must be an int in [0, 2**64), got {key}")
        return jnp.uint32(key & 0xFFFFFFFF), jnp.uint32(key >> 32)
    if (hasattr(key, "dtype") and tuple(getattr(key, "shape", (None,))) == ()
            and jnp.issubdtype(key.dtype, jnp.integer)):
        if not isinstance(key, jax.core.Tracer) and int(key) < 0:
            raise ValueError(f"key must be an int in [0, 2**64), got {int(key)}")
        if jnp.dtype(key.dtype).itemsize < 8:
            return key.astype(jnp.uint32), jnp.uint32(0)
        wide = key.astype(jnp.uint64)
        return (wide & 0xFFFFFFFF).astype(jnp.uint32), (wide >> 32).astype(jnp.uint32)
    if isinstance(key, bool) or not hasattr(key, "dtype"):
        raise TypeError(f"key must be an int in [0, 2**64), a uint32 array [k0, k1] or a JAX PRNG key, got {key!r}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32 or tuple(key.shape) != (2,):
        raise TypeError(f"key must be a uint32 array of shape (2,) (or a PRNG key holding one), got {key.dtype} {tuple(key.shape)}")
    return key[0], key[1]


def _blocks(rows: int, count: int, stream: int, k0, k1):
    """Words of blocks ``0..count-1`` of every row: ``(rows, count, 4)`` uint32."""
    q = jnp.broadcast_to(jnp.arange(count, dtype=jnp.uint32)[None, :], (rows, count))
    row = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.uint32)[:, None], (rows, count))
    return jnp.stack(px.block_words(OPS, q, row, stream, k0, k1), axis=-1)


def position_words(rows: int, size: int, k0, k1):
    """HI and LO words of positions ``0..size-1`` of every row (sampling without replacement)."""
    count = -(-size // 4)
    hi = _blocks(rows, count, px.STREAM_HI, k0, k1).reshape(rows, 4 * count)[:, :size]
    lo = _blocks(rows, count, px.STREAM_LO, k0, k1).reshape(rows, 4 * count)[:, :size]
    return hi, lo


def replacement_words(rows: int, n: int, k0, k1):
    """High and low words of draws ``0..n-1`` of every row (sampling with replacement)."""
    count = -(-n // 2)
    words = _blocks(rows, count, px.STREAM_REPLACE, k0, k1).reshape(rows, 2 * count, 2)[:, :n]
    return words[..., 0], words[..., 1]


def uniforms(hi, lo, dtype):
    """``u = (((hi << 21) | (lo >> 11)) + 1) 2**-53`` in ``(0, 1]``: exact in float64, rounded in float32."""
    low = (lax.shift_right_logical(lo, jnp.uint32(11)) + 1).astype(dtype)
    if dtype == jnp.float64:  # every step exact (integers below 2**53); no 64-bit integers needed
        return (hi.astype(jnp.float64) * 2.0**21 + low) * TWO_POW_M53
    return hi.astype(jnp.float32) * jnp.float32(TWO_POW_M32) + low * jnp.float32(TWO_POW_M53)


def exponentials(hi, lo, dtype):
    """``-log(u)`` of each uniform. In float32, ``1 - u`` is formed from the complemented words for
    ``u > 1/2`` (where the small keys come from), so the result is within about an ulp of the float64 one."""
    if dtype == jnp.float64:
        return -jnp.log(uniforms(hi, lo, dtype))
    complement = (~hi).astype(jnp.float32) * jnp.float32(TWO_POW_M32) + lax.shift_right_logical(~lo, jnp.uint32(11)).astype(
        jnp.float32
    ) * jnp.float32(TWO_POW_M53)
    upper = hi >= jnp.uint32(0x80000000)
    return jnp.where(upper, -jnp.log1p(-complement), -jnp.log(uniforms(hi, lo, dtype)))
