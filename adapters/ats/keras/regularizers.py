"""Regularizers for the attention distribution (2019 names), in ``keras.ops`` (every Keras 3 backend).

Their 2019 import path :mod:`ats.utils.regularizers` re-exports them.
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.regularizers")
# The backend is checked before keras is imported, hence the late imports.
# ruff: noqa: E402

import math
import numbers

import keras
from keras import ops

from .._keras import register

__all__ = ["MultinomialEntropy", "multinomial_entropy"]


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@register
class MultinomialEntropy(keras.regularizers.Regularizer):
    """Raise or lower the entropy of each row of a (multinomial) attention distribution.

    The penalty is ``strength * sum(x log(x + eps)) / batch``, that is minus
    ``strength`` times the mean entropy of the rows: a positive ``strength``
    pushes towards more entropy (more exploration), a negative one towards less.
    """

    def __init__(self, strength=1.0, eps=1e-6):
        self.strength = _finite(strength, "strength")
        self.eps = _finite(eps, "eps")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive (it keeps log away from 0), got {eps!r}")

    def __call__(self, x):
        x = ops.convert_to_tensor(x)
        if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
            x = ops.cast(x, "float32")  # mixed precision: Keras adds the losses in float32
        batch = ops.cast(ops.shape(x)[0], x.dtype)
        return self.strength * ops.sum(x * ops.log(x + self.eps)) / batch

    def get_config(self):
        return {"strength": self.strength, "eps": self.eps}


def multinomial_entropy(strength=1.0, eps=1e-6):
    """The :class:`MultinomialEntropy` regularizer (2019 name)."""
    return MultinomialEntropy(strength, eps)
