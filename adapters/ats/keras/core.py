"""Keras layers of attention sampling (2019 names), on Keras 3's TensorFlow, torch and JAX backends.

``attention_sampling``, ``SamplePatches``, ``Expectation``, ``PatchesToBatch``
and ``BatchToPatches``. Channels-last inputs with 1, 2 or 3 spatial
dimensions (signals, images, volumes). ``x_low`` ``(B, *low, C)`` is the cheap
view the attention network reads, ``x_high`` ``(B, *high, C)`` the
full-resolution input patches come from, and the attention map is
``(B, *grid)`` (``SampleSoftmax(squeeze_channels=True)``).

Everything that Keras has is written in ``keras.ops``; sampling, patch
offsets, the patch gather (with its scatter gradient) and the estimator go to
the running backend's op module (:mod:`ats.keras.backends`): atskern's kernels
through :mod:`ats.ops` on TensorFlow (:mod:`ats.tf.xla` inside
``jit_compile=True``), :mod:`ats.torch.functional` on torch (CPU or CUDA),
:mod:`ats.jax` on JAX.
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras")
# The backend is checked before keras is imported, hence the late imports.
# ruff: noqa: E402

from fractions import Fraction

import keras
import numpy as np
from keras import ops

from atskern import _validation

from .. import _errors
from .._keras import register
from .._xla_common import positive_int
from .._layer_args import MODES  # noqa: F401 (public here since 2019's layout)
from .._layer_args import check_flag, check_patch_size_arg, check_sampling_args, config_number
from . import _keys
from .backends import ops as backend_ops
from .layers import ActivityRegularizer



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


def _margin(receptive_field, low):
    """``receptive_field / 2 / low[d]`` per dim as exact fractions, or the pair form for a dynamic ``low``."""
    if isinstance(low, tuple) and all(isinstance(v, int) for v in low):
        for v in low:
            if receptive_field >= v:
                raise ValueError(f"receptive_field={receptive_field} must be smaller than x_low's spatial sizes {low}")
        return [Fraction(receptive_field, 2 * v) if isinstance(receptive_field, int) else
                _validation.simplest_fraction(receptive_field) / (2 * v) for v in low]
    return (receptive_field, low)


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
    seed : None or int in ``[0, 2**64)``
        With a seed the draws are a deterministic function of the seed, the
        attention map (its float32 values, the whole batch) and the process
        rank: the key is ``fingerprint(attention) xor salted_seed(seed)``
        (:mod:`ats.keras._keys`), so the same seed and map give the same
        patches on every backend (TensorFlow in and out of XLA, torch, JAX),
        need no state, and survive ``model.save``/``load_model``; training
        still sees new draws as the weights change. Without a seed every call
        draws afresh, from a ``keras.random.SeedGenerator`` (also inside
        ``jax.jit``-compiled and ``jit_compile=True`` steps; ``keras.utils.set_random_seed``
        makes a run repeat). Rank 0 of a multi-process job draws as a single
        process; other ranks draw their own patches.
    fill : number
        Value of patch pixels that fall outside ``x_high``.

    Mixed precision: this layer and :class:`Expectation` cast ``x_high`` and the features to the policy's compute
    dtype but not the attention (``autocast=False``, then casts of their own). The sampled attention stays in the
    attention map's dtype, because its gradient,
    ``<g, f_k> / (n a_k)`` and more, exceeds float16's largest value (65504) on maps of 65536 cells and more,
    and then every logit's gradient is NaN. Under ``mixed_float16``, give the attention network's last layer
    ``dtype="float32"``, as Keras advises for softmax outputs.
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
        kwargs.setdefault("autocast", False)  # see "Mixed precision" in the docstring
        super().__init__(**kwargs)
        self.n_patches, self.receptive_field, self.fill = check_sampling_args(n_patches, mode, receptive_field, fill)
        self.patch_size = check_patch_size_arg(patch_size)
        self.replace = check_flag(replace, "replace")
        self.use_logits = check_flag(use_logits, "use_logits")
        self.mode = mode
        self.seed = _keys.check_seed(seed)
        # fresh keys per call, threaded by Keras through jitted steps (only needed when sampling unseeded)
        self.seed_generator = keras.random.SeedGenerator() if self.seed is None and mode != "topk" else None
        self.supports_jit = True

    def _size(self, dims: int) -> tuple[int, ...]:
        return _validation.check_patch_size(self.patch_size, dims, "patch_size")

    def build(self, input_shape):
        if keras.config.image_data_format() != "channels_last":
            raise ValueError("SamplePatches supports channels_last data only (keras.config.image_data_format())")
        if len(input_shape) != 3:
            raise ValueError(f"SamplePatches is called on [x_low, x_high, attention], got {len(input_shape)} inputs")
        x_low, x_high, attention = (tuple(s) for s in input_shape)
        dims = _check_ranks(x_low, x_high, attention)
        size = self._size(dims)
        _check_patch_fits(size, x_high[1:-1])
        grid = attention[1:]
        without_replacement = not self.replace or self.mode != "sample"
        if all(g is not None for g in grid) and without_replacement:
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

    def sampling_key(self, attention):
        """The Philox key ``[k0, k1]`` (uint32 words, a backend tensor) for a draw from ``attention`` (the layer's
        third input, logits with ``use_logits``): ``atskern.sample(weights, n, seed=k0 + 2**32 k1)`` draws what the
        layer draws with it (``weights`` the attention, or the softmax of the logits). With ``seed=None`` each call
        takes the seed generator's next state (a new key)."""
        be = backend_ops()
        if self.seed is not None:
            attention = keras.ops.convert_to_tensor(attention)  # a NumPy map too, as the layer's call takes
            return be.xor(be.fingerprint(attention), _keys.seed_words(self.seed))
        if self.seed_generator is None:
            raise ValueError(
                f"{self.name}: unseeded sampling needs the seed generator that a SamplePatches built with seed=None "
                "and mode 'sample' or 'auto' creates, and this one was built with mode='topk' or an int seed: build "
                "a new layer to sample unseeded, or set an int seed")
        words = be.key_words(self.seed_generator.next())
        salt = _keys.rank_salt()
        return be.xor(words, salt) if salt != (0, 0) else words

    def call(self, inputs, training=None):
        x_low, x_high, attention = inputs
        dims = _check_ranks(x_low.shape, x_high.shape, attention.shape)
        size = self._size(dims)
        _check_patch_fits(size, tuple(x_high.shape[1:-1]))  # again: build cannot where the model left sizes to the data
        be = backend_ops()
        x_high = _compute_cast(be.check_inputs(x_low, x_high, attention, size), self.compute_dtype)
        logits = attention
        if self.use_logits:
            flat = ops.reshape(attention, (ops.shape(attention)[0], -1))
            attention = ops.reshape(ops.softmax(flat, axis=-1), ops.shape(attention))
        deterministic = self._deterministic(training)
        # the key of the map as given (the logits with use_logits: each backend's softmax rounds its own way)
        key = None if deterministic else self.sampling_key(logits)
        try:
            indices, sampled = be.sample(attention, self.n_patches, replace=self.replace, key=key,
                                         deterministic=deterministic)
        except ValueError as error:  # the backends' functional names, in the layer's terms
            raise _errors.sampling_error(ValueError(str(error).replace("n_samples", "n_patches"))) from None
        # the margin receptive_field / 2 / low_size, as an exact fraction (ties in the offsets round exactly)
        margin = _margin(self.receptive_field, be.spatial_shape(x_low))
        offsets = be.patch_offsets(indices, be.grid_shape(attention), be.spatial_shape(x_high), size, margin=margin)
        patches = be.extract_patches(x_high, offsets, size, fill=self.fill)
        if self.use_logits:  # 2019 returned the logits at the samples, not probabilities
            flat_index = _ravel(indices, ops.shape(logits)[1:])
            sampled = ops.take_along_axis(ops.reshape(logits, (ops.shape(logits)[0], -1)), flat_index, axis=1)
        return [patches, sampled]

    def compute_output_shape(self, input_shape):
        """``[(B, n_patches, *patch_size, C), (B, n_patches)]`` from the shapes of ``[x_low, x_high, attention]``."""
        low, high, attention = (tuple(shape) for shape in input_shape)
        dims = _check_ranks(low, high, attention)
        return [(high[0], self.n_patches, *self._size(dims), high[-1]), (high[0], self.n_patches)]

    def compute_output_spec(self, inputs, training=None):
        x_low, x_high, attention = inputs
        patches, sampled = self.compute_output_shape([x_low.shape, x_high.shape, attention.shape])
        patches_dtype = self.compute_dtype if "float" in str(x_high.dtype) else x_high.dtype  # as call casts
        return [keras.KerasTensor(patches, dtype=patches_dtype), keras.KerasTensor(sampled, dtype=attention.dtype)]

    def get_config(self):
        return {
            **super().get_config(),
            "n_patches": self.n_patches,
            "patch_size": self.patch_size if isinstance(self.patch_size, int) else list(self.patch_size),
            "receptive_field": config_number(self.receptive_field),
            "replace": self.replace,
            "use_logits": self.use_logits,
            "mode": self.mode,
            "seed": self.seed,
            "fill": self.fill,
        }


def _check_patch_fits(size, high):
    """A ValueError where every spatial size of ``x_high`` is known and ``size`` is larger than one of them."""
    if all(isinstance(h, int) for h in high) and any(p > h for p, h in zip(size, high)):
        raise ValueError(f"patch_size {size} is larger than x_high's spatial shape {high}")


def _compute_cast(x, dtype):
    """Floating ``x`` in the layer's compute dtype: the patches and features keep the policy's dtype (float16 under
    ``mixed_float16``), as autocasting gave them; only the attention is left as given."""
    if "float" in str(x.dtype) and keras.backend.standardize_dtype(x.dtype) != dtype:
        return ops.cast(x, dtype)
    return x


def _ravel(indices, grid):
    """Row-major flat indices ``(B, n)`` of grid coordinates ``(B, n, D)``."""
    flat = indices[..., 0]
    for d in range(1, len(grid)):
        flat = flat * grid[d] + indices[..., d]
    return flat


@register
class Expectation(keras.layers.Layer):
    """The ATS estimate of the expected features from sampled ones, with unbiased gradients.

    Called on ``[features, sampled_attention]`` (``(B, n, *F)`` and ``(B, n)``);
    returns ``(B, *F)``. ``replace`` must match :class:`SamplePatches`. The
    gradients are exactly ``atskern.expectation_grad``'s on every backend.
    """

    def __init__(self, replace=False, **kwargs):
        kwargs.setdefault("autocast", False)  # see "Mixed precision" in SamplePatches' docstring
        super().__init__(**kwargs)
        self.replace = check_flag(replace, "replace")
        self.supports_jit = True

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"Expectation is called on [features, sampled_attention], got {len(input_shape)} inputs")
        features, probs = (tuple(s) for s in input_shape)
        if len(probs) != 2 or len(features) < 2:
            raise ValueError(f"Expectation needs features (B, n, ...) and sampled_attention (B, n), got {features} and {probs}")

    def call(self, inputs):
        features, sampled = inputs
        return backend_ops().expectation(_compute_cast(features, self.compute_dtype), sampled, replace=self.replace)

    def compute_output_shape(self, input_shape):
        features = tuple(input_shape[0])
        return (features[0],) + features[2:]

    def get_config(self):
        return {**super().get_config(), "replace": self.replace}


@register
class PatchesToBatch(keras.layers.Layer):
    """``(B, n, *rest)`` to ``(B * n, *rest)``: lets the feature network see each patch as a sample."""

    def call(self, x):
        return ops.reshape(x, (-1, *ops.shape(x)[2:]))

    def compute_output_shape(self, input_shape):
        batch, n = input_shape[:2]
        return (None if batch is None or n is None else batch * n,) + tuple(input_shape[2:])


@register
class BatchToPatches(keras.layers.Layer):
    """``(B * n, *rest)`` back to ``(B, n, *rest)``."""

    def __init__(self, n_patches, **kwargs):
        super().__init__(**kwargs)
        self.n_patches = positive_int(n_patches, "n_patches")  # 2.5 was 2 once

    def call(self, x):
        return ops.reshape(x, (-1, self.n_patches, *ops.shape(x)[1:]))

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
    docs said). ``deterministic=True`` is ``mode="topk"``; ``mode="auto"``
    samples in training and takes the top-k in inference; ``seed`` makes
    sampling reproducible (see :class:`SamplePatches`).
    """
    if check_flag(deterministic, "deterministic"):
        mode = "topk"

    def apply(inputs):
        x_low, x_high = inputs
        if patch_size is None:
            from ..core._patch_size import infer_patch_size

            size = infer_patch_size(feature, x_low)
        else:
            size = patch_size
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
