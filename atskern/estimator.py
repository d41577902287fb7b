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
without. Sums of probabilities are taken in float64. Where ``1 - sum_{j<k} a_j`` is lost in the
rounding of the probabilities (the draws so far hold all but a sliver of the mass), ``pm_k`` is
``sum_{j>=k} a_j`` instead, the mass of the draws still to come: a lower bound of the mass left
that keeps the gradients finite (:func:`_mass_left`).

A drawn entry with ``probs == 0`` (a filler: a short row's padding or a probability the dtype
cannot hold, DESIGN.md R1-R3) gets ``c_k = 0`` and attention gradient 0, so results stay finite.
``probs`` must be finite and in [0, 1]; without replacement a row may sum to at most
``1 + 1e-6`` (float64) or ``1 + n 2**-20`` (float32), else a ValueError names the row.
"""

from __future__ import annotations

from . import _validation as v
from ._backend import array_module, backend_of
from ._fpenv import ieee_subnormals


def _mass_left(xp, probs64, unit):
    """``pm_k`` per row, float64: ``1 - sum_{j<k} a_j`` where the probabilities resolve it, else
    ``sum_{j>=k} a_j``.

    The draws still to come are part of the mass left, so ``sum_{j>=k} a_j`` bounds it from below. Once the
    draws so far hold all but a sliver of the mass, ``1 - sum_{j<k} a_j`` is within its rounding error (``unit``,
    the unit roundoff of the probabilities' dtype, per entry, and float64's per addition): then it may be 0,
    negative, or 1e36 times the true mass, and ``pm_k / a_k`` overflows. There the bound takes its place, so every
    gradient stays finite; elsewhere the two agree up to rounding.
    """
    n = probs64.shape[1]
    before = xp.cumsum(probs64, axis=1) - probs64
    still_to_come = xp.cumsum(probs64[:, ::-1], axis=1)[:, ::-1]
    left = 1.0 - before
    noise = 2.0 * unit * before + xp.arange(1, n + 1, dtype=xp.float64) * 2.0**-53
    return xp.where(left > noise, xp.maximum(left, still_to_come), still_to_come)


def _check_probs(xp, probs, probs64, replace):
    """``probs`` finite, in [0, 1], and (without replacement) summing to at most 1 + tolerance per row."""
    ok = xp.isfinite(probs64) & (probs64 >= 0) & (probs64 <= 1)
    tolerance = v.probs_sum_tolerance(probs.dtype, probs64.shape[1])
    if replace:
        good = bool(ok.all())
    else:
        good = bool(ok.all() & (xp.where(ok, probs64, 0.0).sum(axis=1) <= 1 + tolerance).all())
    if not good:
        host = probs64.get() if hasattr(probs64, "get") else probs64
        raise v.explain_bad_probs(host, replace, tolerance)


def _check(features, probs, grad, replace):
    v.check_expectation(features, probs, grad)
    v.require_bool(replace, "replace")
    backend = backend_of(features=features, probs=probs, grad=grad)
    xp = array_module(backend)
    probs64 = probs.astype(xp.float64)
    _check_probs(xp, probs, probs64, replace)
    return xp, probs64


def _feature_weights(xp, probs64, replace, unit):
    """``c_k``; 0 for fillers (``probs == 0``: rule R3)."""
    n = probs64.shape[1]
    drawn = probs64 > 0
    if replace:
        return xp.where(drawn, 1.0 / n, 0.0)
    remaining = xp.arange(n - 1, -1, -1, dtype=xp.float64)
    return xp.where(drawn, (_mass_left(xp, probs64, unit) + remaining * probs64) / n, 0.0)


def _attention_scale(xp, probs64, replace, unit):
    """The attention gradient's factor of ``<g, f_k>``; 0 for fillers (no division by 0)."""
    n = probs64.shape[1]
    drawn = probs64 > 0
    safe = xp.where(drawn, probs64, 1.0)
    if replace:
        return xp.where(drawn, 1.0 / (n * safe), 0.0)
    remaining = xp.arange(n - 1, -1, -1, dtype=xp.float64)
    return xp.where(drawn, (_mass_left(xp, probs64, unit) / safe + remaining) / n, 0.0)


def _expand(weights, ndim):
    return weights.reshape(weights.shape + (1,) * (ndim - 2))


def expectation(features, probs, *, replace=False):
    """Estimate ``sum_i a_i f_i`` per row from ``n`` sampled features.

    ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (from
    :func:`atskern.sample`, in draw order); returns ``(B, *F)`` in
    ``features``' dtype. ``replace`` must match how the draws were made.
    """
    with ieee_subnormals():
        xp, probs64 = _check(features, probs, None, replace)
        weights = _feature_weights(xp, probs64, replace, v.unit_roundoff(probs.dtype))
        estimate = (_expand(weights, features.ndim) * features).sum(axis=1)
        return estimate.astype(features.dtype)


def expectation_grad(grad, features, probs, *, replace=False):
    """Unbiased gradients of :func:`expectation` for upstream gradient ``grad`` ``(B, *F)``.

    Returns ``(grad_probs, grad_features)`` shaped like ``probs`` and
    ``features``. Averaged over the draws, scattering ``grad_probs`` to the
    drawn positions gives ``<grad, f_i>`` at every position ``i`` and
    scattering ``grad_features`` gives ``a_i grad``.
    """
    v.require_array(grad, "grad")  # None is expectation's "no gradient" inside _check
    with ieee_subnormals():
        xp, probs64 = _check(features, probs, grad, replace)
        n = probs64.shape[1]
        unit = v.unit_roundoff(probs.dtype)
        weights = _feature_weights(xp, probs64, replace, unit)
        grad_b = grad[:, None]
        grad_features = (_expand(weights, features.ndim) * grad_b).astype(features.dtype)
        inner = (grad_b.astype(xp.float64) * features).reshape(features.shape[0], n, -1).sum(axis=2)
        grad_probs = (_attention_scale(xp, probs64, replace, unit) * inner).astype(probs.dtype)
        return grad_probs, grad_features
