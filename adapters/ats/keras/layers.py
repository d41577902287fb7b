"""Keras layers of the 2019 library: ``SampleSoftmax``, ``L2Normalize``, ``ActivityRegularizer``, ``TotalReshape``,
and the image layers ``ResizeImages``, ``ImageLinearTransform``, ``ImagePan`` (from :mod:`ats.keras.image_layers`).

Written in ``keras.ops`` only: they run on Keras 3's TensorFlow, torch and
JAX backends (and compile under ``jit_compile=True`` / ``jax.jit``). Their
2019 import path :mod:`ats.utils.layers` re-exports them.
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.layers")
# The backend is checked before keras is imported, hence the late imports.
# ruff: noqa: E402

import numbers

import keras
from keras import ops

from .._keras import register
from .._layer_args import check_flag
from .image_layers import ImageLinearTransform, ImagePan, ResizeImages


def _channels_axis() -> int:
    return 1 if keras.config.image_data_format() == "channels_first" else -1


@register
class SampleSoftmax(keras.layers.Layer):
    """Softmax over every position of a sample (all axes but the batch), not just the last axis.

    Arguments
    ---------
    squeeze_channels : bool
        Drop the (size 1) channels axis, turning ``(B, *grid, 1)`` into the
        ``(B, *grid)`` attention map that ``SamplePatches`` expects.
    smooth : float in [0, 1)
        Mix the distribution with the uniform one: ``(1 - smooth) p + smooth / N``,
        so that no position has zero probability.

    The logits keep their dtype (no autocasting), and 16-bit logits are normalized in float32 and give a float32
    map, as ``ats.torch``'s under autocast: under ``mixed_float16`` the float16 sum of 65536 exponentials
    overflowed (an all-zero map on TensorFlow and JAX), ``1 / N`` did too (the smoothing was lost), and the
    sampled attention's gradient exceeds float16's range on such maps.
    """

    def __init__(self, squeeze_channels=False, smooth=0.0, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if isinstance(smooth, bool) or not isinstance(smooth, numbers.Real) or not 0 <= smooth < 1:
            raise ValueError(f"smooth must be a number in [0, 1), got {smooth!r}")
        self.squeeze_channels = check_flag(squeeze_channels, "squeeze_channels")
        self.smooth = float(smooth)

    def build(self, input_shape):
        if self.squeeze_channels:
            channels = input_shape[_channels_axis()]
            if channels is not None and channels != 1:
                raise ValueError(
                    f"SampleSoftmax(squeeze_channels=True) needs 1 channel, got input shape {tuple(input_shape)}"
                )

    def call(self, x):
        shape = ops.shape(x)
        flat = ops.reshape(x, (shape[0], -1))
        if keras.backend.standardize_dtype(flat.dtype) in ("float16", "bfloat16"):
            flat = ops.cast(flat, "float32")
        p = ops.softmax(flat, axis=-1)
        if self.smooth > 0:
            positions = ops.cast(ops.shape(flat)[1], p.dtype)
            p = p * (1 - self.smooth) + self.smooth / positions
        p = ops.reshape(p, shape)
        if self.squeeze_channels:
            p = ops.squeeze(p, axis=_channels_axis())
        return p

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        if self.squeeze_channels:
            shape.pop(_channels_axis())
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "squeeze_channels": self.squeeze_channels, "smooth": self.smooth}


def _axis(axis):
    """An int, a tuple of ints, or None (every axis), as 2019's ``K.l2_normalize`` took them."""
    if axis is None:
        return None
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis):
        return tuple(int(a) for a in axis)
    raise ValueError(f"axis must be an int, a list of ints or None, got {axis!r}")


@register
class L2Normalize(keras.layers.Layer):
    """Scale ``axis`` (an int, a list of ints, or None for all axes) to unit L2 norm."""

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = _axis(axis)

    def call(self, x):
        # x / sqrt(max(sum x^2, 1e-12)): the epsilon of TensorFlow's l2_normalize, which 2019 used
        squared = ops.sum(ops.square(x), axis=self.axis, keepdims=True)
        return x * ops.rsqrt(ops.maximum(squared, ops.cast(1e-12, x.dtype)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis}


@register
class ActivityRegularizer(keras.layers.Layer):
    """Identity layer that adds ``regularizer(x)`` to the model's losses (used on the attention map).

    It never casts: under ``mixed_float16`` autocasting turned the float32 attention map back to float16, whose
    sampled attention's gradient overflows (NaN gradients; ``fit`` then skipped every step)."""

    def __init__(self, regularizer, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if isinstance(regularizer, dict):
            regularizer = keras.regularizers.deserialize(regularizer)
        if not callable(regularizer):
            raise TypeError(f"regularizer must be callable, got {regularizer!r}")
        self.regularizer = regularizer

    def call(self, x):
        self.add_loss(self.regularizer(x))
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, dtype=x.dtype)  # its input's dtype, not the policy's compute dtype

    def get_config(self):
        return {**super().get_config(), "regularizer": keras.regularizers.serialize(self.regularizer)}


@register
class TotalReshape(keras.layers.Layer):
    """Reshape including the batch axis (one entry may be -1), e.g. ``(B, n, ...)`` to ``(B * n, ...)``."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        try:
            self.target_shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
        if sum(s == -1 for s in self.target_shape) > 1 or any(s < -1 or s == 0 for s in self.target_shape):
            raise ValueError(f"shape must hold positive sizes and at most one -1, got {self.target_shape}")

    def call(self, x):
        return ops.reshape(x, self.target_shape)

    def compute_output_shape(self, input_shape):
        return tuple(None if s == -1 else s for s in self.target_shape)

    def get_config(self):
        return {**super().get_config(), "shape": list(self.target_shape)}


__all__ = [
    "SampleSoftmax",
    "L2Normalize",
    "ActivityRegularizer",
    "TotalReshape",
    "ResizeImages",
    "ImageLinearTransform",
    "ImagePan",
]
