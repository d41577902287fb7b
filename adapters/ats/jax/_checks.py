"""JAX-specific argument handling of ``ats.jax`` (the checks themselves are in ``ats._xla_common``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._xla_common import (  # noqa: F401  (re-exported for functional.py)
    attention_values,
    boolean,
    checked_fill,
    grid_of,
    int32_clamps,
    margins,
    positive_int,
    probs_values,
    refuse_subnormal_rows,
    size_tuple,
)
from ._paths import is_concrete  # noqa: F401  (re-exported for functional.py)


def as_array(value, name: str):
    if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
        return jnp.asarray(value)
    raise TypeError(f"{name} must be a JAX or NumPy array, got {type(value).__name__}")


def as_index_array(value, name: str):
    """:func:`as_array` for offsets or cells: a NumPy int64/uint64 array that JAX would cut to int32 (x64 off)
    is clamped into int32 first, so a value far outside an image stays outside instead of wrapping back in."""
    if (isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.dtype.itemsize == 8
            and not jax.config.jax_enable_x64):
        low, high = int32_clamps(value.dtype)
        value = np.minimum(value, value.dtype.type(high))
        value = (value if low is None else np.maximum(value, low)).astype(np.int32)
    return as_array(value, name)


def attention(att, n: int, without_replacement: bool) -> tuple[int, ...]:
    """Grid shape of an attention map ``(B, *grid)``."""
    return grid_of(att.shape, jnp.issubdtype(att.dtype, jnp.floating), n, without_replacement)
