"""Plain NumPy implementations of every kernel: slow, obviously correct, the tests' oracle.

Each function here has a fast twin in ``atskern.cpu`` and ``atskern.gpu``
computing the same thing; sampling draws the same random numbers
(``atskern._rng``), so the twins can be compared draw for draw.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from . import _rng
from ._validation import SCALE_FREE_EXPONENTS


def _weights(attention, logits):
    """float64 ``(B, N)`` weights: ``exp(l - t)`` for logits (``t`` the row's largest finite logit, 0 where none
    is), and float64 rows whose largest weight has a binary exponent outside ``SCALE_FREE_EXPONENTS`` times
    ``2**-exponent`` (exact)."""
    rows = attention.shape[0]
    flat = np.asarray(attention, dtype=np.float64).reshape(rows, -1)
    if logits:
        top = np.where(np.isfinite(flat), flat, -np.inf).max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        return np.exp(flat - top)
    if attention.dtype != np.float64:
        return flat
    low, high = SCALE_FREE_EXPONENTS
    out = flat.copy()
    for row in range(rows):
        top = flat[row].max()
        if 0 < top < np.inf:
            exponent = int(np.frexp(top)[1])
            if not low <= exponent <= high:
                out[row] = np.ldexp(flat[row], -exponent)
    return out


def grid_coordinates(flat, grid):
    """Row-major grid coordinates ``(..., D)`` of flat positions, by division and remainder
    (``np.unravel_index`` is wrong for ``(N, 1)`` int64 input with N > 8192 on numpy 2.4)."""
    flat = np.asarray(flat, dtype=np.int64)
    coords = np.empty(flat.shape + (len(grid),), dtype=np.int64)
    rest = flat.copy()
    for d in range(len(grid) - 1, -1, -1):
        coords[..., d] = rest % grid[d]
        rest //= grid[d]
    return coords


def sample(attention, n, *, replace=False, logits=False, seed=0):
    """Draw ``n`` grid positions per row of ``attention`` ``(B, *grid)`` (valid rows only).

    Returns ``indices`` int32 ``(B, n, D)`` in draw order and ``probs``
    ``(B, n)`` (the attention's dtype): each drawn position's probability
    under the whole row's normalized distribution, computed in float64. Without
    replacement the draws follow successive sampling, via exponential keys
    ``-log(u) / a``; a row with ``p < n`` positive weights continues with its
    ``n - p`` zero-weight positions of lowest index (fillers, probability 0).
    """
    attention = np.asarray(attention)
    attention = attention.astype(attention.dtype.newbyteorder("="))
    rows, grid = attention.shape[0], attention.shape[1:]
    weights = _weights(attention, logits)
    flat_indices = np.empty((rows, n), dtype=np.int64)
    totals = np.empty(rows)
    for row in range(rows):
        a = weights[row]
        totals[row] = a.sum()
        if replace:
            cdf = np.cumsum(a)
            targets = _rng.replacement_uniforms(n, row, seed) * cdf[-1]
            flat_indices[row] = np.searchsorted(cdf, targets, side="left")
        else:
            u = _rng.position_uniforms(a.size, row, seed)
            positive = a > 0
            keys = np.zeros(a.size)
            with np.errstate(over="ignore", divide="ignore"):
                keys[positive] = -np.log(u[positive]) / a[positive]
            # positives by (key, position), then the zero-weight positions by position
            order = np.lexsort((np.arange(a.size), keys, ~positive))
            flat_indices[row] = order[:n]
    drawn = np.take_along_axis(weights, flat_indices, axis=1)
    probs = np.where(drawn > 0, drawn / totals[:, None], 0.0)
    coords = grid_coordinates(flat_indices, grid).astype(np.int32)
    return coords, probs.astype(attention.dtype)


def expectation(features, probs, *, replace=False):
    """The ATS estimate ``F`` of ``sum_i a_i f_i`` from ``n`` sampled features per row.

    ``features`` ``(B, n, *F)``, ``probs`` ``(B, n)``; returns ``(B, *F)``.
    A filler (``probs == 0``) contributes nothing.
    """
    unit = _unit_roundoff(probs)
    features = np.asarray(features, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    rows, n = probs.shape
    out = np.zeros((rows,) + features.shape[2:])
    for b in range(rows):
        drawn = probs[b] > 0
        if replace:
            out[b] = features[b][drawn].sum(axis=0) / n
            continue
        for k in range(n):
            pm = _mass_left(probs[b], k, unit)
            estimate_k = (pm if drawn[k] else 0.0) * features[b, k]
            for j in range(k):
                estimate_k = estimate_k + probs[b, j] * features[b, j]
            out[b] += estimate_k / n
    return out


def _unit_roundoff(probs) -> float:
    dtype = np.asarray(probs).dtype
    if dtype.type.__module__.startswith("ml_dtypes"):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps) / 2
    return float(np.finfo(dtype).eps) / 2


def _mass_left(row, k: int, unit: float) -> float:
    """The mass left before draw ``k``: ``1 - sum_{j<k} a_j``, unless that lies within the rounding of the
    probabilities (``unit`` per entry, float64's per addition), where the draws still to come, a lower bound of
    it, take its place (see ``atskern.estimator``)."""
    before = float(sum(row[:k]))
    left = 1.0 - before
    still_to_come = float(sum(row[k:]))
    if left > 2.0 * unit * before + (k + 1) * 2.0**-53:
        return max(left, still_to_come)
    return still_to_come


def expectation_grad(grad, features, probs, *, replace=False):
    """Gradients of :func:`expectation` that are unbiased for the full sum.

    Returns ``(grad_probs (B, n), grad_features (B, n, *F))``; see DESIGN.md.
    Fillers (``probs == 0``) get zero gradients.
    """
    unit = _unit_roundoff(probs)
    grad = np.asarray(grad, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    rows, n = probs.shape
    grad_probs = np.zeros((rows, n))
    grad_features = np.zeros(features.shape)
    for b in range(rows):
        for k in range(n):
            inner = float(np.sum(grad[b] * features[b, k]))
            if probs[b, k] == 0:  # a filler: no weight, no gradient
                continue
            if replace:
                grad_features[b, k] = grad[b] / n
                grad_probs[b, k] = inner / probs[b, k] / n
            else:
                pm = _mass_left(probs[b], k, unit)
                remaining = n - 1 - k
                grad_features[b, k] = (pm + remaining * probs[b, k]) * grad[b] / n
                grad_probs[b, k] = (pm / probs[b, k] + remaining) * inner / n
    return grad_probs, grad_features


def _patch_window(offset, patch, spatial):
    """Per dim: the patch positions inside the image, and the image positions they read."""
    inside, source = [], []
    for o, p, s in zip(offset, patch, spatial):
        kept = [i for i in range(p) if 0 <= int(o) + i < s]
        inside.append(np.array(kept, dtype=np.intp))
        source.append(np.array([int(o) + i for i in kept], dtype=np.intp))
    return np.ix_(*inside), np.ix_(*source)


def extract_patches(x, offsets, patch_size, *, fill=0, channels_first=False):
    """Patch ``k`` of image ``b`` is ``x[b, o : o + patch_size]`` with ``fill`` outside ``x``.

    ``x`` ``(B, *spatial, C)``, ``offsets`` integer ``(B, K, D)``; returns
    ``(B, K, *patch_size, C)`` (channels moved to the front with ``channels_first``).
    """
    x = np.asarray(x)
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    offsets = np.asarray(offsets)
    batch, count, ndim = offsets.shape
    patch = tuple(patch_size) if np.ndim(patch_size) else (int(patch_size),) * ndim
    out = np.empty((batch, count) + patch + (x.shape[-1],), dtype=x.dtype)
    out[...] = np.asarray(fill).astype(x.dtype)
    for b in range(batch):
        for k in range(count):
            into, source = _patch_window(offsets[b, k], patch, x.shape[1:-1])
            out[b, k][into] = x[b][source]
    return np.moveaxis(out, -1, 2) if channels_first else out


def scatter_patches(grad, offsets, spatial_shape, *, channels_first=False):
    """Each patch added into zeros at its offset, in patch order; the adjoint of :func:`extract_patches`.

    float16/bfloat16 gradients are accumulated in float32.
    """
    grad = np.asarray(grad)
    dtype = np.float64 if grad.dtype.kind == "f" and grad.dtype.itemsize == 8 else np.float32
    grad = grad.astype(dtype)
    if channels_first:
        grad = np.moveaxis(grad, 2, -1)
    offsets = np.asarray(offsets)
    batch, count, _ = offsets.shape
    patch = grad.shape[2:-1]
    out = np.zeros((batch,) + tuple(spatial_shape) + (grad.shape[-1],), dtype=dtype)
    for b in range(batch):
        for k in range(count):
            into, source = _patch_window(offsets[b, k], patch, spatial_shape)
            out[b][source] += grad[b, k][into]
    return np.moveaxis(out, -1, 1) if channels_first else out


def _margin_fractions(margin, ndim):
    """Per-dim exact margins: a number, one number per dim, or ``(receptive_field, low_shape)``."""
    def exact(value):
        if isinstance(value, Fraction):
            return value
        simple = Fraction(value).limit_denominator(1 << 24)
        return simple if float(simple) == float(value) else Fraction(value)

    if isinstance(margin, (list, tuple)) and len(margin) == 2 and isinstance(margin[1], (list, tuple)):
        return [exact(margin[0]) / (2 * int(low)) for low in margin[1]]
    if isinstance(margin, (list, tuple)):
        return [exact(m) for m in margin]
    return [exact(margin)] * ndim


def patch_offsets(samples, grid_shape, level_shape, patch_size, *, margin=0.0):
    """``round(L * (m + (s + 1/2) / G * (1 - 2 m)) - P / 2)`` per sample and dim in exact rational
    arithmetic (Python's ``round`` of a Fraction is half to even), clipped to int32 (a level or patch longer than
    2**31 - 1 pixels, which int32 cannot address, is refused)."""
    samples = np.asarray(samples)
    out = np.empty(samples.shape, dtype=np.int32)
    ndim = samples.shape[-1]
    patch = tuple(patch_size) if np.ndim(patch_size) else (int(patch_size),) * ndim
    limit = 2**31 - 1
    if max(int(s) for s in level_shape) > limit or max(int(p) for p in patch) > limit:
        raise ValueError("a level or patch longer than 2**31 - 1 pixels: int32 offsets cannot address it")
    margins = _margin_fractions(margin, ndim)
    for index in np.ndindex(samples.shape[:-1]):
        for d in range(ndim):
            m, cell = margins[d], int(samples[index + (d,)])
            centre = int(level_shape[d]) * (m + Fraction(2 * cell + 1, 2 * int(grid_shape[d])) * (1 - 2 * m))
            out[index + (d,)] = min(limit, max(-limit, round(centre - Fraction(int(patch[d]), 2))))
    return out
