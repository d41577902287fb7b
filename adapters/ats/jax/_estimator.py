"""The ATS estimator as a ``jax.custom_vjp``: value and gradients exactly those of ``atskern.expectation_grad``.

``F = sum_k c_k f_k`` with ``c_k = 1/n`` (with replacement) or
``c_k = (pm_k + (n - 1 - k) a_k) / n`` (without), ``pm_k = 1 - sum_{j<k} a_j``.
Gradients: ``c_k g`` for the features and, for the probabilities, the
unbiased estimate of ``<g, f_i>``: ``<g, f_k> / (n a_k)`` or
``(pm_k / a_k + n - 1 - k) <g, f_k> / n``. Rule R3: an entry with
``a_k == 0`` (a filler) gets coefficient 0 and both gradients 0, so every
result is finite. Coefficients and inner products are computed in float64
under JAX's 64-bit mode, in float32 otherwise, where the running sums of
``pm_k`` are double-floats (two float32 words): a late draw's ``1 - sum`` keeps
its digits, as in atskern's float64.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _double
from ._rng import compute_dtype


def mass_left(probs, unit: float):
    """``pm_k`` per row: ``1 - sum_{j<k} a_j``, or ``sum_{j>=k} a_j`` (the draws still to come, a lower bound)
    where that is lost in the rounding of the probabilities (``unit`` per entry) and of the compute dtype
    (``atskern.estimator._mass_left``)."""
    n = probs.shape[1]
    if probs.dtype == jnp.float32:  # no float64 here: the running sums as double-floats
        before = _running_sums(jnp.pad(probs[:, :-1], ((0, 0), (1, 0))))
        left = _double.subtract((jnp.ones_like(probs), jnp.zeros_like(probs)), before)
        still_to_come = _running_sums(probs, reverse=True)
        before, left, still_to_come = (x[0] + x[1] for x in (before, left, still_to_come))
        sums = _DOUBLE_SUM_ERROR
    else:
        before = jnp.cumsum(probs, axis=1) - probs
        still_to_come = jnp.flip(jnp.cumsum(jnp.flip(probs, axis=1), axis=1), axis=1)
        left = 1 - before
        sums = float(jnp.finfo(probs.dtype).eps) / 2
    noise = 2 * unit * before + jnp.arange(1, n + 1, dtype=probs.dtype) * sums
    return jnp.where(left > noise, jnp.maximum(left, still_to_come), still_to_come)


_DOUBLE_SUM_ERROR = 2.0**-45
"""A bound of one double-float addition's error relative to its sum (:func:`ats.jax._double.add`)."""


def _running_sums(probs, reverse: bool = False):
    """Inclusive running sums along each row of float32 ``probs`` as double-floats ``(hi, lo)`` (from the end with
    ``reverse``): within about ``2**-46`` of the exact sums, where a float32 one's error reaches its ulp, 2**-24
    of the sum, so ``1 - sum_{j<k} a_j`` of a late draw lost most of its digits."""
    return lax.associative_scan(_double.add, (probs, jnp.zeros_like(probs)), reverse=reverse, axis=1)


def coefficients(probs, replace: bool, unit: float):
    """``(c, s)``: feature coefficients and attention-gradient scales ``(B, n)``, zero where ``probs == 0``;
    ``probs`` in the compute dtype, ``unit`` the unit roundoff of their own dtype."""
    n = probs.shape[1]
    filler = probs == 0
    safe = jnp.where(filler, 1, probs)
    if replace:
        c = jnp.full_like(probs, 1 / n)
        s = 1 / (n * safe)
    else:
        remaining = jnp.arange(n - 1, -1, -1, dtype=probs.dtype)
        pm = mass_left(probs, unit)
        c = (pm + remaining * probs) / n
        s = (pm / safe + remaining) / n
    return jnp.where(filler, 0, c), jnp.where(filler, 0, s)


def _unit(probs) -> float:
    return float(jnp.finfo(probs.dtype).eps) / 2


def _expand(weights, ndim: int):
    return weights.reshape(weights.shape + (1,) * (ndim - 2))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def expectation(features, probs, replace: bool):
    """``(B, *F)`` estimate from ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)`` (no checks)."""
    dtype = compute_dtype()
    c, _ = coefficients(probs.astype(dtype), replace, _unit(probs))
    estimate = jnp.sum(_expand(c, features.ndim) * features.astype(dtype), axis=1)
    return estimate.astype(features.dtype)


def _fwd(features, probs, replace):
    return expectation(features, probs, replace), (features, probs)


def grads(grad, features, probs, replace: bool):
    """``(grad_probs, grad_features)``: atskern.expectation_grad's formulas, rule R3 included."""
    dtype = compute_dtype()
    c, s = coefficients(probs.astype(dtype), replace, _unit(probs))
    grad_features = (_expand(c, features.ndim) * grad[:, None].astype(dtype)).astype(features.dtype)
    products = grad[:, None].astype(dtype) * features.astype(dtype)
    inner = products.reshape(probs.shape[0], probs.shape[1], math.prod(features.shape[2:])).sum(axis=2)  # -1: not for size 0
    return (s * inner).astype(probs.dtype), grad_features


def _bwd(replace, residual, grad):
    features, probs = residual
    grad_probs, grad_features = grads(grad, features, probs, replace)
    return grad_features, grad_probs


expectation.defvjp(_fwd, _bwd)
