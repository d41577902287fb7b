"""Framework-free parts of the XLA-native paths (``ats.jax`` and ``ats.tf.xla``): argument and value
checks that raise before anything runs, and the exact patch-offset tables (rule R5).

Value checks need concrete values: the front ends call them when called
eagerly, never on traced (``jax.jit``) or symbolic (``tf.function``) tensors.
"""

from __future__ import annotations

import functools
import numbers
import operator

import numpy as np

from atskern import _offsets, _validation
from atskern._offsets import simplest_fraction
from atskern.sampling import logits_to_weights


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def int32_clamps(dtype) -> tuple[int | None, int | None]:
    """The int32 limits that values of the integer ``dtype`` must be clamped to before a cast to int32 (None
    where the dtype cannot pass it): a saturating cast keeps an offset or a cell far outside an image outside it,
    where a plain cast would wrap it back in (2**32 + 1 to 1)."""
    info = np.iinfo(np.dtype(dtype))
    return (INT32_MIN if info.min < INT32_MIN else None), (INT32_MAX if info.max > INT32_MAX else None)


def checked_fill(fill, dtype):
    """``fill`` as it is, after atskern's check against the images' dtype (the kernels' error: a bool fill for
    numbers, a value the dtype cannot hold); NumPy scalars and bools (for bool images) are accepted as there."""
    _validation.check_fill(fill, np.dtype(dtype))
    return fill


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
    """One exact margin per dim, in [0, 1/2), as atskern reads ``margin``: a real number, one per dim, or the pair
    ``(receptive_field, low_shape)`` (``atskern._validation.check_margin``)."""
    return list(_validation.check_margin(margin, dims))


def _static_size(size) -> int | None:
    """A dimension as an int, or None where it is unknown or symbolic (``jax.export``'s batch, whose ``int()``
    raises)."""
    try:
        return None if size is None else operator.index(size)
    except TypeError:
        return None


def grid_of(shape, floating: bool, n: int, without_replacement: bool) -> tuple[int, ...]:
    """Grid shape of an attention map of ``shape`` ``(B, *grid)`` (the batch may be unknown: None, as when Keras
    traces a last, smaller batch, or symbolic, as in ``jax.export``); errors name ``attention`` / ``n_samples``."""
    shape = tuple(_static_size(s) for s in shape)
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"attention must be (batch, *grid) with 1 to 3 grid dimensions (rank 2 to 4), got shape {shape}")
    if not floating:
        raise TypeError("attention must be a floating array")
    if 0 in shape:
        raise ValueError(f"attention must not be empty, got shape {shape}")
    grid = shape[1:]
    if None in grid:
        raise ValueError(f"attention's grid must have a static shape to be sampled in XLA ops, got shape {shape}")
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
    # a logit whose weight exp(l - max) underflows in float64 counts as zero, as atskern counts it
    positive = (logits_to_weights(np, flat) > 0).sum(axis=1) if logits else (flat > 0).sum(axis=1)
    for row in np.flatnonzero(positive == 0)[:1]:
        raise ValueError(f"attention row {row} has no positive weight (all zero, or all logits -inf)")
    if strict and not replace:
        for row in np.flatnonzero(positive < n)[:1]:
            raise ValueError(
                f"attention row {row} has only {int(positive[row])} positive weights, fewer than n_samples={n}; "
                "sampling without replacement with strict=True needs at least n_samples (use strict=False to pad "
                "the draw with zero-probability fillers, replace=True, or a smaller n_samples)"
            )


def refuse_subnormal_rows(attention, dtype, flushed_by: str, remedy: str):
    """A ValueError naming the first row of concrete ``attention`` whose largest weight is subnormal in ``dtype``,
    which ``flushed_by`` flushes to zero (the row would read as empty); ``remedy`` ends the message."""
    top = np.max(np.asarray(attention, dtype=np.float64).reshape(attention.shape[0], -1), axis=1)
    small = np.flatnonzero((top > 0) & (top < np.finfo(dtype).tiny))
    if small.size:
        row = int(small[0])
        raise ValueError(f"attention row {row}: its largest weight {top[row]:.3g} is subnormal in {np.dtype(dtype)}, "
                         f"which {flushed_by} flushes to zero; {remedy}")


def probs_tolerance(dtype, n: int) -> float:
    """How far above 1 a row of probabilities may sum: atskern's rule (1e-6 for float64, ``n`` times the larger of
    ``2**-20`` and the dtype's epsilon otherwise: float16 and bfloat16 probabilities round further)."""
    return _validation.probs_sum_tolerance(dtype, n)


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


@functools.lru_cache(maxsize=256)
def offset_table(grid: int, level: int, patch: int, margin) -> np.ndarray:
    """int32 first pixel of the patch around each cell ``0..grid-1``: ``rint(L (m + (s + 1/2) / G (1 - 2 m)) - P / 2)``,
    exactly (``atskern._offsets.table``), ``margin`` read as atskern reads it (a Fraction as is, a float as the
    simplest fraction that rounds to it: 0.1 is 1/10; its exact binary value once put ties on the other side)."""
    _validation.check_int32_offsets((level,), (patch,))
    m = simplest_fraction(margin)
    starts = _offsets.table(grid, level, patch, m.numerator, m.denominator)
    table = np.clip(starts, -_offsets.INT32_MAX, _offsets.INT32_MAX).astype(np.int32)
    table.flags.writeable = False
    return table
