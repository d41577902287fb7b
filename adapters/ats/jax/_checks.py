"""JAX-specific argument handling of ``ats.jax`` (the checks themselves are in ``ats._xla_common``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._xla_common import (  # noqa: F401  (re-exported for functional.py)
    attention_values,
    boolean,
    grid_of,
    margins,
    positive_int,
    probs_values,
    size_tuple,
)
from ._paths import is_concrete  # noqa: F401  (re-exported for functional.py)


def as_array(value, name: str):
    if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
        return jnp.asarray(value)
    raise TypeError(f"{name} must be a JAX or NumPy array, got {type(value).__name__}")


def attention(att, n: int, without_replacement: bool) -> tuple[int, ...]:
    """Grid shape of an attention map ``(B, *grid)``."""
    return grid_of(att.shape, jnp.issubdtype(att.dtype, jnp.floating), n, without_replacement)
