"""``ATSBuilder`` and ``ATSOutput``: the 2019 builder-pattern interface to an attention-sampling model.

Information is accumulated with chained calls and :meth:`ATSBuilder.get`
wires the model: attention on level 0, sampling, patches of level 1 from
the :class:`ats.data.MultiResolutionBatch`, the feature network on the
patches, and the estimator. Given ``keras.Input`` tensors it builds symbolic
Keras tensors, so ``keras.Model(inputs, result.outputs)`` is the model (the
Keras 3 counterpart of 2019's feed-dict graph); given backend tensors
(TensorFlow, torch or JAX: every Keras 3 backend) it computes the result
eagerly. Its 2019 import path :mod:`ats.core.builder` re-exports it::

    x_low, x_high = keras.Input((15, 15, 3)), keras.Input((100, 100, 3))
    result = (ATSBuilder().from_tensors([x_low, x_high], None)
              .attention(attention).feature(feature)
              .patch_size((15, 15)).n_patches(10)
              .sample_without_replacement().get())
    model = keras.Model([x_low, x_high], result.outputs)
"""

from __future__ import annotations

from .._keras import require_keras

require_keras("ats.keras.builder")
# ruff: noqa: E402

import numbers

from keras import ops

from .._layer_args import check_flag
from .._xla_common import positive_int
from .data import FromTensors
from .functions import expected, sample

__all__ = ["ATSBuilder", "ATSOutput"]


class ATSOutput:
    """What :meth:`ATSBuilder.get` returns: ``inputs``, ``outputs``, ``targets``, ``attention``, ``patches``.

    Iterating gives the five in that order (``inputs, outputs, targets, attention, patches = result``).
    """

    def __init__(self, inputs=None, outputs=None, targets=None, attention=None, patches=None):
        self.inputs = inputs
        self.outputs = outputs
        self.targets = targets
        self.attention = attention
        self.patches = patches

    def __iter__(self):
        return iter((self.inputs, self.outputs, self.targets, self.attention, self.patches))


def _spatial(x):
    """The spatial shape of a channels-last tensor: ints where static, a tensor otherwise."""
    shape = ops.shape(x)
    return list(shape[1:-1])


class ATSBuilder:
    """Build an attention-sampling model step by step (every setter returns the builder)."""

    def __init__(self):
        self._batch = None
        self._attention = None
        self._feature = None
        self._patch_size = None
        self._n_patches = None
        self._sample_with_replacement = False
        self._receptive_field = 0

    def from_batch(self, batch):
        """Take the levels and targets from a :class:`ats.data.MultiResolutionBatch`."""
        self._batch = batch
        return self

    def from_tensors(self, xs, y):
        """Take the levels from tensors (lowest resolution first): a :class:`ats.data.FromTensors`."""
        self._batch = FromTensors(xs, y)
        return self

    def attention(self, attention):
        """The attention network: a callable from level 0 to a ``(B, *grid)`` distribution."""
        self._attention = attention
        return self

    def attention_receptive_field(self, receptive_field):
        """The attention network's receptive field in level-0 pixels (0 for ``padding="same"``)."""
        if isinstance(receptive_field, bool) or not isinstance(receptive_field, numbers.Integral) or receptive_field < 0:
            raise ValueError(f"receptive_field must be a non-negative integer, got {receptive_field!r}")
        self._receptive_field = int(receptive_field)
        return self

    def feature(self, feature):
        """The feature network: a callable applied to the ``B * n_patches`` patches as one batch."""
        self._feature = feature
        return self

    def patch_size(self, patch_size):
        """The size of the patches taken from level 1."""
        self._patch_size = patch_size
        return self

    def n_patches(self, n_patches):
        """How many patches to sample per input."""
        self._n_patches = positive_int(n_patches, "n_patches")  # named as here, not as sample()'s n_samples
        return self

    def sample_with(self, **kwargs):
        """``sample_with(replacement=True)`` or ``(replacement=False)``."""
        if set(kwargs) != {"replacement"}:
            raise TypeError(f"sample_with takes one keyword argument, replacement=True/False; got {sorted(kwargs)}")
        self._sample_with_replacement = check_flag(kwargs["replacement"], "replacement")
        return self

    def sample_with_replacement(self):
        self._sample_with_replacement = True
        return self

    def sample_without_replacement(self):
        self._sample_with_replacement = False
        return self

    def _check(self):
        missing = [
            name
            for name, value in (
                ("from_tensors/from_batch", self._batch),
                ("attention", self._attention),
                ("feature", self._feature),
                ("patch_size", self._patch_size),
                ("n_patches", self._n_patches),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"ATSBuilder.get() needs {', '.join(missing)} to be set first")

    def get(self):
        """Wire the model and return an :class:`ATSOutput`.

        ``inputs``: the batch's own inputs (``MultiResolutionBatch.inputs()``);
        ``outputs``: the expected features ``(B, ...)``; ``targets``: the batch's
        targets; ``attention``: the attention map on level 0; ``patches``: the
        sampled patches ``(B, n, *patch_size, C)``.
        """
        self._check()
        n = self._n_patches
        rf = self._receptive_field
        x_low = self._batch.data(0)
        if any(size is None for size in _spatial(x_low)):
            raise ValueError(f"ATSBuilder needs the spatial sizes of level 0 when the model is built, got x_low of "
                             f"shape {tuple(x_low.shape)}; attention_sampling takes inputs of unknown sizes")
        attention = self._attention(x_low)
        sample_space = list(ops.shape(attention)[1:])
        samples, sampled_attention = sample(n, attention, sample_space, replace=self._sample_with_replacement)
        offsets = ops.cast(ops.zeros_like(samples), "float32") + rf / 2
        previous = [s - rf for s in _spatial(x_low)]
        patches, _ = self._batch.patches(samples, offsets, sample_space, previous, self._patch_size, 0, 1)
        flat = ops.reshape(patches, (-1, *patches.shape[2:]))
        features = self._feature(flat)
        features = ops.reshape(features, (-1, n, *features.shape[1:]))
        outputs = expected(sampled_attention, features, replace=self._sample_with_replacement)
        return ATSOutput(
            inputs=self._batch.inputs(),
            outputs=outputs,
            targets=self._batch.targets(),
            attention=attention,
            patches=patches,
        )
