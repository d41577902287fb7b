"""``FromTensors``: a :class:`MultiResolutionBatch` over tensors the caller already has, one per level.

A sample ``s`` of a sample space of size ``G`` that covers ``prev`` pixels of
level ``from`` starting at ``offset`` maps to level ``to`` (ratio
``r = shape_to / shape_from``) as the patch of size ``P`` centred on
``c = offset * r + (s + 0.5) * prev * r / G``; it starts at ``rint(c - P / 2)``
(half to even), as in 2019. This is the same mapping as
:func:`ats.ops.patch_offsets` with ``offset = receptive_field / 2`` and
``prev = low_size - receptive_field``. It is computed exactly in integers
(offsets are taken to the nearest half pixel), so ties round the same way
on every machine, where 2019's float32 arithmetic could land beside them.
"""

from __future__ import annotations

from .._keras import require_tensorflow_backend

require_tensorflow_backend("ats.data.from_tensors")
# ruff: noqa: E402

import keras
import tensorflow as tf

from .. import ops
from .._keras import register
from .._symbolic import is_symbolic, static_ints
from ..ops.extract_patches import static_size
from .base import MultiResolutionBatch

__all__ = ["FromTensors", "level_offsets", "LevelPatches"]


def _int64(value):
    if isinstance(value, (list, tuple)) and any(isinstance(v, (tf.Tensor, tf.Variable)) for v in value):
        value = tf.stack([tf.cast(v, tf.int64) for v in value])
    return tf.cast(tf.convert_to_tensor(value), tf.int64)


def _round_half_even(numerator, denominator):
    """``rint(numerator / denominator)`` exactly, for int64 tensors with a positive denominator."""
    quotient = tf.math.floordiv(numerator, denominator)
    twice_rest = 2 * (numerator - quotient * denominator)
    up = (twice_rest > denominator) | ((twice_rest == denominator) & (tf.math.floormod(quotient, 2) == 1))
    return quotient + tf.cast(up, tf.int64)


def level_offsets(samples, offsets, sample_space, previous_patch_size, patch_size, shape_from, shape_to):
    """First pixel (int32 ``(B, N, D)``) in level ``to`` of the patch around each sample (see the module docstring).

    ``sample_space``, ``previous_patch_size``, ``patch_size``, ``shape_from``
    and ``shape_to`` are ``(D,)`` integers (lists or tensors); ``samples``
    are integer-valued, ``offsets`` are taken to the nearest half pixel.
    """
    s = tf.cast(tf.round(tf.cast(samples, tf.float64)), tf.int64)
    twice_offset = tf.cast(tf.round(2 * tf.cast(offsets, tf.float64)), tf.int64)
    space, prev, size = _int64(sample_space), _int64(previous_patch_size), _int64(patch_size)
    source, target = _int64(shape_from), _int64(shape_to)
    # c - P/2 = [2o * to * G + (2s + 1) * prev * to - P * from * G] / (2 * from * G)
    numerator = twice_offset * target * space + (2 * s + 1) * prev * target - size * source * space
    denominator = 2 * source * space
    return tf.cast(_round_half_even(numerator, denominator), tf.int32)


class FromTensors(MultiResolutionBatch):
    """Serve patches of the levels ``xs`` (lowest resolution first) and return ``y`` as the targets.

    ``xs`` are channels-last tensors ``(B, *spatial_l, C)``: TensorFlow
    tensors, or symbolic Keras tensors (``keras.Input`` and what layers make
    of them) while building a functional model; then :meth:`patches` adds a
    :class:`LevelPatches` layer and needs static ``sample_space``,
    ``previous_patch_size`` and ``patch_size``. ``inputs()`` is empty: the
    caller owns the tensors (and lists them as model inputs).
    """

    def __init__(self, xs, y):
        xs = list(xs)
        if not xs:
            raise ValueError("xs must hold at least one level (lowest resolution first)")
        self._xs = xs
        self._y = y

    def targets(self):
        return self._y

    def inputs(self):
        return []

    def data(self, level):
        return self._xs[level]

    def _shape(self, level):
        x = self._xs[level]
        static = tuple(x.shape[1:-1])
        if all(s is not None for s in static):
            return list(static)
        return tf.shape(x)[1:-1]

    def patches(self, samples, offsets, sample_space, previous_patch_size, patch_size, fromlevel, tolevel):
        x_from, x_to = self._xs[fromlevel], self._xs[tolevel]
        if is_symbolic(samples, offsets, x_from, x_to):
            layer = LevelPatches(
                static_ints(static_size(sample_space, "sample_space"), "sample_space"),
                static_ints(static_size(previous_patch_size, "previous_patch_size"), "previous_patch_size"),
                static_ints(static_size(patch_size, "patch_size"), "patch_size"),
            )
            return tuple(layer([samples, offsets, x_from, x_to]))
        size = static_size(patch_size, "patch_size")
        starts = level_offsets(
            samples, offsets, sample_space, previous_patch_size, size, self._shape(fromlevel), self._shape(tolevel)
        )
        return ops.extract_patches(x_to, starts, size), starts


@register
class LevelPatches(keras.layers.Layer):
    """:meth:`FromTensors.patches` as a layer: ``[samples, offsets, x_from, x_to] -> [patches, offsets]``."""

    def __init__(self, sample_space, previous_patch_size, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.sample_space = [int(s) for s in sample_space]
        self.previous_patch_size = [int(s) for s in previous_patch_size]
        self.patch_size = [int(s) for s in patch_size]
        self.supports_jit = False

    def call(self, inputs):
        samples, offsets, x_from, x_to = inputs
        patches, starts = FromTensors([x_from, x_to], None).patches(
            samples, offsets, self.sample_space, self.previous_patch_size, self.patch_size, 0, 1
        )
        return [patches, starts]

    def compute_output_spec(self, inputs):
        samples, _, _, x_to = inputs
        batch, n = samples.shape[0], samples.shape[1]
        return [
            keras.KerasTensor((batch, n, *self.patch_size, x_to.shape[-1]), dtype=x_to.dtype),
            keras.KerasTensor((batch, n, len(self.patch_size)), dtype="int32"),
        ]

    def get_config(self):
        return {**super().get_config(), "sample_space": self.sample_space,
                "previous_patch_size": self.previous_patch_size, "patch_size": self.patch_size}
