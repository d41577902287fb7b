"""Regularizers for the attention distribution (2019 names)."""

from __future__ import annotations

from .._keras import require_tensorflow_backend

require_tensorflow_backend("ats.utils.regularizers")
# The backend is checked before keras is imported, hence the late imports.
# ruff: noqa: E402

import keras
import tensorflow as tf

from .._keras import register



@register
class MultinomialEntropy(keras.regularizers.Regularizer):
    """Raise or lower the entropy of each row of a (multinomial) attention distribution.

    The penalty is ``strength * sum(x log(x + eps)) / batch``, that is minus
    ``strength`` times the mean entropy of the rows: a positive ``strength``
    pushes towards more entropy (more exploration), a negative one towards less.
    """

    def __init__(self, strength=1.0, eps=1e-6):
        self.strength = float(strength)
        self.eps = float(eps)

    def __call__(self, x):
        x = tf.convert_to_tensor(x)
        batch = tf.cast(tf.shape(x)[0], x.dtype)
        return self.strength * tf.reduce_sum(x * tf.math.log(x + self.eps)) / batch

    def get_config(self):
        return {"strength": self.strength, "eps": self.eps}


def multinomial_entropy(strength=1.0, eps=1e-6):
    """The :class:`MultinomialEntropy` regularizer (2019 name)."""
    return MultinomialEntropy(strength, eps)
