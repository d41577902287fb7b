"""Helpers of the 2019 library: tensor casts here, ``ats.utils.layers``, ``ats.utils.regularizers``, ``ats.utils.training``.

The casts are written with ``keras.ops``, so they work on TensorFlow tensors,
NumPy arrays and symbolic Keras tensors alike. Keras is imported on first
use: ``import ats.utils`` stays light.
"""

from __future__ import annotations

import numbers
from functools import partial

__all__ = [
    "to_tensor",
    "to_dtype",
    "to_float16",
    "to_float32",
    "to_float64",
    "to_double",
    "to_int8",
    "to_int16",
    "to_int32",
    "to_int64",
    "expand_many",
]


def _ops():
    import keras

    return keras.ops


def _is_tensor(x) -> bool:
    import keras

    return keras.ops.is_tensor(x) or isinstance(x, keras.KerasTensor)


def to_tensor(x, dtype="int32"):
    """``x`` itself if it is a tensor, otherwise a constant tensor of ``dtype``.

    (The 2019 helper ignored ``dtype`` and always made int32 constants; int32
    is still the default.)
    """
    if _is_tensor(x):
        return x
    return _ops().convert_to_tensor(x, dtype=dtype)


_WIDTHS = (8, 16, 32, 64)
_TYPES = ("float", "int")


def to_dtype(x, type="float", width=32, sign=True):  # noqa: A002 - the 2019 argument name
    """Cast ``x`` to the dtype named by ``type`` (``"float"`` or ``"int"``), ``width`` in bits and ``sign``.

    ``to_dtype(x, "int", 8, sign=False)`` casts to uint8. Unsigned floats and
    float8 do not exist and raise a ValueError.
    """
    if type not in _TYPES:
        raise ValueError(f"type must be one of {_TYPES}, got {type!r}")
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width not in _WIDTHS:
        raise ValueError(f"width must be one of {_WIDTHS}, got {width!r}")  # 32.0 once made "float32.0"
    width = int(width)
    if type == "float" and (width == 8 or not sign):
        raise ValueError(f"there is no {'' if sign else 'unsigned '}float{width} dtype (type={type!r}, width={width}, sign={sign})")
    return _ops().cast(x, f"{'' if sign else 'u'}{type}{width}")


to_float16 = partial(to_dtype, type="float", width=16, sign=True)
to_float32 = partial(to_dtype, type="float", width=32, sign=True)
to_float64 = partial(to_dtype, type="float", width=64, sign=True)
to_double = to_float64
to_int8 = partial(to_dtype, type="int", width=8, sign=True)
to_int16 = partial(to_dtype, type="int", width=16, sign=True)
to_int32 = partial(to_dtype, type="int", width=32, sign=True)
to_int64 = partial(to_dtype, type="int", width=64, sign=True)


def expand_many(x, axes):
    """``expand_dims`` once per entry of ``axes``, in order: ``expand_many(x, [-1, -1])`` adds two trailing axes."""
    ops = _ops()
    for axis in axes:
        x = ops.expand_dims(x, axis)
    return x
