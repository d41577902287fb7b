"""Multi-resolution data (2019 names): ``MultiResolutionBatch``, ``FromTensors``, ``level_offsets``, ``LevelPatches``.

The data have ``n`` spatial dimensions and are available at several
resolutions, the **levels** (0 the lowest); every level shows the same
region, so a position in one level maps to a region of another by the ratio
of their shapes.

A sample ``s`` of a sample space of size ``G`` that covers ``prev`` pixels of
level ``from`` starting at ``offset`` maps to level ``to`` (ratio
``r = shape_to / shape_from``) as the patch of size ``P`` centred on
``c = offset * r + (s + 0.5) * prev * r / G``; it starts at ``rint(c - P / 2)``
(half to even), as in 2019. This is the same mapping as
:func:`atskern.patch_offsets` with ``offset = receptive_field / 2`` and
``prev = low_size - receptive_field``. It is computed exactly in integers
(offsets are taken to the nearest half pixel), so ties round the same way
on every machine, where 2019's float32 arithmetic could land beside them.

Written in ``keras.ops`` (the patch gather goes to the backend's op module,
:mod:`ats.keras.backends`),
so it runs on Keras 3's TensorFlow, torch and JAX backends. The 2019 paths
:mod:`ats.data`, :mod:`ats.data.base` and :mod:`ats.data.from_tensors`
re-export these names.
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.data")
# ruff: noqa: E402

import math
import numbers

import keras
import numpy as np
from keras import ops

from .._keras import register
from .._symbolic import is_symbolic, static_ints
from .backends import ops as backend_ops

__all__ = ["MultiResolutionBatch", "FromTensors", "level_offsets", "LevelPatches", "static_size"]


class MultiResolutionBatch:
    """Access to data at several resolutions (levels): the full data, patches, targets, model inputs.

    In 2019 this was a TF1 interface whose ``inputs()`` were the placeholders a
    ``Session.run`` feed dictionary had to fill. In Keras 3 the same role is
    played by ``keras.Input`` tensors: ``inputs()`` returns the ``keras.Input``
    tensors the implementation created and that a ``keras.Model`` built on its
    outputs must list among its inputs (empty when the caller created them, as
    for :class:`FromTensors`). ``data(level)`` and ``patches(...)`` return
    tensors of the same kind as the levels: symbolic Keras tensors while a
    functional model is built, backend tensors when called eagerly.

    Subclasses implement every method; the base raises NotImplementedError.
    """

    def targets(self):
        """The targets of the batch (any structure; returned as given)."""
        raise NotImplementedError(f"{type(self).__name__} must implement targets()")

    def patches(self, samples, offsets, sample_space, previous_patch_size, patch_size, fromlevel, tolevel):
        """Patches of level ``tolevel`` around sampled positions given in level ``fromlevel``.

        Arguments
        ---------
        samples : ``(B, N, D)`` indices into ``sample_space``, one per patch
        offsets : ``(B, N, D)`` position, in ``fromlevel`` pixels, of the region
            the sample space covers (0 for the whole image; nested sampling
            passes the previous patch's start)
        sample_space : ``(D,)`` the shape the samples index (the attention grid)
        previous_patch_size : ``(D,)`` the size, in ``fromlevel`` pixels, of the
            region the sample space covers
        patch_size : ``(D,)`` the size of the patches, in ``tolevel`` pixels
        fromlevel, tolevel : int levels

        Returns
        -------
        patches : ``(B, N, *patch_size, C)``
        offsets : int32 ``(B, N, D)``, each patch's first pixel in ``tolevel``
        """
        raise NotImplementedError(f"{type(self).__name__} must implement patches()")

    def data(self, level):
        """The full data of ``level``."""
        raise NotImplementedError(f"{type(self).__name__} must implement data()")

    def inputs(self):
        """The ``keras.Input`` tensors this object created, which a model built on it must take as inputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement inputs()")


# --- sizes known now -----------------------------------------------------------------------


def _python_ints(value):
    """``value`` as a list of Python ints, or None where some entry is not known now."""
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, np.ndarray):
        return [int(v) for v in value.reshape(-1)] if np.issubdtype(value.dtype, np.integer) else None
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)):
                return None
            out.append(int(v))
        return out
    return None


def static_size(size, name: str = "size"):
    """``size`` (ints, a shape, an array or a tensor whose value is known now) as Python ints, or a ValueError."""
    ints = _python_ints(size)
    if ints is not None:
        return ints[0] if isinstance(size, (numbers.Integral, np.integer)) else ints
    value = backend_ops().static_value(size)
    if value is None or value.dtype == object:
        raise ValueError(
            f"{name} must be known now (Python ints, a shape or a tensor whose value is known when traced), got "
            f"{size!r}; the patches' shape depends on it"
        )
    if not np.issubdtype(value.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    return int(value) if value.ndim == 0 else [int(v) for v in value.reshape(-1)]


# --- exact level-to-level mapping --------------------------------------------------------------


def _int64_available() -> bool:
    """JAX has 64-bit integers only under ``jax_enable_x64``; TensorFlow and torch always."""
    return backend_ops().x64()


def _round_half_even(numerator, denominator):
    """``rint(numerator / denominator)`` exactly, for integer tensors with a positive denominator."""
    quotient = ops.floor_divide(numerator, denominator)
    twice_rest = 2 * (numerator - quotient * denominator)
    odd = ops.equal(ops.mod(quotient, 2), 1)
    up = ops.logical_or(ops.greater(twice_rest, denominator), ops.logical_and(ops.equal(twice_rest, denominator), odd))
    return quotient + ops.cast(up, quotient.dtype)


def _terms(space, prev, size, source, target):
    """Integer coefficients of ``c - P/2 = (2o * alpha + (2s + 1) * beta - gamma) / delta`` per dimension.

    ``alpha = to * G``, ``beta = prev * to``, ``gamma = P * from * G``,
    ``delta = 2 * from * G``; with Python ints they are divided by their
    common divisor (the same rounding, smaller numbers).
    """
    alpha = [t * g for t, g in zip(target, space)]
    beta = [p * t for p, t in zip(prev, target)]
    gamma = [p * f * g for p, f, g in zip(size, source, space)]
    delta = [2 * f * g for f, g in zip(source, space)]
    out = []
    for terms in zip(alpha, beta, gamma, delta):
        common = math.gcd(*terms) or 1
        out.append([t // common for t in terms])
    return [list(column) for column in zip(*out)]


def level_offsets(samples, offsets, sample_space, previous_patch_size, patch_size, shape_from, shape_to):
    """First pixel (int32 ``(B, N, D)``) in level ``to`` of the patch around each sample (see the module docstring).

    ``sample_space``, ``previous_patch_size``, ``patch_size``, ``shape_from``
    and ``shape_to`` are ``(D,)`` integers (lists or tensors); ``samples``
    are integer-valued, ``offsets`` are taken to the nearest half pixel.
    The arithmetic is int64; on JAX without ``jax_enable_x64`` it is int32
    and sizes whose products could overflow it raise a ValueError.
    """
    samples = ops.convert_to_tensor(samples)
    offsets = ops.convert_to_tensor(offsets)
    if len(samples.shape) != 3:
        raise ValueError(f"samples must be (batch, N, D), got shape {tuple(samples.shape)}")
    if tuple(offsets.shape)[-1:] != tuple(samples.shape)[-1:] or len(offsets.shape) != 3:
        raise ValueError(f"offsets must be (batch, N, D) like samples {tuple(samples.shape)}, got {tuple(offsets.shape)}")
    sizes = [_python_ints(v) for v in (sample_space, previous_patch_size, patch_size, shape_from, shape_to)]
    dims = samples.shape[-1]
    names = ("sample_space", "previous_patch_size", "patch_size", "shape_from", "shape_to")
    for name, value in zip(names, sizes):
        if value is not None and dims is not None and len(value) != dims:
            raise ValueError(f"{name} must have one entry per dimension ({dims}), got {value}")
    dtype = "int64" if _int64_available() else "int32"
    if "float" in str(samples.dtype):
        samples = ops.round(samples)
    s = ops.cast(samples, dtype)
    twice_offset = ops.cast(ops.round(2 * ops.cast(offsets, "float32" if dtype == "int32" else "float64")), dtype)
    if all(v is not None for v in sizes):
        space, prev, size, source, target = sizes
        if min(space) < 1 or min(source) < 1:
            raise ValueError(f"sample_space {space} and shape_from {source} must be positive")
        alpha, beta, gamma, delta = _terms(space, prev, size, source, target)
        if dtype == "int32":
            # |2o| <= 4 * from (the covered region lies in or around level `from`), s < G
            bound = max(4 * f * a + (2 * g + 1) * abs(b) + abs(c) + d
                        for f, a, g, b, c, d in zip(source, alpha, space, beta, gamma, delta))
            if bound >= 2**31:
                raise ValueError(
                    f"level_offsets needs 64-bit integers for these sizes (sample_space {space}, shape_from {source}, "
                    f"shape_to {target}); enable them with jax.config.update('jax_enable_x64', True)"
                )
        alpha, beta, gamma, delta = (ops.convert_to_tensor(np.array(v), dtype=dtype) for v in (alpha, beta, gamma, delta))
    else:  # sizes known only when the graph runs (TensorFlow with unknown spatial shapes)
        space, prev, size, source, target = (
            ops.cast(ops.convert_to_tensor(ops.stack(v) if isinstance(v, (list, tuple)) else v), dtype)
            for v in (sample_space, previous_patch_size, patch_size, shape_from, shape_to)
        )
        alpha, beta, gamma, delta = target * space, prev * target, size * source * space, 2 * source * space
    numerator = twice_offset * alpha + (2 * s + 1) * beta - gamma
    return ops.cast(_round_half_even(numerator, delta), "int32")


# --- FromTensors -------------------------------------------------------------------------------


class FromTensors(MultiResolutionBatch):
    """Serve patches of the levels ``xs`` (lowest resolution first) and return ``y`` as the targets.

    ``xs`` are channels-last tensors ``(B, *spatial_l, C)`` of the Keras
    backend (or NumPy arrays), or symbolic Keras tensors (``keras.Input``
    and what layers make of them) while building a functional model; then
    :meth:`patches` adds a :class:`LevelPatches` layer and needs static
    ``sample_space``, ``previous_patch_size`` and ``patch_size``.
    ``inputs()`` is empty: the caller owns the tensors (and lists them as
    model inputs).
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
            return [int(s) for s in static]
        return ops.shape(x)[1:-1]

    def patches(self, samples, offsets, sample_space, previous_patch_size, patch_size, fromlevel, tolevel):
        x_from, x_to = self._xs[fromlevel], self._xs[tolevel]
        dims = len(x_to.shape) - 2

        def per_dim(value, name):  # an int means the same size in every dimension
            value = static_size(value, name)
            return [value] * dims if isinstance(value, int) else value

        if is_symbolic(samples, offsets, x_from, x_to):
            layer = LevelPatches(
                static_ints(per_dim(sample_space, "sample_space"), "sample_space"),
                static_ints(per_dim(previous_patch_size, "previous_patch_size"), "previous_patch_size"),
                static_ints(per_dim(patch_size, "patch_size"), "patch_size"),
            )
            return tuple(layer([samples, offsets, x_from, x_to]))
        size = per_dim(patch_size, "patch_size")
        x_to = ops.convert_to_tensor(x_to)
        starts = level_offsets(
            samples, offsets, sample_space, previous_patch_size, size, self._shape(fromlevel), self._shape(tolevel)
        )
        return backend_ops().extract_patches(x_to, starts, tuple(size)), starts


@register
class LevelPatches(keras.layers.Layer):
    """:meth:`FromTensors.patches` as a layer: ``[samples, offsets, x_from, x_to] -> [patches, offsets]``."""

    def __init__(self, sample_space, previous_patch_size, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.sample_space = [int(s) for s in sample_space]
        self.previous_patch_size = [int(s) for s in previous_patch_size]
        self.patch_size = [int(s) for s in patch_size]
        # TensorFlow's gather runs in tf.numpy_function (no XLA); torch and JAX trace
        self.supports_jit = keras.backend.backend() != "tensorflow"

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
