"""Sampling keys of the Keras layers: what a seed means, written once for every backend.

A key is atskern's Philox key, two uint32 words ``[k0, k1]``
(``atskern.sample(..., seed=k0 + 2**32 k1)`` draws with it).

- ``seed=None``: the words of a ``keras.random.SeedGenerator`` state, one
  state per call (Keras threads that state through JAX's jitted steps and
  TensorFlow's graphs), xor'ed with the process rank's salt.
- ``seed=s``: ``fingerprint(attention) xor salted_seed(s)``, a stateless
  function of the seed, the attention map and the process rank
  (:func:`ats._distributed.salted_seed`; rank 0 leaves ``s`` unchanged).

The fingerprint of a map is defined on the bits of its float32 values
(float64 maps are rounded to float32 first), flattened row-major over the
whole batch as ``v_i``, ``i = 0 .. B*N - 1``:
``word_j = sum_i fmix32(v_i + (2 i + j + 1) * 0x9E3779B9) mod 2**32`` for
``j = 0, 1``, with MurmurHash3's 32-bit finalizer ``fmix32``. Every step is
wrapping 32-bit integer arithmetic and the sum is exact in any order, so each
backend (TensorFlow, in and out of XLA, torch, JAX under ``jit``) gives the
same words: a seeded layer draws the same patches for the same map on every
backend. :func:`fingerprint` below is the NumPy reference the backends are
tested against.

The 2019 helpers (:func:`ats.keras.functions.sample`, ``ats.slides``) take a
``seed`` of their own: None, an int or an integer scalar tensor, used as the
key itself (no fingerprint), so ``seed=s`` draws ``atskern.sample(..., seed=s)``
(on rank 0: other ranks xor it with their salt, as above). Each backend's
``seed_key`` turns such a seed into key words; None takes a fresh seed per
call (:func:`fresh_seed`; TensorFlow instead draws a fresh key in the graph).
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import _distributed, _layer_args

GOLDEN32 = 0x9E3779B9
FMIX_M1 = 0x85EBCA6B
FMIX_M2 = 0xC2B2AE35
MASK32 = 0xFFFFFFFF


def fmix32(x, ops):
    """MurmurHash3's 32-bit finalizer over a table of wrapping uint32 operations (``ats._xla_philox.UInt32Ops``)."""
    x = ops.xor(x, ops.shr(x, 16))
    x = ops.mul(x, ops.const(FMIX_M1))
    x = ops.xor(x, ops.shr(x, 13))
    x = ops.mul(x, ops.const(FMIX_M2))
    return ops.xor(x, ops.shr(x, 16))


def fingerprint(attention) -> tuple[int, int]:
    """The two words of an attention map's fingerprint (NumPy reference of the backends' in-graph versions)."""
    bits = np.ascontiguousarray(np.asarray(attention, dtype=np.float32)).view(np.uint32).reshape(-1).astype(np.uint64)
    index = np.arange(bits.size, dtype=np.uint64)
    words = []
    for j in (0, 1):
        x = (bits + (2 * index + j + 1) * GOLDEN32) & MASK32
        x ^= x >> 16
        x = (x * FMIX_M1) & MASK32
        x ^= x >> 13
        x = (x * FMIX_M2) & MASK32
        x ^= x >> 16
        words.append(int(x.sum(dtype=np.uint64) & MASK32))
    return words[0], words[1]


def check_seed(seed, *, tensors: bool = False):
    """``seed`` as None or an int in ``[0, 2**64)`` (a ValueError otherwise); with ``tensors``, an integer
    scalar tensor is accepted too (returned as it is)."""
    if tensors and seed is not None and not isinstance(seed, numbers.Integral):
        import keras

        if keras.ops.is_tensor(seed):
            return seed
        raise ValueError(f"seed must be None, an int in [0, 2**64) or an integer scalar tensor, got {seed!r}")
    return _layer_args.check_seed(seed)


def fresh_seed() -> int:
    """A new sampling seed from NumPy's global generator (for helper calls made without one)."""
    return int(np.random.randint(0, 2**63 - 1, dtype=np.int64))


def seed_key(seed: int) -> np.ndarray:
    """The rank-salted ``seed`` as the key words ``[k0, k1]``, a NumPy uint32 array."""
    return np.array(seed_words(seed), dtype=np.uint32)


def seed_words(seed: int) -> tuple[int, int]:
    """The rank-salted seed as two uint32 words ``(low, high)``."""
    salted = _distributed.salted_seed(int(seed))
    return salted & MASK32, salted >> 32


def rank_salt() -> tuple[int, int]:
    """This process's salt for seed-generator keys, ``(low, high)``; ``(0, 0)`` on rank 0."""
    return seed_words(0)


def seeded_key(seed: int, attention) -> int:
    """The atskern seed a layer with ``seed`` uses for ``attention`` (NumPy; for tests and debugging)."""
    f0, f1 = fingerprint(attention)
    s0, s1 = seed_words(seed)
    return (f0 ^ s0) | ((f1 ^ s1) << 32)
