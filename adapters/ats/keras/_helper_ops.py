"""The three kernel calls the 2019 helper modules need, on whichever Keras backend runs.

``draw`` (sampling indices), ``extract_patches`` (channels-last gather with
its scatter gradient) and ``expectation`` (the ATS estimator) go to the
framework adapter of the running Keras backend: :mod:`ats.ops` on
TensorFlow, :mod:`ats.torch.functional` on torch, :mod:`ats.jax.functional`
on JAX. Keras' torch and JAX tensors are the frameworks' own tensors, so no
conversion is needed. Everything else in the helpers is ``keras.ops``.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np

from .._keras import require_keras

__all__ = ["backend", "draw", "extract_patches", "expectation", "fresh_seed"]


def backend() -> str:
    """The Keras backend's name; an ImportError for backends ``ats`` does not support."""
    return require_keras("ats.keras")


def fresh_seed() -> int:
    """A new sampling seed from NumPy's global generator (for calls made without one)."""
    return int(np.random.randint(0, 2**63 - 1, dtype=np.int64))


def _check_seed(seed):
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
        return int(seed)
    if seed is None or keras.ops.is_tensor(seed):
        return seed
    raise ValueError(f"seed must be None, an int in [0, 2**64) or an integer scalar tensor, got {seed!r}")


def draw(weights, n: int, *, replace: bool, seed=None):
    """int32 grid coordinates ``(B, n, D)`` drawn from ``weights`` ``(B, *grid)`` (no gradient).

    ``seed`` is None (a fresh draw: eagerly a new seed per call), an int, or
    an integer scalar tensor (e.g. from a ``keras.random.SeedGenerator``, so
    that compiled functions draw afresh per call).
    """
    seed = _check_seed(seed)
    name = backend()
    weights = keras.ops.stop_gradient(weights)
    if name == "tensorflow":
        from .. import ops

        indices, _ = ops.sample(weights, n, replace=replace, seed=seed)
        return indices
    if seed is None:
        seed = fresh_seed()
    if name == "torch":
        import torch

        from ..torch import functional as F

        if torch.is_tensor(seed):
            seed = seed.detach().to("cpu", torch.int64).reshape(())
        indices, _ = F.sample(weights, n, replace=replace, key=seed)
        return indices.to(torch.int32)
    import jax.numpy as jnp

    from ..jax import functional as F

    if not isinstance(seed, int):  # a traced integer scalar: the key [seed, 0]
        seed = jnp.stack([jnp.asarray(seed).astype(jnp.uint32), jnp.uint32(0)])
    indices, _ = F.sample_indices(weights, n, seed, replace=replace)
    return indices


def extract_patches(x, offsets, size, *, fill=0):
    """``(B, K, *size, C)`` patches of channels-last ``x`` at int ``offsets`` ``(B, K, D)``, differentiable in ``x``."""
    name = backend()
    size = tuple(int(s) for s in size)
    if name == "tensorflow":
        from .. import ops

        return ops.extract_patches(x, offsets, size, fill=fill)
    if name == "torch":
        import torch

        from ..torch import functional as F

        return F.extract_patches(x, offsets.to(torch.int64), size, fill=fill, channels_first=False)
    from ..jax import functional as F

    return F.extract_patches(x, offsets, size, fill=fill, channels_first=False)


def expectation(features, probs, *, replace: bool):
    """The ATS estimate ``(B, *F)`` from ``features`` ``(B, n, *F)`` and ``probs`` ``(B, n)``, unbiased gradients."""
    name = backend()
    if name == "tensorflow":
        from .. import ops

        return ops.expectation(features, probs, replace=replace)
    if name == "torch":
        from ..torch import functional as F

        return F.expectation(features, probs, replace=replace)
    from ..jax import functional as F

    return F.expectation(features, probs, replace=replace)
