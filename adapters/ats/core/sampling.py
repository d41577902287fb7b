"""``ats.core.sampling.sample``: the 2019 low-level sampling function, over atskern's sampler.

``sample(n_samples, attention, sample_space, replace=False, use_logits=False)``
draws ``n_samples`` positions per row of ``attention`` and returns
``(samples, sampled_attention)``: int32 grid coordinates ``(B, n, D)`` in draw
order and the attention values at those positions (the logits themselves
when ``use_logits=True``, as in 2019). Without replacement the draw is
successive sampling, the distribution 2019's Gumbel-top-k trick drew from;
with replacement independent draws. The randomness is atskern's
counter-based generator, not TensorFlow's: a draw is a different stream of
numbers than 2019's, from the same distribution.

Works on TensorFlow tensors (eagerly and in ``tf.function``) and on symbolic
Keras tensors (inside a functional model, through :class:`Sample`).
"""

from __future__ import annotations

from .._keras import require_tensorflow_backend

require_tensorflow_backend("ats.core.sampling")
# ruff: noqa: E402

import numbers

import keras
import numpy as np
import tensorflow as tf

from .. import ops
from .._keras import register
from .._symbolic import is_symbolic

__all__ = ["sample", "Sample"]


def _check_sample_space(sample_space, attention):
    """``sample_space`` must be the attention's grid shape (2019's contract); checked where both are known."""
    grid = attention.shape[1:]
    if isinstance(sample_space, (tf.Tensor, tf.Variable)):
        value = tf.get_static_value(sample_space)
        if value is None:
            return
        sample_space = value
    try:
        space = tuple(int(s) for s in np.asarray(sample_space).reshape(-1))
    except (TypeError, ValueError):
        return  # a list holding run-time tensors: nothing to check now
    if len(space) != len(grid):
        raise ValueError(
            f"sample_space must be the attention's grid shape (attention.shape[1:]), got {space} for attention "
            f"of shape {tuple(attention.shape)}"
        )
    if all(g is not None for g in grid) and space != tuple(grid):
        raise ValueError(
            f"sample_space {space} must equal the attention's grid shape {tuple(grid)} (attention.shape[1:])"
        )


def sample(n_samples, attention, sample_space, replace=False, use_logits=False, *, seed=None):
    """Sample ``n_samples`` positions per row of ``attention`` (2019 signature).

    Arguments
    ---------
    n_samples : int
    attention : tensor ``(B, *grid)``
        A distribution per row (non-negative weights), or unnormalized log
        probabilities when ``use_logits`` is True.
    sample_space : the grid shape, ``attention.shape[1:]``
        Kept for the 2019 signature; checked against the attention's shape.
    replace : bool
    use_logits : bool
    seed : None or int (new)
        Key of atskern's counter-based generator (same seed and attention,
        same draws); None draws afresh.

    Returns
    -------
    samples : int32 ``(B, n_samples, D)``
    sampled_attention : ``(B, n_samples)``, ``attention`` gathered at the
        samples (differentiable; the logits when ``use_logits``).
    """
    if is_symbolic(attention):
        return Sample(n_samples, replace=replace, use_logits=use_logits, seed=seed)(attention)
    attention = tf.convert_to_tensor(attention)
    _check_sample_space(sample_space, attention)
    weights = attention
    if use_logits:
        flat = tf.reshape(attention, (tf.shape(attention)[0], -1))
        weights = tf.reshape(tf.nn.softmax(flat, axis=-1), tf.shape(attention))
    samples, _ = ops.sample(tf.stop_gradient(weights), n_samples, replace=bool(replace), seed=seed)
    sampled_attention = tf.gather_nd(attention, samples, batch_dims=1)
    return samples, sampled_attention


@register
class Sample(keras.layers.Layer):
    """:func:`sample` as a layer: ``attention -> [samples, sampled_attention]``."""

    def __init__(self, n_samples, replace=False, use_logits=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        self.n_samples = int(n_samples)
        self.replace = bool(replace)
        self.use_logits = bool(use_logits)
        self.seed = seed
        self.supports_jit = False

    def call(self, attention):
        return list(sample(self.n_samples, attention, tf.shape(attention)[1:], self.replace, self.use_logits,
                           seed=self.seed))

    def compute_output_spec(self, attention):
        batch, dims = attention.shape[0], len(attention.shape) - 1
        return [
            keras.KerasTensor((batch, self.n_samples, dims), dtype="int32"),
            keras.KerasTensor((batch, self.n_samples), dtype=attention.dtype),
        ]

    def get_config(self):
        return {**super().get_config(), "n_samples": self.n_samples, "replace": self.replace,
                "use_logits": self.use_logits, "seed": self.seed}
