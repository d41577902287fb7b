"""``MultiResolutionBatch``: the interface that serves a batch's resolution levels and patches of them.

In 2019 this was a TF1 interface whose ``inputs()`` were the placeholders a
``Session.run`` feed dictionary had to fill. In Keras 3 the same role is
played by ``keras.Input`` tensors: ``inputs()`` returns the ``keras.Input``
tensors the implementation created and that a ``keras.Model`` built on its
outputs must list among its inputs (empty when the caller created them, as
for :class:`ats.data.FromTensors`). ``data(level)`` and ``patches(...)``
return tensors of the same kind as the levels: symbolic Keras tensors
while a functional model is built, TensorFlow tensors when called eagerly.

Subclasses implement every method; the base raises NotImplementedError.
"""

from __future__ import annotations

__all__ = ["MultiResolutionBatch"]


class MultiResolutionBatch:
    """Access to data at several resolutions (levels): the full data, patches, targets, model inputs."""

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
