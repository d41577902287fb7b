"""The 2019 tensor functions ``sample`` and ``expected``, and their layer twins ``Sample`` and ``Expected``.

Their 2019 import paths :mod:`ats.core.sampling` and :mod:`ats.core.expectation`
re-export them. Written in ``keras.ops``; the draw and the default
estimator go to the running backend's op module (:mod:`ats.keras.backends`),
so they run on Keras 3's TensorFlow, torch and JAX backends. The functions
take backend tensors (eagerly, in ``tf.function``, under ``jax.jit``) and
symbolic Keras tensors (then they add their layer to the functional model).

``sample(n_samples, attention, sample_space, replace=False, use_logits=False)``
draws ``n_samples`` positions per row of ``attention`` and returns
``(samples, sampled_attention)``: int32 grid coordinates ``(B, n, D)`` in draw
order and the attention values at those positions (the logits themselves
when ``use_logits=True``, as in 2019). Without replacement the draw is
successive sampling, the distribution 2019's Gumbel-top-k trick drew from;
with replacement independent draws. The randomness is atskern's
counter-based generator: ``seed=s`` draws ``atskern.sample(..., seed=s)``, the
same draws on every backend (JAX without 64-bit mode: up to near ties), a
different stream of numbers than 2019's, from the same distribution (in a
multi-process job, ranks other than 0 salt the seed with their rank:
:mod:`ats.keras._keys`).

``expected(attention, features, replace=False, weights=None)`` estimates the
expectation of the features under the attention distribution from ``n``
sampled features ``(B, n, *F)`` and their sampled attention ``(B, n)`` (in
draw order), and defines its gradients for both. With the default
``weights`` (``1/n`` for every sample) this is DESIGN.md's estimator: value
and gradients unbiased (without replacement the attention gradient is the
unbiased one, not the 2019 library's).

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
gradients 0. The coefficients are computed in float64 (float32 on JAX
without 64-bit mode).
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.functions")
# ruff: noqa: E402

import numbers

import keras
import ml_dtypes
import numpy as np
from keras import ops

from .._keras import register
from .._layer_args import check_flag
from .._symbolic import is_symbolic
from . import _keys
from .backends import ops as backend_ops

__all__ = ["sample", "Sample", "expected", "Expected"]


# --- sample --------------------------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _static_value(value):
    """The value of a shape-like argument if it is known now (None for run-time tensors)."""
    if not ops.is_tensor(value):
        return value
    return backend_ops().static_value(value)


def _check_sample_space(sample_space, attention):
    """``sample_space`` must be the attention's grid shape (2019's contract); checked where both are known."""
    grid = tuple(attention.shape[1:])
    value = _static_value(sample_space)
    if value is None:
        return
    try:
        space = tuple(int(s) for s in np.asarray(value).reshape(-1))
    except (TypeError, ValueError):
        return  # a list holding run-time tensors: nothing to check now
    if len(space) != len(grid):
        raise ValueError(
            f"sample_space must be the attention's grid shape (attention.shape[1:]), got {space} for attention "
            f"of shape {tuple(attention.shape)}"
        )
    if all(g is not None for g in grid) and space != grid:
        raise ValueError(f"sample_space {space} must equal the attention's grid shape {grid} (attention.shape[1:])")


def _rows(attention):
    return ops.reshape(attention, (ops.shape(attention)[0], -1))


def _flat_index(samples, grid):
    """Row-major flat cell index of ``(B, n, D)`` grid coordinates (integer division only; no unravel)."""
    flat = samples[..., 0]
    for d in range(1, len(grid)):
        flat = flat * grid[d] + samples[..., d]
    return flat


def _gather(attention, samples):
    """``attention[b, *samples[b, k]]`` as ``(B, n)``, differentiable in ``attention``."""
    grid = list(ops.shape(attention)[1:])
    flat = _flat_index(ops.cast(samples, "int32"), grid)
    return ops.take_along_axis(_rows(attention), flat, axis=1)


def sample(n_samples, attention, sample_space, replace=False, use_logits=False, *, seed=None):
    """Sample ``n_samples`` positions per row of ``attention`` (2019 signature).

    Arguments
    ---------
    n_samples : int
    attention : tensor ``(B, *grid)``, 1 to 3 grid dimensions
        A distribution per row (non-negative weights), or unnormalized log
        probabilities when ``use_logits`` is True.
    sample_space : the grid shape, ``attention.shape[1:]``
        Kept for the 2019 signature; checked against the attention's shape.
    replace : bool
    use_logits : bool
    seed : None, int in [0, 2**64) or an integer scalar tensor (new)
        Key of atskern's counter-based generator (same seed and attention,
        same draws, on every backend); None draws afresh (eagerly: a new seed
        per call from NumPy's global generator; under ``jax.jit`` a traced
        function needs a seed tensor, which :class:`Sample` passes).

    Returns
    -------
    samples : int32 ``(B, n_samples, D)``
    sampled_attention : ``(B, n_samples)``, ``attention`` gathered at the
        samples (differentiable; the logits when ``use_logits``).
    """
    n = _positive_int(n_samples, "n_samples")
    replace = check_flag(replace, "replace")
    use_logits = check_flag(use_logits, "use_logits")
    if is_symbolic(attention):
        return Sample(n, replace=replace, use_logits=use_logits, seed=seed)(attention)
    attention = ops.convert_to_tensor(attention)
    if len(attention.shape) not in (2, 3, 4):
        raise ValueError(f"attention must be (batch, *grid) with 1 to 3 grid dimensions, got shape {tuple(attention.shape)}")
    _check_sample_space(sample_space, attention)
    weights = attention
    if use_logits:
        weights = ops.reshape(ops.softmax(_rows(attention), axis=-1), ops.shape(attention))
    samples = draw(weights, n, replace=replace, seed=seed)
    return samples, _gather(attention, samples)


def draw(weights, n: int, *, replace: bool, seed=None):
    """int32 grid coordinates ``(B, n, D)`` drawn from ``weights`` ``(B, *grid)`` (no gradient).

    ``seed`` is None (a fresh draw: eagerly a new seed per call), an int in
    ``[0, 2**64)``, or an integer scalar tensor (e.g. from a
    ``keras.random.SeedGenerator``, so that compiled functions draw afresh per
    call); ``seed=s`` draws ``atskern.sample(weights, n, seed=s)`` (rank 0).
    """
    be = backend_ops()
    key = be.seed_key(_keys.check_seed(seed, tensors=True))
    indices, _ = be.sample(ops.stop_gradient(weights), n, replace=replace, key=key, deterministic=False)
    return indices


@register
class Sample(keras.layers.Layer):
    """:func:`sample` as a layer: ``attention -> [samples, sampled_attention]``.

    Without ``seed`` every call draws afresh: the layer holds a
    ``keras.random.SeedGenerator`` whose state is a Keras variable, so
    compiled steps (``jax.jit``, ``jit_compile=True``) draw afresh too.
    """

    def __init__(self, n_samples, replace=False, use_logits=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.n_samples = _positive_int(n_samples, "n_samples")
        self.replace = check_flag(replace, "replace")
        self.use_logits = check_flag(use_logits, "use_logits")
        self.seed = _keys.check_seed(seed)
        # used without a seed; always made, so that the layer's variables do not depend on its seed
        self.seed_generator = keras.random.SeedGenerator()
        # TensorFlow's draw runs in tf.numpy_function (no XLA); torch and JAX trace
        self.supports_jit = keras.backend.backend() != "tensorflow"

    def call(self, attention):
        seed = self.seed
        if seed is None and keras.backend.backend() == "jax":
            seed = keras.random.randint((), 0, 2**31 - 1, dtype="int32", seed=self.seed_generator)
        return list(sample(self.n_samples, attention, ops.shape(attention)[1:], self.replace, self.use_logits,
                           seed=seed))

    def compute_output_spec(self, attention):
        batch, dims = attention.shape[0], len(attention.shape) - 1
        return [
            keras.KerasTensor((batch, self.n_samples, dims), dtype="int32"),
            keras.KerasTensor((batch, self.n_samples), dtype=attention.dtype),
        ]

    def load_own_variables(self, store):
        if len(store) == 0:  # saved before the layer had a seed generator: nothing to restore
            return
        super().load_own_variables(store)

    def get_config(self):
        return {**super().get_config(), "n_samples": self.n_samples, "replace": self.replace,
                "use_logits": self.use_logits, "seed": self.seed}


# --- expected ------------------------------------------------------------------------------------


def _compute_dtype() -> str:
    return "float64" if backend_ops().x64() else "float32"


def _exclusive_cumsum(x, reverse=False):
    """``sum_{j<k} x_j`` (or ``sum_{j>k}`` with ``reverse``) along axis 1, in ``x``'s dtype."""
    total = backend_ops().cumsum(x, 1)
    if reverse:
        return ops.sum(x, axis=1, keepdims=True) - total
    return total - x


def _mass_left(probs, unit: float, work: str):
    """``pm_k``: ``1 - sum_{j<k} a_j``, or ``sum_{j>=k} a_j`` (the draws still to come, a lower bound) where that
    is lost in the rounding of the probabilities (``unit`` per entry) and of ``work``
    (``atskern.estimator._mass_left``). On JAX without x64 the running sums are ``ats.jax``'s double-floats: a
    float32 ``1 - sum`` of a late draw lost most of its digits."""
    if work == "float32" and keras.backend.backend() == "jax":
        from ..jax import _estimator

        return _estimator.mass_left(probs, unit)
    before = _exclusive_cumsum(probs)
    still_to_come = ops.flip(backend_ops().cumsum(ops.flip(probs, axis=1), 1), axis=1)  # not sum - cumsum: it cancels
    left = 1 - before
    draws = ops.cast(ops.arange(1, ops.shape(probs)[1] + 1), work)
    noise = 2 * unit * before + draws * (float(np.finfo(work).eps) / 2)
    larger = ops.where(left > still_to_come, left, still_to_come)  # ops.maximum: float32 on Keras' torch backend
    return ops.where(left > noise, larger, still_to_come)


def _coefficients(weights, probs, replace: bool, unit: float, work: str):
    """Feature coefficients ``c_k`` and attention-gradient scales ``s_k``, ``(B, n)`` in the compute dtype
    ``work``; ``unit``: the unit roundoff of the probabilities' own dtype."""
    zero = ops.equal(probs, 0)
    safe = ops.where(zero, ops.ones_like(probs), probs)
    if replace:
        coef = weights
        scale = weights / safe
    else:
        mass_left = _mass_left(probs, unit, work)
        later = _exclusive_cumsum(weights, reverse=True)
        coef = weights * mass_left + probs * later
        scale = weights * mass_left / safe + later
    return ops.where(zero, ops.zeros_like(coef), coef), ops.where(zero, ops.zeros_like(scale), scale)


def _weighted(weights, attention, features, replace: bool):
    rank = len(features.shape)
    work = _compute_dtype()
    weights = ops.stop_gradient(ops.cast(weights, work))

    def expand(t):
        return ops.reshape(t, tuple(ops.shape(t)) + (1,) * (rank - 2))

    @ops.custom_gradient
    def estimate(f, a):
        unit = float(ml_dtypes.finfo(keras.backend.standardize_dtype(a.dtype)).eps) / 2
        coef, scale = _coefficients(weights, ops.cast(a, work), replace, unit, work)
        coef_f = expand(ops.cast(coef, f.dtype))
        value = ops.sum(coef_f * f, axis=1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            up = ops.expand_dims(upstream, 1)
            grad_features = coef_f * up
            products = ops.cast(up, work) * ops.cast(f, work)
            inner = ops.sum(ops.reshape(products, (ops.shape(a)[0], ops.shape(a)[1], -1)), axis=2)
            return ops.cast(grad_features, f.dtype), ops.cast(scale * inner, a.dtype)

        return value, grad

    return estimate(features, attention)


def _is_floating(x) -> bool:
    return "float" in str(keras.backend.standardize_dtype(x.dtype))


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
    replace = check_flag(replace, "replace")
    if is_symbolic(attention, features, weights):
        inputs = [attention, features] + ([] if weights is None else [weights])
        return Expected(replace=replace)(inputs)
    attention = ops.convert_to_tensor(attention)
    features = ops.convert_to_tensor(features)
    if weights is None:
        return backend_ops().expectation(features, attention, replace=replace)
    weights = ops.convert_to_tensor(weights)
    if len(attention.shape) != 2:
        raise ValueError(f"attention must be (batch, n), got shape {tuple(attention.shape)}")
    if len(features.shape) < 2:
        raise ValueError(f"features must be (batch, n, ...), got shape {tuple(features.shape)}")

    def compatible(a, b):
        return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))

    if not compatible(tuple(weights.shape), tuple(attention.shape)):
        raise ValueError(f"weights must have attention's shape {tuple(attention.shape)}, got {tuple(weights.shape)}")
    if not compatible(tuple(features.shape[:2]), tuple(attention.shape)):
        raise ValueError(f"features {tuple(features.shape)} must start with attention's shape {tuple(attention.shape)}")
    if not _is_floating(features) or not _is_floating(attention):
        raise TypeError(f"attention and features must be floating, got {attention.dtype} and {features.dtype}")
    return _weighted(weights, attention, features, replace)


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
        kwargs.setdefault("autocast", False)  # as Expectation: float16 probabilities checked in their own dtype,
        super().__init__(**kwargs)  # and a float32 attention's gradient not computed in float16 (it overflowed)
        self.replace = check_flag(replace, "replace")

    def call(self, inputs):
        attention, features, *weights = inputs
        return expected(attention, features, self.replace, weights[0] if weights else None)

    def compute_output_shape(self, input_shape):
        features = tuple(input_shape[1])
        return (features[0],) + features[2:]

    def get_config(self):
        return {**super().get_config(), "replace": self.replace}
