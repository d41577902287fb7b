"""The ``ats.keras`` ops on Keras' JAX backend: :mod:`ats.jax` (pure JAX: ``jit``, ``vmap``, any device).

JAX's 64-bit mode is left as the user set it: without it sampling runs in
float32 and may order near-tied keys differently from atskern (see ``ats.jax``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ... import jax as aj
from ...jax._rng import OPS as UINT32
from .. import _keys


def sample(attention, n, *, replace, key, deterministic):
    if deterministic:
        return aj.sample(attention, n, replace=replace, deterministic=True)
    return aj.sample(attention, n, key=key, replace=replace)


def patch_offsets(indices, grid, level, size, margin):
    return aj.patch_offsets(indices, grid, level, size, margin=margin)


def extract_patches(x, offsets, size, fill):
    return aj.extract_patches(x, offsets, size, fill=fill)


def expectation(features, probs, replace):
    return aj.expectation(features, probs, replace=replace)


def fingerprint(attention):
    """uint32 ``[word0, word1]`` of :func:`ats.keras._keys.fingerprint`, in ``jnp`` ops (traceable)."""
    bits = lax.bitcast_convert_type(lax.stop_gradient(attention).astype(jnp.float32), jnp.uint32).reshape(-1)
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
