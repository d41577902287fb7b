"""Keras layers of the 2019 library: ``SampleSoftmax``, ``L2Normalize``, ``ActivityRegularizer``, ``TotalReshape``,
and the image layers ``ResizeImages``, ``ImageLinearTransform``, ``ImagePan`` (from :mod:`ats.utils.image_layers`)."""

from __future__ import annotations

from .._keras import require_tensorflow_backend

require_tensorflow_backend("ats.utils.layers")
# The backend is checked before keras is imported, hence the late imports.
# ruff: noqa: E402

import keras
import tensorflow as tf

from .._keras import register
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
    """

    def __init__(self, squeeze_channels=False, smooth=0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= float(smooth) < 1:
            raise ValueError(f"smooth must be in [0, 1), got {smooth}")
        self.squeeze_channels = bool(squeeze_channels)
        self.smooth = float(smooth)

    def build(self, input_shape):
        if self.squeeze_channels:
            channels = input_shape[_channels_axis()]
            if channels is not None and channels != 1:
                raise ValueError(
                    f"SampleSoftmax(squeeze_channels=True) needs 1 channel, got input shape {tuple(input_shape)}"
                )

    def call(self, x):
        shape = tf.shape(x)
        p = tf.nn.softmax(tf.reshape(x, (shape[0], -1)), axis=-1)
        if self.smooth > 0:
            p = p * (1 - self.smooth) + self.smooth / tf.cast(tf.shape(p)[1], p.dtype)
        p = tf.reshape(p, shape)
        if self.squeeze_channels:
            p = tf.squeeze(p, axis=_channels_axis())
        return p

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        if self.squeeze_channels:
            shape.pop(_channels_axis())
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "squeeze_channels": self.squeeze_channels, "smooth": self.smooth}


@register
class L2Normalize(keras.layers.Layer):
    """Scale ``axis`` to unit L2 norm."""

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, x):
        return tf.math.l2_normalize(x, axis=self.axis)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@register
class ActivityRegularizer(keras.layers.Layer):
    """Identity layer that adds ``regularizer(x)`` to the model's losses (used on the attention map)."""

    def __init__(self, regularizer, **kwargs):
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

    def get_config(self):
        return {**super().get_config(), "regularizer": keras.regularizers.serialize(self.regularizer)}


@register
class TotalReshape(keras.layers.Layer):
    """Reshape including the batch axis (one entry may be -1), e.g. ``(B, n, ...)`` to ``(B * n, ...)``."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.target_shape = tuple(int(s) for s in shape)
        if sum(s == -1 for s in self.target_shape) > 1:
            raise ValueError(f"TotalReshape's shape may hold at most one -1, got {self.target_shape}")

    def call(self, x):
        return tf.reshape(x, self.target_shape)

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
