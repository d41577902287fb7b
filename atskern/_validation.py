"""Input validation shared by every backend: runs once, in Python, before any kernel.

Each error names the argument, what was seen and what was expected, so a
kernel never receives an input it could crash on or write out of bounds for.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import _offsets
from ._offsets import simplest_fraction

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
MAX_SEED = 2**64 - 1


def array_dtype(array) -> np.dtype:
    return np.dtype(array.dtype)


def _type_name(array) -> str:
    kind = type(array)
    module = kind.__module__.split(".")[0]
    return kind.__name__ if module == "builtins" else f"{module}.{kind.__name__}"


def require_array(array, name: str):
    """A NumPy or CuPy array, or a TypeError saying how to convert what was passed.

    Framework tensors (torch, TensorFlow, JAX) are refused rather than guessed
    at: convert them first (``tensor.numpy()`` on the CPU, ``cupy.from_dlpack``
    on the GPU), or use the ``ats`` adapters, which do it without a copy.
    """
    if isinstance(array, np.ndarray) or type(array).__module__.split(".")[0] == "cupy":
        return array
    if hasattr(array, "__dlpack__") or hasattr(array, "__array__"):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array, got a {_type_name(array)}; convert it first "
            "(np.asarray(t) or t.numpy() on the CPU, cupy.from_dlpack(t) on a GPU), or use the ats adapters"
        )
    raise TypeError(f"{name} must be a NumPy or CuPy array, got {_type_name(array)}")


def require_ndim(array, name: str, allowed: tuple[int, ...], meaning: str):
    if array.ndim not in allowed:
        wanted = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be {wanted}-dimensional {meaning}, got shape {tuple(array.shape)}")


def require_float(array, name: str):
    """float32 or float64 in either byte order (a non-native one is converted by :func:`native`)."""
    dtype = array_dtype(array)
    if dtype not in FLOAT_DTYPES and dtype.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {array_dtype(array)}")


def native(array):
    """``array`` itself, or a native-byte-order copy of a byte-swapped one (kernels read native floats)."""
    dtype = array_dtype(array)
    if dtype.isnative:
        return array
    return array.astype(dtype.newbyteorder("="))


def require_nonempty(array, name: str):
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(array.shape)}")


def require_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python int from an integral scalar (bools refused), within bounds."""
    if type(value) is int and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value  # the common case, without the slower checks below
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def require_bool(value, name: str) -> bool:
    if value is True or value is False:
        return value
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

STATUS_NONFINITE, STATUS_NEGATIVE, STATUS_POSITIVE, STATUS_EXPONENT = range(4)
STATUS_COLUMNS = 4
"""What a sampling backend reports per row, as an int64 ``(B, STATUS_COLUMNS)`` array: the counts
of non-finite, negative and positive weights, and the binary exponent (``frexp``) of the row's
largest weight (0 where no weight is positive and finite)."""

SCALE_FREE_EXPONENTS = (-64, 64)
"""A float64 row whose largest weight has a ``frexp`` exponent outside this range is sampled from
its weights times ``2**-exponent`` (exact: a power of two), so keys and sums neither overflow
nor underflow. float32 rows never need it (float64 holds any float32 ratio); every backend and
the reference apply the same rule, so draws stay identical."""


@functools.lru_cache(maxsize=1)
def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def draws_memory(rows: int, n: int, ndim: int, itemsize: int) -> int:
    """Bytes of ``sample``'s results and per-row work space for ``n`` draws per row."""
    return rows * n * (4 * ndim + itemsize + 8) + 16 * n


def too_many_draws(n: int, rows: int, ndim: int, itemsize: int, limit: int | None = None) -> ValueError:
    need = draws_memory(rows, n, ndim, itemsize)
    have = f", more than the {limit / 2**30:.1f} GiB of memory here" if limit else ""
    return ValueError(
        f"n={n} draws per row need {need / 2**30:.1f} GiB for {rows} rows (indices, probs and work space){have}; "
        "use a smaller n"
    )


def check_attention(attention, n, replace, logits, strict=False, validate=True):
    """Static checks of ``sample``'s arguments; returns ``(n, grid_shape, replace)``."""
    if type(attention) is not np.ndarray:  # a plain NumPy array passes these two checks
        require_array(attention, "attention")
    if type(attention) is not np.ndarray and isinstance(attention, np.ma.MaskedArray):
        raise TypeError(
            "attention is a numpy masked array, and sample() would ignore its mask; pass "
            "attention.filled(0) (weights) or attention.filled(-np.inf) (logits=True) to give masked cells zero probability"
        )
    require_ndim(attention, "attention", (2, 3, 4), "(batch, *grid) with 1 to 3 grid dimensions")
    require_float(attention, "attention")
    require_nonempty(attention, "attention")
    replace = require_bool(replace, "replace")
    require_bool(logits, "logits")
    require_bool(strict, "strict")
    require_bool(validate, "validate")
    n = require_int(n, "n", minimum=1)
    grid = attention.shape[1:] if type(attention) is np.ndarray else tuple(map(int, attention.shape[1:]))
    positions = math.prod(grid)
    if not replace and n > positions:
        raise ValueError(
            f"n={n} is larger than the {positions} positions of attention's grid {grid}; "
            "sampling without replacement cannot draw more than that (use replace=True)"
        )
    if replace:
        limit = physical_memory()
        if limit is not None and draws_memory(int(attention.shape[0]), n, len(grid), 8) > limit:
            raise too_many_draws(n, int(attention.shape[0]), len(grid), array_dtype(attention).itemsize, limit)
    return n, grid, replace


def _first(mask) -> int:
    return int(np.flatnonzero(mask)[0])


def check_rows(status: np.ndarray, n: int, replace: bool, logits: bool, strict: bool):
    """Value checks of the attention rows from a backend's status (NumPy); names the first offending row."""
    nonfinite = status[:, STATUS_NONFINITE]
    negative = status[:, STATUS_NEGATIVE]
    positive = status[:, STATUS_POSITIVE]
    bad = nonfinite > 0
    if bad.any():
        row = _first(bad)
        what = "NaN or +inf logits" if logits else "NaN or inf"
        raise ValueError(f"attention row {row} contains {what} ({int(nonfinite[row])} entries)")
    if not logits and (negative > 0).any():
        row = _first(negative > 0)
        raise ValueError(
            f"attention row {row} has {int(negative[row])} negative weights; "
            "weights must be >= 0 (pass logits=True for unnormalized log-probabilities)"
        )
    empty = positive == 0
    if empty.any():
        row = _first(empty)
        what = "every logit is -inf (or underflows)" if logits else "all weights are zero"
        raise ValueError(f"attention row {row} has no positive weight: {what}")
    if strict and not replace and (positive < n).any():
        row = _first(positive < n)
        underflow = " (a logit whose weight underflows next to the row's largest counts as zero)" if logits else ""
        raise ValueError(
            f"attention row {row} has only {int(positive[row])} positive weights, fewer than n={n}{underflow}; "
            "sampling without replacement with strict=True needs at least n (use strict=False to pad the draw "
            "with zero-probability fillers, replace=True, or a smaller n)"
        )


def check_status(status: np.ndarray, n: int, replace: bool, logits: bool, strict: bool):
    """:func:`check_rows` on a backend's ``(B + 1, 4)`` status, after a look at its summary row."""
    nonfinite, negative, min_positive, _ = status[-1].tolist()
    need = n if strict and not replace else 1
    if nonfinite or (negative and not logits) or min_positive < need:
        check_rows(status[:-1], n, replace, logits, strict)


def rows_to_rescale(status: np.ndarray, dtype) -> np.ndarray:
    """Rows (float64 only) that :data:`SCALE_FREE_EXPONENTS` says to sample from rescaled weights."""
    if np.dtype(dtype) != np.float64:
        return np.zeros(status.shape[0], bool)
    exponent = status[:, STATUS_EXPONENT]
    usable = (status[:, STATUS_NONFINITE] == 0) & (status[:, STATUS_POSITIVE] > 0)
    low, high = SCALE_FREE_EXPONENTS
    return usable & ((exponent < low) | (exponent > high))


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


def unit_roundoff(dtype) -> float:
    """Half the machine epsilon of a float dtype (NumPy's, or ml_dtypes' such as bfloat16): the largest relative
    error of rounding a value to it."""
    dtype = np.dtype(dtype)
    info = importlib.import_module("ml_dtypes").finfo(dtype) if _is_ml_dtype(dtype) else np.finfo(dtype)
    return float(info.eps) / 2


def probs_sum_tolerance(dtype, n: int) -> float:
    """How far above 1 a draw's probabilities (without replacement) may sum: rounding of the given dtype
    (1e-6 for float64; ``n`` times the larger of ``2**-20`` and the dtype's epsilon otherwise)."""
    if np.dtype(dtype) == np.float64:
        return 1e-6
    return n * max(2.0**-20, 2 * unit_roundoff(dtype))


def explain_bad_probs(probs64: np.ndarray, replace: bool, tolerance: float) -> ValueError:
    """The error for the first row of (NumPy, float64) ``probs`` that breaks the rules (DESIGN.md, R3)."""
    for row, values in enumerate(probs64):
        if not np.isfinite(values).all():
            return ValueError(f"probs row {row} contains NaN or inf")
        outside = (values < 0) | (values > 1)
        if outside.any():
            k = _first(outside)
            return ValueError(f"probs row {row} has {float(values[k])!r} at draw {k}; probabilities must be in [0, 1]")
        total = float(values.sum())
        if not replace and total > 1 + tolerance:
            return ValueError(
                f"probs row {row} sums to {total!r} > 1 (tolerance {tolerance:.3g}); the probabilities of a draw "
                "without replacement sum to at most 1 (pass replace=True if the draws were made with replacement)"
            )
    return ValueError("probs breaks the estimator's rules")


# --- patches ------------------------------------------------------------------

GATHER_ITEMSIZES = (1, 2, 4, 8)
_MOVABLE_KINDS = "biufc"


@dataclass(frozen=True)
class PatchLayout:
    """What a validated gather or scatter call works on (spatial sizes in x's own order)."""

    batch: int
    count: int
    spatial: tuple[int, ...]
    channels: int
    patch: tuple[int, ...]
    channels_first: bool

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self.channels_first:
            return (self.batch, self.channels) + self.spatial
        return (self.batch,) + self.spatial + (self.channels,)

    @property
    def patches_shape(self) -> tuple[int, ...]:
        if self.channels_first:
            return (self.batch, self.count, self.channels) + self.patch
        return (self.batch, self.count) + self.patch + (self.channels,)


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "V" and dtype.names is None and dtype.type.__module__.startswith("ml_dtypes")


def require_movable(array, name: str) -> np.dtype:
    """A plain numeric dtype (or an ml_dtypes float) of item size 1, 2, 4 or 8."""
    return check_movable_dtype(array_dtype(array), name)


def check_movable_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """:func:`require_movable` of an array of ``dtype`` (for the adapters' symbolic tensors)."""
    if (dtype.kind not in _MOVABLE_KINDS and not _is_ml_dtype(dtype)) or dtype.itemsize not in GATHER_ITEMSIZES:
        raise TypeError(
            f"{name} must have a numeric dtype of item size 1, 2, 4 or 8 bytes "
            f"(e.g. uint8, float16, bfloat16, float32, float64), got {dtype} (item size {dtype.itemsize})"
        )
    return dtype


def check_channels_first(channels_first) -> bool:
    return require_bool(channels_first, "channels_first")


def check_patch_size(patch_size, ndim: int, name: str = "patch_size") -> tuple[int, ...]:
    """``patch_size`` as a tuple of ``ndim`` positive ints; a single int is used for every dim."""
    if isinstance(patch_size, numbers.Integral) and not isinstance(patch_size, (bool, np.bool_)):
        patch_size = (patch_size,) * ndim
    return check_shape(patch_size, ndim, name, what="an int or a sequence")


def check_shape(shape, ndim: int, name: str, what: str = "a sequence") -> tuple[int, ...]:
    """A spatial shape: ``ndim`` positive ints."""
    try:
        sizes = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be {what} of {ndim} ints, got {shape!r}") from None
    if len(sizes) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per spatial dim), got {len(sizes)}: {sizes!r}")
    sizes = tuple(require_int(s, name) for s in sizes)
    if min(sizes) <= 0:
        raise ValueError(f"{name} must be > 0 in every dim, got {sizes}")
    return sizes


def check_int32_offsets(level: tuple[int, ...], patch: tuple[int, ...]):
    """A ValueError where int32 patch offsets cannot address every pixel of the level: a level or patch longer
    than 2**31 - 1 pixels in a dim (the clipping to int32 then moves patches that lie inside the level)."""
    for name, sizes in (("level_shape", level), ("patch_size", patch)):
        for size in sizes:  # a loop, not max(): torch.compile traces it (sizes may hold symbolic or tensor entries)
            if isinstance(size, int) and size > _offsets.INT32_MAX:
                raise ValueError(f"{name} {tuple(sizes)} has a dim of {size} pixels, longer than 2**31 - 1: "
                                 "patch_offsets' int32 offsets cannot address it (extract_patches with int64 "
                                 "offsets can)")


def check_offsets(offsets, batch: int, name: str = "offsets", ndim: int | None = None):
    """Integer ``(batch, K, D)`` with ``D`` in 1..3 (or ``ndim``); returns ``(K, D)``."""
    require_array(offsets, name)
    dtype = array_dtype(offsets)
    if dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype (e.g. int32), got {dtype}")
    if offsets.ndim != 3:
        raise ValueError(f"{name} must be 3-dimensional (batch, K, D), got shape {tuple(offsets.shape)}")
    b, k, d = (int(s) for s in offsets.shape)
    if b != batch:
        raise ValueError(f"{name} has batch size {b} (shape {tuple(offsets.shape)}) but the images have batch size {batch}")
    if ndim is not None and d != ndim:
        raise ValueError(f"{name} must have shape (batch, K, {ndim}) for {ndim} spatial dims, got {tuple(offsets.shape)}")
    if d not in (1, 2, 3):
        raise ValueError(f"{name} must have shape (batch, K, D) with D in 1..3, got {tuple(offsets.shape)}")
    require_nonempty(offsets, name)
    return k, d


def check_fill(fill, dtype: np.dtype):
    """``fill`` as a 0-d array of ``dtype``, or an error if it cannot be represented."""
    if isinstance(fill, (bool, np.bool_)) and dtype.kind != "b":
        raise TypeError(f"fill must be a number, got {fill!r}")
    if not isinstance(fill, (numbers.Number, np.generic)) or isinstance(fill, np.datetime64):
        raise TypeError(f"fill must be a scalar number, got {fill!r} ({type(fill).__name__})")
    bad = ValueError(f"fill={fill!r} cannot be represented in the images' dtype {dtype}")
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = np.asarray(fill).astype(dtype)
    except (OverflowError, ValueError, TypeError):
        raise bad from None
    integer_range = _ml_integer_range(dtype)
    try:
        if dtype.kind in "iub" or integer_range:
            if isinstance(fill, (complex, np.complexfloating)):
                raise bad
            if not isinstance(fill, (numbers.Integral, np.bool_)) and not float(fill).is_integer():
                raise bad
            if int(converted.astype(np.uint64 if dtype.kind == "u" else np.int64)) != int(fill):
                raise bad
        elif dtype.kind == "c":
            if np.isfinite(complex(fill)) and not np.isfinite(complex(converted)):
                raise bad
        else:
            if isinstance(fill, (complex, np.complexfloating)):
                if fill.imag != 0:
                    raise bad
                fill = fill.real
            back = float(converted.astype(np.float64))
            if np.isfinite(float(fill)) and not np.isfinite(back):
                raise bad
            if np.isnan(float(fill)) and not np.isnan(back):
                raise bad  # a float without NaN (float4_e2m1fn, ...) turns it into a number
            if _is_ml_dtype(dtype) and abs(float(fill)) >= _overflow_threshold(dtype):
                raise bad  # a float without infinities (float4_e2m1fn, ...) saturates instead of overflowing
    except (OverflowError, ValueError, TypeError):
        raise bad from None
    return converted


def _ml_integer_range(dtype: np.dtype) -> tuple[int, int] | None:
    """``(min, max)`` of an ml_dtypes integer dtype (int4, uint2, ...; NumPy gives them kind 'V'), else None."""
    if not _is_ml_dtype(dtype):
        return None
    ml_dtypes = importlib.import_module("ml_dtypes")
    try:
        info = ml_dtypes.iinfo(dtype)
    except (TypeError, ValueError):
        return None
    return int(info.min), int(info.max)


def _overflow_threshold(dtype: np.dtype) -> float:
    """Smallest magnitude that rounds past an ml_dtypes float's largest finite value (its largest plus half an
    ulp there): a NumPy float would become inf from it on."""
    info = importlib.import_module("ml_dtypes").finfo(dtype)
    largest = float(info.max)
    _, exponent = math.frexp(largest)
    return largest + 2.0 ** (exponent - 2 - int(info.nmant))


_check_fill_uncached = check_fill


@functools.lru_cache(maxsize=512)
def _check_fill_memo(fill_type, fill_repr, fill, dtype):
    converted = _check_fill_uncached(fill, dtype)
    converted.flags.writeable = False  # shared between calls
    return converted


def check_fill(fill, dtype: np.dtype):  # noqa: F811 - the memoized version of the checks above
    """``check_fill`` memoized per fill type, repr (so -0.0 is not 0.0) and dtype: ~1 us instead of ~30 on the
    GPU hot path, where the host time of a call is the budget. Returns a read-only 0-d array."""
    try:
        return _check_fill_memo(type(fill), repr(fill), fill, dtype)
    except TypeError:  # unhashable, or refused by the checks: the uncached call raises the error
        return _check_fill_uncached(fill, dtype)


def _spatial_and_channels(shape, channels_first: bool):
    if channels_first:
        return tuple(int(s) for s in shape[2:]), int(shape[1])
    return tuple(int(s) for s in shape[1:-1]), int(shape[-1])


def check_out(out, shape: tuple[int, ...], dtype: np.dtype, name: str = "out"):
    """A writeable C-contiguous buffer of exactly ``shape`` and ``dtype``."""
    require_array(out, name)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if array_dtype(out) != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {array_dtype(out)}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {tuple(out.strides)}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")


def _shares_memory(a, b) -> bool:
    """Whether two arrays of one library may overlap in memory (exactly where cheap, else conservatively)."""
    on_gpu = [type(v).__module__.split(".")[0] == "cupy" for v in (a, b)]
    if on_gpu[0] != on_gpu[1]:
        return False  # a NumPy and a CuPy array: the device check reports the mix
    xp = importlib.import_module("cupy") if on_gpu[0] else np
    if not xp.may_share_memory(a, b):
        return False
    try:
        return bool(xp.shares_memory(a, b, max_work=100_000))
    except (np.exceptions.TooHardError, TypeError, NotImplementedError):
        return True


def check_out_disjoint(out, name: str = "out", **inputs):
    """A ValueError naming ``out`` when it shares memory with one of ``inputs`` (the kernel would read
    what it has already overwritten)."""
    for input_name, array in inputs.items():
        if array is not None and hasattr(array, "shape") and _shares_memory(out, array):
            raise ValueError(
                f"{name} shares memory with {input_name}; the kernel would overwrite its own input: "
                f"pass a separate buffer as {name} (or out=None)"
            )


_IMAGES_MEANING = "(batch, *spatial, channels) with 1 to 3 spatial dims"
_IMAGES_MEANING_CF = "(batch, channels, *spatial) with 1 to 3 spatial dims"


def check_gather(x, offsets, patch_size, fill, channels_first, out, name: str = "x"):
    """Checks of ``extract_patches``; returns ``(layout, fill as a 0-d array of x's dtype)``."""
    require_array(x, name)
    channels_first = check_channels_first(channels_first)
    require_ndim(x, name, (3, 4, 5), _IMAGES_MEANING_CF if channels_first else _IMAGES_MEANING)
    dtype = require_movable(x, name)
    require_nonempty(x, name)
    spatial, channels = _spatial_and_channels(x.shape, channels_first)
    count, _ = check_offsets(offsets, int(x.shape[0]), ndim=len(spatial))
    patch = check_patch_size(patch_size, len(spatial))
    fill_value = check_fill(fill, dtype)
    layout = PatchLayout(int(x.shape[0]), count, spatial, channels, patch, channels_first)
    if out is not None:
        check_out(out, layout.patches_shape, dtype)
        check_out_disjoint(out, **{name: x, "offsets": offsets})
    return layout, fill_value


SCATTER_DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float32),
    "bfloat16": np.dtype(np.float32),
}


def check_scatter(grad, offsets, spatial_shape, channels_first, out, name: str = "grad"):
    """Checks of ``scatter_patches``; returns ``(layout, result dtype)``."""
    require_array(grad, name)
    channels_first = check_channels_first(channels_first)
    meaning = "(batch, K, channels, *patch)" if channels_first else "(batch, K, *patch, channels)"
    require_ndim(grad, name, (4, 5, 6), meaning + " with 1 to 3 spatial dims")
    dtype = array_dtype(grad)
    if dtype.name not in SCATTER_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (float16/bfloat16 accumulate in float32), got {dtype}")
    result = SCATTER_DTYPES[dtype.name]
    require_nonempty(grad, name)
    ndim = grad.ndim - 3
    spatial = check_shape(spatial_shape, ndim, "spatial_shape")
    count, _ = check_offsets(offsets, int(grad.shape[0]), ndim=ndim)
    if int(grad.shape[1]) != count:
        raise ValueError(f"{name} has {int(grad.shape[1])} patches per image (shape {tuple(grad.shape)}) but offsets has {count}")
    patch, channels = _spatial_and_channels(grad.shape[1:], channels_first)
    layout = PatchLayout(int(grad.shape[0]), count, spatial, channels, patch, channels_first)
    if out is not None:
        check_out(out, layout.image_shape, result)
        check_out_disjoint(out, **{name: grad, "offsets": offsets})
    return layout, result


def check_levels(arrays, name: str) -> list:
    if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__len__") or hasattr(arrays, "shape"):
        raise TypeError(f"{name} must be a list of arrays (one per level), got {type(arrays).__name__}")
    arrays = list(arrays)
    if not arrays:
        raise ValueError(f"{name} must hold at least one level, got an empty list")
    return arrays


def check_per_level(values, levels: int, name: str) -> list:
    """One entry per level (a list or tuple of ``levels`` entries)."""
    if not isinstance(values, (list, tuple)) or len(values) != levels:
        raise ValueError(
            f"{name} must be a list with one entry per level ({levels} levels), got {values!r}"
        )
    return list(values)


def check_samples(samples, grid_shape, batch: int | None = None, batch_of: str = "the levels"):
    """Integer ``(B, K, D)`` grid cells; returns the grid shape as a tuple of D ints."""
    require_array(samples, "samples")
    if array_dtype(samples).kind not in "iu":
        raise TypeError(f"samples must have an integer dtype (grid cells, e.g. from sample()), got {array_dtype(samples)}")
    if samples.ndim != 3 or int(samples.shape[-1]) not in (1, 2, 3):
        raise ValueError(f"samples must be (batch, K, D) with D in 1..3, got shape {tuple(samples.shape)}")
    require_nonempty(samples, "samples")
    if batch is not None and int(samples.shape[0]) != batch:
        raise ValueError(f"samples has batch size {int(samples.shape[0])} but {batch_of} have batch size {batch}")
    return check_shape(grid_shape, int(samples.shape[-1]), "grid_shape")


def _real(value, name: str):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _is_sequence(value) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    if isinstance(value, numbers.Number):  # before hasattr: torch.compile cannot trace it on a symbolic float
        return False
    return hasattr(value, "ndim") and getattr(value, "ndim", 0) == 1


def check_margin(margin, ndim: int) -> tuple[Fraction, ...]:
    """The margin fraction of each spatial dim, exactly.

    ``margin`` is one of: a real number (a float, int or ``fractions.Fraction``)
    for every dim; a sequence of ``ndim`` reals (one per dim); or the pair
    ``(receptive_field, low_shape)`` with ``low_shape`` a sequence of ``ndim``
    ints, meaning ``receptive_field / 2 / low_shape[d]`` (what the layers
    pass). Floats are read by :func:`atskern._offsets.simplest_fraction`. Each
    margin must lie in ``[0, 0.5)``.
    """
    if isinstance(margin, (list, tuple)) and len(margin) == 2 and _is_sequence(margin[1]):
        receptive_field = _real(margin[0], "margin's receptive_field")
        if receptive_field < 0:
            raise ValueError(f"margin's receptive_field must be >= 0, got {receptive_field!r}")
        low = check_shape(margin[1], ndim, "margin's low_shape")
        values = [simplest_fraction(receptive_field) / (2 * size) for size in low]
    elif _is_sequence(margin):
        if len(margin) != ndim:
            raise ValueError(
                f"margin must be a number, {ndim} numbers (one per spatial dim) or a pair "
                f"(receptive_field, low_shape), got {margin!r}"
            )
        values = [simplest_fraction(_real(m, "margin")) for m in margin]
    else:
        values = [simplest_fraction(_real(margin, "margin"))] * ndim
    for value in values:
        if not 0 <= value < Fraction(1, 2):
            raise ValueError(f"margin must be in [0, 0.5), got {float(value)!r} (receptive_field / 2 / low_size)")
    return tuple(values)
