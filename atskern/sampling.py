"""``atskern.sample``: draw positions from attention maps, on the CPU or the GPU.

The backends (``atskern.cpu.sampling``, ``atskern.gpu.sampling``) implement one call,

    ``sample(weights, n, grid, seed, replace) -> (indices, probs, status)``

on ``(B, N)`` C-contiguous float32/float64 weights (``grid`` an int64 NumPy array of the
grid shape, ``seed`` a 64-bit int): int32 grid coordinates ``(B, n, D)`` (by integer division,
never ``unravel_index``), float64 probabilities ``(B, n)`` (0 for fillers; the GPU backend writes them in the
attention's dtype, rounded as NumPy's cast rounds) and an int64 status
``(B + 1, 4)`` computed in the same pass as the draws: per row the columns of
``atskern._validation.STATUS_COLUMNS``, then one summary row (largest non-finite and negative
counts, smallest positive count, number of rows whose exponent is outside
``SCALE_FREE_EXPONENTS``). Bad rows still get in-range indices. This module reads the status
back (on a GPU the only host synchronization, skipped with ``validate=False``), turns it into
the errors, and reruns the rare float64 rows that need a power-of-two rescaling. A backend whose
module sets ``FUSED = True`` (the GPU) takes ``logits=`` and ``seed_ptr=`` keywords instead: it
computes the logits' weights and applies the rescaling itself, so nothing waits for the device.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from . import _validation as v
from ._backend import CPU, array_module, backend_of, is_cupy_array, require_current_device
from .gpu._alignment import aligned as device_aligned
from .gpu._alignment import misaligned


@functools.lru_cache(maxsize=None)
def _kernels(backend: str):
    return importlib.import_module(f"atskern.{backend}.sampling")


@functools.lru_cache(maxsize=256)
def _grid_array(grid: tuple[int, ...]) -> np.ndarray:
    array = np.array(grid, dtype=np.int64)
    array.flags.writeable = False
    return array


def logits_to_weights(xp, flat):
    """``exp(l - t)`` in float64, ``t`` the row's largest finite logit (0 where none is finite), as the GPU kernels
    take it: a row of only ``-inf`` gives zeros, NaN and ``+inf`` logits stay non-finite and every finite logit
    gives a finite weight, so a refused row's status counts exactly its NaN and ``+inf`` logits."""
    flat = flat.astype(xp.float64, copy=False)
    top = flat.max(axis=1, keepdims=True)
    odd = ~xp.isfinite(top[:, 0])  # a NaN or +inf logit, or only -inf: the largest finite logit instead
    if odd.any():
        rows = flat[odd]
        finite_top = xp.where(xp.isfinite(rows), rows, -xp.inf).max(axis=1, keepdims=True)
        top[odd] = xp.where(xp.isfinite(finite_top), finite_top, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # only rows holding +inf/NaN, refused by validation
        return xp.exp(flat - top)


def rescale_rows(xp, weights, status, rows):
    """float64 copy of ``weights`` with each row in ``rows`` times ``2**-exponent`` (exact)."""
    exponent = xp.asarray(np.where(rows, status[:, v.STATUS_EXPONENT], 0).astype(np.int32))
    with np.errstate(over="ignore"):  # only a refused row's negative weights, larger than its largest weight
        return xp.ldexp(weights.astype(xp.float64), -exponent[:, None])


def _invalid_rows(status, logits: bool):
    """Rows that validation refuses (NaN/inf, negative weights unless logits, no positive weight)."""
    bad = (status[:-1, v.STATUS_NONFINITE] > 0) | (status[:-1, v.STATUS_POSITIVE] <= 0)
    return bad if logits else bad | (status[:-1, v.STATUS_NEGATIVE] > 0)


def check_status(status, n, *, replace=False, logits=False, strict=False):
    """Raise the ValueError that ``sample`` would have raised, from the status of a ``validate=False`` call.

    ``status`` is the third result of ``sample(..., validate=False, return_status=True)`` (a NumPy or CuPy
    array; a CuPy one is read back here, the one host synchronization). The message is the one ``sample``
    gives: it names the first bad row.
    """
    v.require_array(status, "status")
    status = np.asarray(status) if isinstance(status, np.ndarray) else status.get()
    if status.ndim != 2 or status.shape[0] < 2 or status.shape[1] != 4 or status.dtype.kind not in "iu":
        raise ValueError(f"status must be the integer (B + 1, 4) status that sample(..., return_status=True) "
                         f"returns, got {status.dtype} {status.shape}")
    n = v.require_int(n, "n", minimum=1)
    v.check_status(status, n, v.require_bool(replace, "replace"), v.require_bool(logits, "logits"),
                   v.require_bool(strict, "strict"))


def _seed_array(seed, xp):
    """A seed held in device memory (a one-element uint64/int64 CuPy array, or any CUDA array such as a torch
    tensor, viewed without a copy), or None for a host seed."""
    on_device = is_cupy_array(seed) or (hasattr(seed, "__cuda_array_interface__") and not isinstance(seed, np.ndarray))
    if not on_device:
        return None
    if xp is np:
        raise TypeError("seed is a device array, but attention is a NumPy array; pass an int seed on the CPU")
    seed = xp.asarray(seed)
    if seed.size != 1 or np.dtype(seed.dtype) not in (np.dtype(np.uint64), np.dtype(np.int64)):
        raise TypeError(f"seed as a device array must hold one uint64 or int64 value, got {seed.dtype} {tuple(seed.shape)}")
    if misaligned(seed):
        raise TypeError(f"seed as a device array must lie at an address that is a multiple of 8 (the kernels read it "
                        f"as one 64-bit word), got address {seed.data.ptr:#x}; keep the seed in an array of its own")
    return seed.reshape(1)


def sample(attention, n, *, replace=False, logits=False, seed=None, strict=False, validate=True, return_status=False):
    """Sample ``n`` positions per row of an attention map.

    Parameters
    ----------
    attention : array, ``(B, *grid)`` with 1 to 3 grid dimensions, float32 or float64
        Non-negative weights (rows need not be normalized; any positive finite scale, 1e-320
        to 1e300, gives the exact distribution), or unnormalized log-probabilities when
        ``logits=True`` (``-inf`` allowed). One limit inside a float64 row: a cell whose key
        ``-log(u) / w`` overflows (``w`` below about 1e-307 once the row is scaled, i.e. about
        2**-1019 of the row's largest, within a factor 2**64; logits about 706 below the
        largest) is drawn without replacement after every other cell, and such cells in
        position order rather than by weight. Either byte order; a NumPy masked array is
        refused (its mask would be ignored: pass ``attention.filled(0)``), and so are framework
        tensors (convert them with ``.numpy()`` / ``cupy.from_dlpack``, or use ``ats``).
    n : int
        Positions to draw per row.
    replace : bool
        Without replacement (default) the draws follow successive sampling:
        draw one, remove it, renormalize, repeat. With replacement they are
        independent.
    seed : int in [0, 2**64), None, or (CuPy attention only) a one-element uint64/int64 CuPy array
        Key of the counter-based generator; the same seed gives the same
        draws on every backend and thread count. None draws a fresh seed. A device array is read
        by the kernels themselves (no host round trip; a CUDA graph replays it with the value it
        holds at replay time).
    strict : bool
        Without replacement, a row with ``p < n`` positive weights draws its ``p`` positive
        cells (in successive-sampling order) followed by its ``n - p`` zero-weight cells of
        lowest flat index, each with probability exactly 0: *fillers*, whose estimator weight
        is 0. ``strict=True`` raises a ValueError for such rows instead.
    validate : bool
        Check the rows (NaN/inf, negative weights, no positive weight) and raise a ValueError
        naming the first bad row (default). On a GPU this reads back one small status array,
        the call's only host synchronization. ``validate=False`` skips the check: on a GPU the
        call is then fully asynchronous and CUDA-graph capturable. Rows that validation would
        refuse then get in-range indices and ``probs`` exactly 0 (estimator weight 0), on
        every backend; ``return_status=True`` keeps the status for a later
        :func:`check_status`.
    return_status : bool
        Also return the int64 status ``(B + 1, 4)`` (a CuPy array on a GPU, left on the device):
        per row the non-finite, negative and positive counts and the largest weight's exponent,
        then a summary row. :func:`check_status` turns it into ``sample``'s error.

    Returns
    -------
    indices : int32 ``(B, n, D)``
        Grid coordinates of the draws, in draw order.
    probs : ``(B, n)``, attention's dtype (native byte order)
        Each drawn position's probability under its whole row, computed in float64 and cast.
        It is 0 for fillers and where the cast underflows (e.g. float32 logits -200 next to
        0): such a cell is a filler too (rule R2 of DESIGN.md), the one deliberate bias.
    status : int64 ``(B + 1, 4)``, only with ``return_status=True``
    """
    n, grid, replace = v.check_attention(attention, n, replace, logits, strict, validate)
    require_return_status = v.require_bool(return_status, "return_status")
    backend = CPU if type(attention) is np.ndarray else backend_of(attention=attention)
    xp = np if backend == CPU else array_module(backend)
    kernels = _kernels(backend)
    seed_ptr = None if type(seed) is int else _seed_array(seed, xp)
    if backend != CPU:
        require_current_device(attention=attention, seed=seed_ptr)
        attention = device_aligned(attention)  # a typed read of a misaligned CuPy array would fault
    seed = 0 if seed_ptr is not None else v.seed_or_random(seed)
    attention = v.native(attention)
    rows = attention.shape[0]
    fused = getattr(kernels, "FUSED", False)

    weights = xp.ascontiguousarray(attention).reshape(rows, -1)
    grid_array = _grid_array(grid)
    try:
        if fused:
            host_status = bool(validate) and not require_return_status  # read back here, before the next call
            indices, probs, status = kernels.sample(weights, n, grid_array, seed, replace, logits=bool(logits),
                                                    seed_ptr=seed_ptr, host_status=host_status)
            if validate:
                v.check_status(kernels.read_status(status), n, replace, bool(logits), bool(strict))
        else:
            if logits:
                weights = logits_to_weights(xp, weights)
            indices, probs, status = kernels.sample(weights, n, grid_array, seed, replace)
            if status[-1, v.STATUS_EXPONENT] and weights.dtype == np.float64:
                rescale = v.rows_to_rescale(status[:-1], weights.dtype)
                weights = rescale_rows(xp, weights, status[:-1], rescale)
                # the draws of the rescaled weights, the status of the attention as given (the GPU's): rescaled, a
                # negative weight may become -inf and a tiny one 0, which the status must not count
                indices, probs, _ = kernels.sample(weights, n, grid_array, seed, replace)
            if validate:
                v.check_status(status, n, replace, bool(logits), bool(strict))
            else:
                probs[_invalid_rows(status, bool(logits))] = 0.0  # the documented result, as on the GPU
    except MemoryError:
        raise v.too_many_draws(n, rows, len(grid), attention.dtype.itemsize) from None
    if probs.dtype != attention.dtype:
        probs = probs.astype(attention.dtype)
    if require_return_status:
        return indices, probs, status
    return indices, probs
