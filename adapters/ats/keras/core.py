"""Keras layers of attention sampling (2019 names): ``attention_sampling``, ``SamplePatches``, ``Expectation``.

Channels-last inputs with 1, 2 or 3 spatial dimensions (signals, images,
volumes). ``x_low`` ``(B, *low, C)`` is the cheap view the attention network
reads, ``x_high`` ``(B, *high, C)`` the full-resolution input patches come
from, and the attention map is ``(B, *grid)`` (``SampleSoftmax(squeeze_channels=True)``).
"""

from __future__ import annotations

from .._keras import require_tensorflow_backend

require_tensorflow_backend("ats.core")
# The backend is checked before keras is imported, hence the late imports.
# ruff: noqa: E402

import numbers

import keras
import numpy as np
import tensorflow as tf

from .. import ops
from .._keras import register
from ..utils.layers import ActivityRegularizer
from ._patch_size import infer_patch_size


MODES = ("sample", "topk", "auto")


def _seed_bits(seed: int) -> tf.Tensor:
    return tf.constant(np.array(seed, dtype=np.uint64).view(np.int64))


def _input_seed(seed: int, attention) -> tf.Tensor:
    """``seed`` mixed with a fingerprint of the attention map: same seed and map, same draws; no state."""
    digest = tf.fingerprint(tf.reshape(attention, (1, -1)))[0]
    return tf.bitwise.bitwise_xor(tf.bitcast(digest, tf.int64), _seed_bits(seed))


def _check_ranks(x_low, x_high, attention):
    """Spatial dimensions D from the three input shapes, or a ValueError naming them."""
    rank = len(x_high)
    if rank not in (3, 4, 5):
        raise ValueError(
            "x_high must be (batch, *spatial, channels) with 1 to 3 spatial dimensions (rank 3 to 5), "
            f"got shape {tuple(x_high)}"
        )
    if len(x_low) != rank:
        raise ValueError(f"x_low must have x_high's rank {rank}, got shapes {tuple(x_low)} and {tuple(x_high)}")
    if len(attention) != rank - 1:
        raise ValueError(
            f"attention must be (batch, *grid) with rank {rank - 1} (x_high's rank without channels; "
            f"use SampleSoftmax(squeeze_channels=True)), got shape {tuple(attention)}"
        )
    return rank - 2


@register
class SamplePatches(keras.layers.Layer):
    """Sample positions from an attention map and extract ``x_high`` patches around them.

    Called on ``[x_low, x_high, attention]``; returns ``[patches, sampled_attention]``
    with ``patches`` ``(B, n_patches, *patch_size, C)`` and ``sampled_attention``
    ``(B, n_patches)`` (differentiable with respect to the attention).

    Arguments
    ---------
    n_patches : int
    patch_size : int or tuple, one entry per spatial dimension
    receptive_field : int
        The attention network's receptive field in ``x_low`` pixels (0 for
        ``padding="same"``): maps attention cells to ``x_high`` positions.
    replace : bool
        Sample with replacement. Pass the same value to :class:`Expectation`.
    use_logits : bool
        The attention is given as unnormalized log-probabilities; positions
        are drawn from their softmax and ``sampled_attention`` holds the
        logits at the samples, as 2019's code returned them (so it is not a
        probability: pass ``SampleSoftmax`` output instead to feed
        :class:`Expectation`).
    mode : ``"sample"``, ``"topk"`` or ``"auto"``
        ``"topk"`` takes the most attended positions (deterministic);
        ``"auto"`` samples in training and takes the top-k in inference.
    seed : None or int
        With a seed the draws are a deterministic function of the seed and the
        attention map (reproducible, stateless, safe under ``tf.distribute``);
        without, every call draws afresh.
    fill : number
        Value of patch pixels that fall outside ``x_high``.
    """

    def __init__(
        self,
        n_patches,
        patch_size,
        receptive_field=0,
        replace=False,
        use_logits=False,
        mode="sample",
        seed=None,
        fill=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(n_patches, bool) or not isinstance(n_patches, numbers.Integral) or n_patches < 1:
            raise ValueError(f"n_patches must be a positive integer, got {n_patches!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if seed is not None and not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**64):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
        if receptive_field < 0:
            raise ValueError(f"receptive_field must be >= 0, got {receptive_field}")
        self.n_patches = int(n_patches)
        self.patch_size = patch_size if isinstance(patch_size, numbers.Integral) else tuple(patch_size)
        self.receptive_field = receptive_field
        self.replace = bool(replace)
        self.use_logits = bool(use_logits)
        self.mode = mode
        self.seed = None if seed is None else int(seed)
        self.fill = fill
        # The sampling and gather kernels run through tf.numpy_function: no XLA.
        self.supports_jit = False

    def _size(self, dims: int) -> tuple[int, ...]:
        return ops._size_tuple(self.patch_size, dims, "patch_size")

    def build(self, input_shape):
        if keras.config.image_data_format() != "channels_last":
            raise ValueError("SamplePatches supports channels_last data only (keras.config.image_data_format())")
        if len(input_shape) != 3:
            raise ValueError(f"SamplePatches is called on [x_low, x_high, attention], got {len(input_shape)} inputs")
        x_low, x_high, attention = (tuple(s) for s in input_shape)
        dims = _check_ranks(x_low, x_high, attention)
        size = self._size(dims)
        high = x_high[1:-1]
        if all(h is not None for h in high) and any(p > h for p, h in zip(size, high)):
            raise ValueError(f"patch_size {size} is larger than x_high's spatial shape {high}")
        grid = attention[1:]
        mode_without_replacement = not self.replace or self.mode != "sample"
        if all(g is not None for g in grid) and mode_without_replacement:
            positions = int(np.prod(grid))
            if self.n_patches > positions:
                raise ValueError(
                    f"n_patches={self.n_patches} is larger than the {positions} positions of the attention map "
                    f"{grid}; sampling without replacement (or top-k) cannot draw more (use replace=True)"
                )

    def _deterministic(self, training) -> bool:
        if self.mode == "auto":
            return not training
        return self.mode == "topk"

    def _check_patch_fits(self, x_high, size):
        spatial = tf.shape(x_high)[1:-1]
        check = tf.debugging.assert_less_equal(
            tf.constant(size, tf.int32),
            spatial,
            message=f"SamplePatches: patch_size {size} is larger than the spatial shape of x_high",
        )
        with tf.control_dependencies([check]):
            return tf.identity(x_high)

    def call(self, inputs, training=None):
        x_low, x_high, attention = inputs
        dims = _check_ranks(x_low.shape, x_high.shape, attention.shape)
        size = self._size(dims)
        ops.check_same_batch({"x_low": x_low, "x_high": x_high, "attention": attention})
        if not x_high.shape[1:-1].is_fully_defined():
            x_high = self._check_patch_fits(x_high, size)
        logits = attention
        if self.use_logits:
            flat = tf.reshape(attention, (tf.shape(attention)[0], -1))
            attention = tf.reshape(tf.nn.softmax(flat, axis=-1), tf.shape(attention))
        deterministic = self._deterministic(training)
        seed = None if self.seed is None or deterministic else _input_seed(self.seed, attention)
        indices, sampled = ops.sample(
            attention, self.n_patches, replace=self.replace, seed=seed, deterministic=deterministic
        )
        # the margin receptive_field / 2 / low_size, as an exact fraction (ties in the offsets round exactly)
        low = x_low.shape[1:-1]
        low = tuple(low) if low.is_fully_defined() else tf.shape(x_low)[1:-1]
        offsets = ops.patch_offsets(
            indices, tf.shape(attention)[1:], tf.shape(x_high)[1:-1], size, margin=(self.receptive_field, low)
        )
        patches = ops.extract_patches(x_high, offsets, size, fill=self.fill)
        if self.use_logits:  # 2019 returned the logits at the samples, not probabilities
            sampled = tf.gather_nd(logits, indices, batch_dims=1)
        return [patches, sampled]

    def compute_output_spec(self, inputs, training=None):
        x_low, x_high, attention = inputs
        dims = _check_ranks(x_low.shape, x_high.shape, attention.shape)
        batch = x_high.shape[0]
        patches = keras.KerasTensor((batch, self.n_patches, *self._size(dims), x_high.shape[-1]), dtype=x_high.dtype)
        sampled = keras.KerasTensor((batch, self.n_patches), dtype=attention.dtype)
        return [patches, sampled]

    def get_config(self):
        return {
            **super().get_config(),
            "n_patches": self.n_patches,
            "patch_size": self.patch_size if isinstance(self.patch_size, int) else list(self.patch_size),
            "receptive_field": self.receptive_field,
            "replace": self.replace,
            "use_logits": self.use_logits,
            "mode": self.mode,
            "seed": self.seed,
            "fill": self.fill,
        }


@register
class Expectation(keras.layers.Layer):
    """The ATS estimate of the expected features from sampled ones, with unbiased gradients.

    Called on ``[features, sampled_attention]`` (``(B, n, *F)`` and ``(B, n)``);
    returns ``(B, *F)``. ``replace`` must match :class:`SamplePatches`.
    """

    def __init__(self, replace=False, **kwargs):
        super().__init__(**kwargs)
        self.replace = bool(replace)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"Expectation is called on [features, sampled_attention], got {len(input_shape)} inputs")
        features, probs = (tuple(s) for s in input_shape)
        if len(probs) != 2 or len(features) < 2:
            raise ValueError(f"Expectation needs features (B, n, ...) and sampled_attention (B, n), got {features} and {probs}")

    def call(self, inputs):
        features, sampled = inputs
        return ops.expectation(features, sampled, replace=self.replace)

    def compute_output_shape(self, input_shape):
        features = tuple(input_shape[0])
        return (features[0],) + features[2:]

    def get_config(self):
        return {**super().get_config(), "replace": self.replace}


@register
class PatchesToBatch(keras.layers.Layer):
    """``(B, n, *rest)`` to ``(B * n, *rest)``: lets the feature network see each patch as a sample."""

    def call(self, x):
        return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))

    def compute_output_shape(self, input_shape):
        batch, n = input_shape[:2]
        return (None if batch is None or n is None else batch * n,) + tuple(input_shape[2:])


@register
class BatchToPatches(keras.layers.Layer):
    """``(B * n, *rest)`` back to ``(B, n, *rest)``."""

    def __init__(self, n_patches, **kwargs):
        super().__init__(**kwargs)
        self.n_patches = int(n_patches)

    def call(self, x):
        return tf.reshape(x, tf.concat([[-1, self.n_patches], tf.shape(x)[1:]], 0))

    def compute_output_shape(self, input_shape):
        return (None, self.n_patches) + tuple(input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "n_patches": self.n_patches}


def attention_sampling(
    attention,
    feature,
    patch_size=None,
    n_patches=10,
    replace=False,
    attention_regularizer=None,
    receptive_field=0,
    *,
    mode="sample",
    deterministic=False,
    seed=None,
):
    """Wire an attention network and a feature network into an attention-sampling pipeline.

    Returns a callable ``([x_low, x_high]) -> [features, attention, patches]``:
    ``attention(x_low)`` gives the ``(B, *grid)`` attention map (regularized by
    ``attention_regularizer`` if given), :class:`SamplePatches` draws
    ``n_patches`` patches of ``patch_size`` from ``x_high``, ``feature`` runs on
    every patch (as a batch of ``B * n_patches``) and :class:`Expectation`
    averages the patch features into ``(B, *F)``.

    ``patch_size=None`` uses the feature network's input shape (as 2019's
    code did) where it is known, else ``x_low``'s spatial shape (as 2019's
    docs said); see :func:`ats.core._patch_size.infer_patch_size`.
    ``deterministic=True`` is ``mode="topk"``; ``mode="auto"`` samples in
    training and takes the top-k in inference; ``seed`` makes sampling
    reproducible (see :class:`SamplePatches`).
    """
    if deterministic:
        mode = "topk"

    def apply(inputs):
        x_low, x_high = inputs
        size = patch_size if patch_size is not None else infer_patch_size(feature, x_low)
        att = attention(x_low)
        if attention_regularizer is not None:
            att = ActivityRegularizer(attention_regularizer)(att)
        patches, sampled = SamplePatches(
            n_patches, size, receptive_field=receptive_field, replace=replace, mode=mode, seed=seed
        )([x_low, x_high, att])
        per_patch = feature(PatchesToBatch()(patches))
        features = BatchToPatches(n_patches)(per_patch)
        features = Expectation(replace=replace)([features, sampled])
        return [features, att, patches]

    return apply


__all__ = ["attention_sampling", "SamplePatches", "Expectation", "PatchesToBatch", "BatchToPatches"]


# The 2019 submodules (ats.core.ats_layer, builder, expectation, sampling),
# importable as attributes after ``import ats.core`` as in 2019.
from . import ats_layer, builder, expectation, sampling  # noqa: E402,F401
