"""The ATS expectation estimator and its unbiased gradients, for NumPy and CuPy arrays.

With ``n`` draws per row, ``w = 1/n``, drawn probabilities ``a_k`` and features
``f_k``, the estimate is linear in the features, ``F = sum_k c_k f_k``:

- with replacement ``c_k = w``;
- without replacement ``c_k = w (pm_k + (n - 1 - k) a_k)`` where
  ``pm_k = 1 - sum_{j<k} a_j`` (the mass left before draw ``k``), which is
  ``w sum_k F_k`` with ``F_k = sum_{j<k} a_j f_j + pm_k f_k`` regrouped.

The feature gradient is ``c_k g``. The attention gradient is not the
derivative of ``F`` but the unbiased estimate of ``<g, f_i>``:
``w <g, f_k> / a_k`` with replacement, ``w (pm_k / a_k + n - 1 - k) <g, f_k>``
without. Sums of probabilities are taken in float64.
"""

from __future__ import annotations

from . import _validation as v
from ._backend import array_module, backend_of


def _mass_left(xp, probs64):
    """``pm_k = 1 - sum_{j<k} a_j`` per row, float64."""
    before = xp.cumsum(probs64, axis=1) - probs64
    return 1.0 - before


def _check(features, probs, grad, replace):
    v.check_expectation(features, probs, grad)
    v.require_bool(replace, "replace")
    backend = backend_of(features=features, probs=probs, grad=grad)
    xp = array_module(backend)
    probs64 = probs.astype(xp.float64)
    v.check_probs_values(float(probs64.min()), bool(xp.isfinite(probs64).all()))
    return xp, probs64


def _feature_weights(xp, probs64, replace):
    n = probs64.shape[1]
    if replace:
        return xp.full(probs64.shape, 1.0 / n)
    remaining = xp.arange(n - 1, -1, -1, dtype=xp.float64)
    return (_mass_left(xp, probs64) + remaining * probs64) / n


def _expand(weights, ndim):
    return weights.reshape(weights.shape + (1,) * (ndim - 2))


def expectation(features, probs, *, replace=False):
    """Estimate ``sum_i a_i f_i`` per row from ``n`` sampled features.

    ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (from
    :func:`atskern.sample`, in draw order); returns ``(B, *F)`` in
    ``features``' dtype. ``replace`` must match how the draws were made.
    """
    xp, probs64 = _check(features, probs, None, replace)
    weights = _feature_weights(xp, probs64, replace)
    estimate = (_expand(weights, features.ndim) * features).sum(axis=1)
    return estimate.astype(features.dtype)


def expectation_grad(grad, features, probs, *, replace=False):
    """Unbiased gradients of :func:`expectation` for upstream gradient ``grad`` ``(B, *F)``.

    Returns ``(grad_probs, grad_features)`` shaped like ``probs`` and
    ``features``. Averaged over the draws, scattering ``grad_probs`` to the
    drawn positions gives ``<grad, f_i>`` at every position ``i`` and
    scattering ``grad_features`` gives ``a_i grad``.
    """
    xp, probs64 = _check(features, probs, grad, replace)
    n = probs64.shape[1]
    weights = _feature_weights(xp, probs64, replace)
    grad_b = grad[:, None]
    grad_features = (_expand(weights, features.ndim) * grad_b).astype(features.dtype)
    inner = (grad_b.astype(xp.float64) * features).reshape(features.shape[0], n, -1).sum(axis=2)
    if replace:
        scale = 1.0 / (n * probs64)
    else:
        remaining = xp.arange(n - 1, -1, -1, dtype=xp.float64)
        scale = (_mass_left(xp, probs64) / probs64 + remaining) / n
    grad_probs = (scale * inner).astype(probs.dtype)
    return grad_probs, grad_features
