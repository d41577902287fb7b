"""The ``ats.keras`` ops on Keras' JAX backend: :mod:`ats.jax` (pure JAX: ``jit``, ``vmap``, any device).

JAX's 64-bit mode is left as the user set it: without it sampling runs in
float32 and may order near-tied keys differently from atskern (see ``ats.jax``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ... import jax as aj
from ...jax import expectation, extract_patches, patch_offsets  # noqa: F401 (this backend's ops)
from ...jax._rng import OPS as UINT32
from ...jax._sampling import top_cells as top_indices  # noqa: F401 (this backend's op)
from .. import _keys


def sample(attention, n, *, replace, key, deterministic):
    if deterministic:
        return aj.sample(attention, n, replace=replace, deterministic=True)
    return aj.sample(attention, n, key=key, replace=replace)


def _float32_bits(values):
    """uint32 bits of ``values`` rounded to float32 as NumPy rounds them. XLA's CPU cast of float64 flushes results
    below float32's smallest normal number (1.2e-38) to zero, so there the bits are computed: a float32 subnormal
    is its multiple of ``2**-149`` (rounded half to even, exact in float64), with the sign bit."""
    if values.dtype != jnp.float64:
        return lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    magnitude = jnp.abs(values)
    multiple = jnp.round(magnitude * 2.0**149).astype(jnp.uint32)  # up to 2**23: the smallest normal's bits
    sign = (lax.bitcast_convert_type(values, jnp.uint64) >> jnp.uint64(63)).astype(jnp.uint32)
    tiny = multiple | (sign << jnp.uint32(31))
    return jnp.where(magnitude < 2.0**-126, tiny, lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32))


def fingerprint(attention):
    """uint32 ``[word0, word1]`` of :func:`ats.keras._keys.fingerprint`, in ``jnp`` ops (traceable)."""
    bits = _float32_bits(lax.stop_gradient(attention)).reshape(-1)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    words = []
    for j in (0, 1):
        offset = (index + index + jnp.uint32(j + 1)) * jnp.uint32(_keys.GOLDEN32)
        words.append(jnp.sum(_keys.fmix32(bits + offset, UINT32), dtype=jnp.uint32))
    return jnp.stack(words)


def key_words(state):
    """uint32 ``[k0, k1]`` of a seed generator state (uint32 on this backend)."""
    return jnp.asarray(state).astype(jnp.uint32)


def xor(words, salt):
    return words ^ jnp.asarray(salt, dtype=jnp.uint32)


def seed_key(seed):
    """Key words (uint32) of a helper's seed: None takes a fresh seed (:func:`ats.keras._keys.fresh_seed`;
    under ``jax.jit`` a constant of the trace: pass a seed tensor there); an int or an integer scalar tensor
    ``s`` (traced or not) gives the words of ``s`` (two's complement), salted with the process rank."""
    if seed is None:
        seed = _keys.fresh_seed()
    if isinstance(seed, int):
        return jnp.asarray(_keys.seed_key(seed))
    seed = jnp.asarray(seed)
    if seed.shape != () or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise TypeError(f"seed must be None, an int or an integer scalar tensor, got {seed!r}")
    low = seed.astype(jnp.uint32)
    if seed.dtype.itemsize > 4:  # 64-bit mode
        high = (seed >> 32).astype(jnp.uint32)
    elif jnp.issubdtype(seed.dtype, jnp.signedinteger):
        high = jnp.where(seed < 0, jnp.uint32(_keys.MASK32), jnp.uint32(0))
    else:
        high = jnp.uint32(0)
    words = jnp.stack([low, high])
    salt = _keys.rank_salt()
    return xor(words, salt) if salt != (0, 0) else words


def check_inputs(x_low, x_high, attention, size):
    sizes = {"x_low": x_low.shape[0], "x_high": x_high.shape[0], "attention": attention.shape[0]}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"x_low, x_high and attention must share the batch size, got {described}")
    return x_high


def spatial_shape(x):
    return tuple(int(s) for s in x.shape[1:-1])


def grid_shape(attention):
    return tuple(int(s) for s in attention.shape[1:])


def static_value(value):
    """``value`` as NumPy, or None for a value traced by ``jax.jit`` (not known now)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def x64():
    """Whether JAX's 64-bit mode is on (the library never turns it on itself)."""
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)


def cumsum(x, axis: int):
    return jnp.cumsum(x, axis=axis)
