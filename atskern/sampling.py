"""``atskern.sample``: draw positions from attention maps, on the CPU or the GPU."""

from __future__ import annotations

import importlib

from . import _validation as v
from ._backend import array_module, backend_of


def _kernels(backend: str):
    return importlib.import_module(f"atskern.{backend}.sampling")


def logits_to_weights(xp, flat):
    """``exp(l - max_row(l))`` in float64; a row of only ``-inf`` gives zeros."""
    flat = flat.astype(xp.float64, copy=False)
    top = flat.max(axis=1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    return xp.exp(flat - top)


def sample(attention, n, *, replace=False, logits=False, seed=None):
    """Sample ``n`` positions per row of an attention map.

    Parameters
    ----------
    attention : array, ``(B, *grid)`` with 1 to 3 grid dimensions, float32 or float64
        Non-negative weights (rows need not be normalized), or unnormalized
        log-probabilities when ``logits=True`` (``-inf`` allowed).
    n : int
        Positions to draw per row.
    replace : bool
        Without replacement (default) the draws follow successive sampling:
        draw one, remove it, renormalize, repeat. With replacement they are
        independent.
    seed : int in [0, 2**64) or None
        Key of the counter-based generator; the same seed gives the same
        draws on every backend and thread count. None draws a fresh seed.

    Returns
    -------
    indices : int32 ``(B, n, D)``
        Grid coordinates of the draws, in draw order.
    probs : ``(B, n)``, attention's dtype
        Each drawn position's probability under its whole row.
    """
    n, grid = v.check_attention(attention, n, replace, logits)
    backend = backend_of(attention=attention)
    xp = array_module(backend)
    kernels = _kernels(backend)
    seed = v.seed_or_random(seed)
    rows = attention.shape[0]

    weights = xp.ascontiguousarray(attention).reshape(rows, -1)
    if logits:
        weights = logits_to_weights(xp, weights)
    stats = v.RowStatistics(*kernels.row_statistics(weights))
    v.check_rows(stats, n, bool(replace), bool(logits))

    flat = xp.empty((rows, n), dtype=xp.int64)
    if replace:
        kernels.sample_with_replacement(weights, n, seed, flat)
    else:
        kernels.sample_without_replacement(weights, n, seed, flat)

    totals = xp.asarray(stats.totals)
    probs = (xp.take_along_axis(weights, flat, axis=1) / totals[:, None]).astype(attention.dtype)
    indices = xp.stack(xp.unravel_index(flat, grid), axis=-1).astype(xp.int32)
    return indices, probs
