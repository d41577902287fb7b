"""Argument checks of ``ats.jax``: static ones always, value checks when the values are concrete.

Under ``jax.jit`` (or any transformation that traces) the values are not
known, so only shapes, dtypes and Python arguments are checked; called
eagerly, bad values raise a ``ValueError`` naming the argument and the row
before any computation, as in atskern.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def as_array(value, name: str):
    if isinstance(value, (jax.Array, np.ndarray)) or isinstance(value, jax.core.Tracer):
        return jnp.asarray(value)
    raise TypeError(f"{name} must be a JAX or NumPy array, got {type(value).__name__}")


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def boolean(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def size_tuple(size, dims: int, name: str) -> tuple[int, ...]:
    """``size`` as ``dims`` positive ints (one int is used for every dim)."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size),) * dims
    try:
        sizes = tuple(size)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of {dims} ints, got {size!r}") from None
    if len(sizes) != dims:
        raise ValueError(f"{name} must have {dims} entries (one per spatial dimension), got {sizes!r}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"{name} must hold positive integers, got {sizes!r}")
    return tuple(int(s) for s in sizes)


def margins(margin, dims: int) -> list:
    """One margin per dim, each a real in [0, 1/2) (a ``fractions.Fraction`` is kept exact)."""
    values = list(margin) if isinstance(margin, (list, tuple)) else [margin] * dims
    if len(values) != dims:
        raise ValueError(f"margin must be a number or {dims} numbers, got {margin!r}")
    for m in values:
        if isinstance(m, bool) or not isinstance(m, numbers.Real):
            raise TypeError(f"margin must be a real number (or one per dim), got {margin!r}")
        if not 0 <= m < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin!r}")
    return values


def attention(att, n: int, without_replacement: bool) -> tuple[int, ...]:
    """Grid shape of an attention map ``(B, *grid)``."""
    if att.ndim not in (2, 3, 4):
        raise ValueError(
            f"attention must be (batch, *grid) with 1 to 3 grid dimensions (rank 2 to 4), got shape {tuple(att.shape)}"
        )
    if not jnp.issubdtype(att.dtype, jnp.floating):
        raise TypeError(f"attention must be floating, got {att.dtype}")
    if 0 in att.shape:
        raise ValueError(f"attention must not be empty, got shape {tuple(att.shape)}")
    grid = tuple(int(s) for s in att.shape[1:])
    positions = int(np.prod(grid))
    if positions >= 2**34:
        raise ValueError(f"attention rows must have fewer than 2**34 cells, got {positions}")
    if without_replacement and n > positions:
        raise ValueError(
            f"n_samples={n} is larger than the {positions} positions of attention's grid {grid}; "
            "sampling without replacement (or top-k) cannot draw more (use replace=True)"
        )
    return grid


def attention_values(att, n: int, replace: bool, logits: bool, strict: bool):
    """Value checks of concrete attention rows (NaN/inf, negative, empty rows, short rows when ``strict``)."""
    flat = np.asarray(att, dtype=np.float64).reshape(att.shape[0], -1)
    bad = np.isnan(flat) | (flat == np.inf) if logits else ~np.isfinite(flat)
    for row in np.flatnonzero(bad.any(axis=1))[:1]:
        what = "NaN or +inf logits" if logits else "NaN or inf"
        raise ValueError(f"attention row {row} contains {what} ({int(bad[row].sum())} entries)")
    if not logits:
        for row in np.flatnonzero((flat < 0).any(axis=1))[:1]:
            raise ValueError(
                f"attention row {row} has {int((flat[row] < 0).sum())} negative weights; "
                "weights must be >= 0 (pass logits=True for unnormalized log-probabilities)"
            )
    positive = (flat > -np.inf).sum(axis=1) if logits else (flat > 0).sum(axis=1)
    for row in np.flatnonzero(positive == 0)[:1]:
        raise ValueError(f"attention row {row} has no positive weight (all zero, or all logits -inf)")
    if strict and not replace:
        for row in np.flatnonzero(positive < n)[:1]:
            raise ValueError(
                f"attention row {row} has {int(positive[row])} positive weights, fewer than n_samples={n}; "
                "without replacement and strict=True that is an error (strict=False pads with zero-probability fillers)"
            )


def probs_tolerance(dtype, n: int) -> float:
    """How far above 1 a row of probabilities may sum: 1e-6 for float64, ``n * 2**-20`` otherwise."""
    return 1e-6 if np.dtype(dtype) == np.float64 else n * 2.0**-20


def probs_values(probs, replace: bool):
    """Rule R3: ``probs`` finite, in [0, 1], and (without replacement) rows summing to at most 1 + tolerance."""
    values = np.asarray(probs, dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    for row in np.flatnonzero(bad.any(axis=1))[:1]:
        raise ValueError(f"probs must be finite and in [0, 1]; row {row} holds {values[row][bad[row]][:3].tolist()}")
    if not replace:
        sums = values.sum(axis=1)
        tolerance = probs_tolerance(probs.dtype, values.shape[1])
        for row in np.flatnonzero(sums > 1 + tolerance)[:1]:
            raise ValueError(
                f"probs of row {row} sum to {sums[row]!r} > 1 + {tolerance:g}: without replacement a row's "
                "probabilities are those of distinct cells of one distribution"
            )
