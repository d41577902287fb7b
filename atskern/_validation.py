"""Input validation shared by every backend: runs once, in Python, before any kernel.

Each error names the argument, what was seen and what was expected, so a
kernel never receives an input it could crash on or write out of bounds for.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
MAX_SEED = 2**64 - 1


def array_dtype(array) -> np.dtype:
    return np.dtype(array.dtype)


def require_array(array, name: str):
    """An ndarray-like (NumPy or CuPy) or a TypeError."""
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(array).__name__}")
    return array


def require_ndim(array, name: str, allowed: tuple[int, ...], meaning: str):
    if array.ndim not in allowed:
        wanted = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be {wanted}-dimensional {meaning}, got shape {tuple(array.shape)}")


def require_float(array, name: str):
    if array_dtype(array) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {array_dtype(array)}")


def require_nonempty(array, name: str):
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(array.shape)}")


def require_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python int from an integral scalar (bools refused), within bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def require_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def seed_or_random(seed) -> int:
    """The 64-bit Philox seed: ``seed`` itself, or a fresh one from the OS when None."""
    if seed is None:
        from ._rng import random_seed

        return random_seed()
    return require_int(seed, "seed", 0, MAX_SEED)


# --- sampling -----------------------------------------------------------------


def check_attention(attention, n, replace, logits):
    """Static checks of ``sample``'s arguments; returns ``(n, grid_shape)``."""
    require_array(attention, "attention")
    require_ndim(attention, "attention", (2, 3, 4), "(batch, *grid) with 1 to 3 grid dimensions")
    require_float(attention, "attention")
    require_nonempty(attention, "attention")
    replace = require_bool(replace, "replace")
    require_bool(logits, "logits")
    n = require_int(n, "n", minimum=1)
    grid = tuple(int(s) for s in attention.shape[1:])
    positions = int(np.prod(grid))
    if not replace and n > positions:
        raise ValueError(
            f"n={n} is larger than the {positions} positions of attention's grid {grid}; "
            "sampling without replacement cannot draw more than that (use replace=True)"
        )
    return n, grid


@dataclass(frozen=True)
class RowStatistics:
    """Per-row counts computed by a backend in one pass over the weights (NumPy arrays)."""

    nonfinite: np.ndarray
    negative: np.ndarray
    positive: np.ndarray
    totals: np.ndarray


def _first(mask) -> int:
    return int(np.flatnonzero(mask)[0])


def check_rows(stats: RowStatistics, n: int, replace: bool, logits: bool):
    """Value checks of the attention rows; names the first offending row."""
    bad = stats.nonfinite > 0
    if bad.any():
        row = _first(bad)
        what = "NaN or +inf logits" if logits else "NaN or inf"
        raise ValueError(f"attention row {row} contains {what} ({int(stats.nonfinite[row])} entries)")
    if not logits and (stats.negative > 0).any():
        row = _first(stats.negative > 0)
        raise ValueError(
            f"attention row {row} has {int(stats.negative[row])} negative weights; "
            "weights must be >= 0 (pass logits=True for unnormalized log-probabilities)"
        )
    overflow = ~np.isfinite(stats.totals)
    if overflow.any():
        row = _first(overflow)
        raise ValueError(f"attention row {row} sums to more than float64 can hold; rescale the weights")
    empty = (stats.positive == 0) | ~(stats.totals > 0)
    if empty.any():
        row = _first(empty)
        what = "every logit is -inf (or underflows)" if logits else "all weights are zero"
        raise ValueError(f"attention row {row} has no positive weight: {what}")
    if not replace and (stats.positive < n).any():
        row = _first(stats.positive < n)
        raise ValueError(
            f"attention row {row} has only {int(stats.positive[row])} positive weights, fewer than n={n}; "
            "sampling without replacement needs at least n (use replace=True or a smaller n)"
        )


# --- expectation --------------------------------------------------------------


def check_expectation(features, probs, grad=None):
    """Shapes and dtypes of the estimator's inputs; returns ``(rows, n)``."""
    require_array(features, "features")
    require_array(probs, "probs")
    require_ndim(probs, "probs", (2,), "(batch, n)")
    require_float(probs, "probs")
    require_float(features, "features")
    require_nonempty(probs, "probs")
    if features.ndim < 2 or tuple(features.shape[:2]) != tuple(probs.shape):
        raise ValueError(
            f"features must have shape (batch, n, ...) = {tuple(probs.shape)} + (...) to match probs, "
            f"got {tuple(features.shape)}"
        )
    if grad is not None:
        require_array(grad, "grad")
        require_float(grad, "grad")
        wanted = (features.shape[0],) + tuple(features.shape[2:])
        if tuple(grad.shape) != wanted:
            raise ValueError(f"grad must have the estimate's shape {wanted}, got {tuple(grad.shape)}")
    return tuple(int(s) for s in probs.shape)


def check_probs_values(probs_min: float, probs_max_finite: bool):
    if not probs_max_finite:
        raise ValueError("probs contains NaN or inf")
    if not probs_min > 0:
        raise ValueError(f"probs must be > 0 (each drawn position's probability), got a minimum of {probs_min}")
