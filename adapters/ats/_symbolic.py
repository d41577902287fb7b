"""Let the 2019 tensor functions take symbolic Keras tensors: they then run inside a Keras layer.

The 2019 library built TF1 graphs, so its functions (``sample``, ``expected``,
``FromTensors.patches``) took the same symbolic tensors as its Keras layers.
In Keras 3 a functional model's tensors are ``keras.KerasTensor`` objects that
TensorFlow ops cannot take; each such function checks :func:`is_symbolic` and,
if so, applies a layer that calls the function on real tensors.
"""

from __future__ import annotations

import keras


def is_symbolic(*values) -> bool:
    """Whether any value (or any entry of a list/tuple value) is a symbolic Keras tensor."""
    for value in values:
        if isinstance(value, keras.KerasTensor):
            return True
        if isinstance(value, (list, tuple)) and is_symbolic(*value):
            return True
    return False


def static_ints(values, name: str) -> list[int]:
    """``values`` (ints, or a shape) as Python ints; a ValueError naming ``name`` if one is unknown."""
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be known when a Keras model is built (Python ints or a static shape), got {values!r}"
        ) from None
    return out
