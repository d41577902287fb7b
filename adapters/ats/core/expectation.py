"""``ats.core.expectation.expected``: the 2019 estimator function, with unbiased gradients.

``expected(attention, features, replace=False, weights=None)`` estimates the
expectation of the features under the attention distribution from ``n``
sampled features ``(B, n, *F)`` and their sampled attention ``(B, n)`` (in
draw order), and defines its gradients for both.

With the default ``weights`` (``1/n`` for every sample) this is DESIGN.md's
estimator, :func:`ats.ops.expectation`: value and gradients unbiased
(without replacement the attention gradient is the unbiased one, not the
2019 library's).

Custom ``weights`` ``(B, n)`` weigh the per-draw estimators: with
replacement ``F = sum_k w_k f_k``; without, ``F = sum_k w_k F_k`` with
``F_k = sum_{j<k} a_j f_j + pm_k f_k`` and ``pm_k = 1 - sum_{j<k} a_j``. Each
``f_k`` (resp. ``F_k``) is by itself an unbiased estimate of ``E_a[f]``, and
the attention gradient here is the sum of each one's unbiased gradient
estimate, so for weights that are fixed before the draw (not functions of
which positions were drawn) value and gradients are unbiased estimates of
``(sum_k w_k) E_a[f]`` and its gradients: weights summing to 1 keep the
estimator unbiased; weights computed from the draw (for instance from how
often a position was drawn, the use 2019's docstring suggested) generally
bias it. ``weights`` get no gradient.

The feature gradient is ``c_k g`` with ``c_k`` the coefficient of ``f_k`` in
``F``; the attention gradient is ``s_k <g, f_k>`` with ``s_k = w_k / a_k``
(with replacement) or ``w_k pm_k / a_k + sum_{j>k} w_j`` (without). A sample
with attention exactly 0 (a zero-probability filler) gets coefficient 0 and
gradients 0.
"""

from __future__ import annotations

from .._keras import require_tensorflow_backend

require_tensorflow_backend("ats.core.expectation")
# ruff: noqa: E402

import keras
import tensorflow as tf

from .. import ops
from .._keras import register
from .._symbolic import is_symbolic

__all__ = ["expected", "Expected"]


def _coefficients(weights64, probs64, replace: bool):
    """Feature coefficients ``c_k`` and attention-gradient scales ``s_k``, float64 ``(B, n)``."""
    zero = tf.equal(probs64, 0.0)
    safe = tf.where(zero, tf.ones_like(probs64), probs64)
    if replace:
        coef = weights64
        scale = weights64 / safe
    else:
        mass_left = 1.0 - tf.cumsum(probs64, axis=1, exclusive=True)
        later = tf.cumsum(weights64, axis=1, exclusive=True, reverse=True)
        coef = weights64 * mass_left + probs64 * later
        scale = weights64 * mass_left / safe + later
    return tf.where(zero, tf.zeros_like(coef), coef), tf.where(zero, tf.zeros_like(scale), scale)


def _weighted(weights, attention, features, replace: bool):
    rank = features.shape.rank

    def expand(t):
        return tf.reshape(t, tf.concat([tf.shape(t), tf.ones([rank - 2], tf.int32)], 0))

    @tf.custom_gradient
    def estimate(f, a):
        coef, scale = _coefficients(tf.cast(weights, tf.float64), tf.cast(a, tf.float64), replace)
        coef_f = expand(tf.cast(coef, f.dtype))
        value = tf.reduce_sum(coef_f * f, axis=1)

        def grad(upstream):
            grad_features = coef_f * tf.expand_dims(upstream, 1)
            products = tf.cast(tf.expand_dims(upstream, 1), tf.float64) * tf.cast(f, tf.float64)
            inner = tf.reduce_sum(tf.reshape(products, tf.concat([tf.shape(a), [-1]], 0)), axis=2)
            return tf.cast(grad_features, f.dtype), tf.cast(scale * inner, a.dtype)

        return value, grad

    result = estimate(features, attention)
    result.set_shape(features.shape[:1].concatenate(features.shape[2:]))
    return result


def expected(attention, features, replace=False, weights=None):
    """Estimate ``E_attention[features]`` from sampled features, with unbiased gradients (2019 signature).

    Arguments
    ---------
    attention : tensor ``(B, n)``, the sampled attention (probabilities), in draw order
    features : tensor ``(B, n, ...)``, the features of the sampled positions
    replace : bool, whether the positions were drawn with replacement
    weights : None or tensor ``(B, n)``, per-sample weights (default ``1/n``);
        see the module docstring for what they do to unbiasedness

    Returns ``(B, ...)``.
    """
    if is_symbolic(attention, features, weights):
        inputs = [attention, features] + ([] if weights is None else [weights])
        return Expected(replace=replace)(inputs)
    attention = tf.convert_to_tensor(attention)
    features = tf.convert_to_tensor(features)
    if weights is None:
        return ops.expectation(features, attention, replace=bool(replace))
    weights = tf.convert_to_tensor(weights)
    if attention.shape.rank != 2:
        raise ValueError(f"attention must be (batch, n), got shape {attention.shape}")
    if features.shape.rank is None or features.shape.rank < 2:
        raise ValueError(f"features must be (batch, n, ...), got shape {features.shape}")
    if not weights.shape.is_compatible_with(attention.shape):
        raise ValueError(f"weights must have attention's shape {attention.shape}, got {weights.shape}")
    if not features.shape[:2].is_compatible_with(attention.shape):
        raise ValueError(f"features {features.shape} must start with attention's shape {attention.shape}")
    if not features.dtype.is_floating or not attention.dtype.is_floating:
        raise TypeError(f"attention and features must be floating, got {attention.dtype.name} and {features.dtype.name}")
    return _weighted(tf.stop_gradient(weights), attention, features, bool(replace))


def _expected_with_replacement(weights, attention, features):
    """2019's private helper, kept for scripts that called it: :func:`expected` with replacement."""
    return expected(attention, features, replace=True, weights=weights)


def _expected_without_replacement(weights, attention, features):
    """2019's private helper: :func:`expected` without replacement (with the unbiased gradient)."""
    return expected(attention, features, replace=False, weights=weights)


@register
class Expected(keras.layers.Layer):
    """:func:`expected` as a layer: ``[attention, features]`` or ``[attention, features, weights]`` -> ``(B, ...)``."""

    def __init__(self, replace=False, **kwargs):
        super().__init__(**kwargs)
        self.replace = bool(replace)

    def call(self, inputs):
        attention, features, *weights = inputs
        return expected(attention, features, self.replace, weights[0] if weights else None)

    def compute_output_shape(self, input_shape):
        features = tuple(input_shape[1])
        return (features[0],) + features[2:]

    def get_config(self):
        return {**super().get_config(), "replace": self.replace}
