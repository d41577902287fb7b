"""The ``ats.keras`` ops on Keras' torch backend: :mod:`ats.torch.functional`.

The kernels are torch custom ops: CPU tensors go to atskern's Numba kernels,
CUDA tensors to its CuPy kernels on torch's current stream. Keras is
channels-last, so patches are gathered with ``channels_first=False``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...torch import functional as F
from .. import _keys
from ..._xla_philox import UInt32Ops

_MASK = _keys.MASK32

# wrapping uint32 arithmetic in int64 tensors (torch has no full uint32 arithmetic): mask after each step
UINT32 = UInt32Ops(
    const=lambda value: value,
    add=lambda a, b: (a + b) & _MASK,
    mul=lambda a, b: (a * b) & _MASK,  # the low 32 bits of a (possibly wrapped) int64 product are exact
    xor=lambda a, b: a ^ b,
    band=lambda a, b: a & b,
    shr=lambda a, bits: a >> bits,
)


def _meta(tensor) -> bool:
    """Keras' torch backend infers output shapes by running layers on "meta" tensors (no data)."""
    return tensor.device.type == "meta"


def sample(attention, n, *, replace, key, deterministic):
    if deterministic or _meta(attention):  # on meta tensors only the shapes matter: the top-k has them
        indices, sampled = F.sample(attention, n, replace=replace, deterministic=True)
    else:
        indices, sampled = F.sample(attention, n, replace=replace, key=_key64(key))
    return indices.to(torch.int32), sampled


def _key64(words):
    """uint32 words ``[k0, k1]`` (held in int64) as the int64 scalar ``k0 + 2**32 k1`` (wrapped) that
    ``ats.torch`` takes: on the CPU, or a device key on CUDA (read by the kernels, no host round trip)."""
    return (words[0] | (words[1] << 32)).reshape(())


patch_offsets = F.patch_offsets


def extract_patches(x, offsets, size, *, fill=0):
    return F.extract_patches(x, offsets, size, fill=fill, channels_first=False)


def expectation(features, probs, *, replace):
    return F.expectation(features, probs, replace=replace, validate=not _meta(probs))


def top_indices(flat, n):
    """int32 positions of each row's ``n`` largest entries, largest first, ties to the lower position."""
    return F.top_indices(flat, n).to(torch.int32)


def fingerprint(attention):
    """``[word0, word1]`` (int64 tensor of uint32 values) of :func:`ats.keras._keys.fingerprint`, in torch ops."""
    values = attention.detach().to(torch.float32).contiguous().reshape(-1)
    bits = values.view(torch.int32).to(torch.int64) & _MASK
    index = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device)
    words = []
    for j in (0, 1):
        mixed = _keys.fmix32(UINT32.add(bits, UINT32.mul(2 * index + j + 1, _keys.GOLDEN32)), UINT32)
        words.append(mixed.sum() & _MASK)
    return torch.stack(words)


def key_words(state):
    """``[k0, k1]`` (int64 tensor of uint32 values) of a seed generator state (int32 on this backend)."""
    if not isinstance(state, torch.Tensor):
        state = torch.as_tensor(state)
    return state.to(torch.int64) & _MASK


def xor(words, salt):
    return words ^ torch.as_tensor(salt, dtype=torch.int64, device=words.device)


def seed_key(seed):
    """Key words (CPU int64 tensor of uint32 values) of a helper's seed: None takes a fresh seed
    (:func:`ats.keras._keys.fresh_seed`); an int or an integer scalar tensor ``s`` gives the words of ``s``
    (two's complement), salted with the process rank."""
    if seed is None:
        seed = _keys.fresh_seed()
    if isinstance(seed, int):
        return torch.as_tensor(_keys.seed_key(seed).astype(np.int64))
    if not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype == torch.bool:
        raise TypeError(f"seed must be None, an int or an integer scalar tensor, got {seed!r}")
    bits = seed.detach().to("cpu", torch.int64).reshape(())
    words = torch.stack([bits & _MASK, (bits >> 32) & _MASK])
    salt = _keys.rank_salt()
    return xor(words, salt) if salt != (0, 0) else words


def check_inputs(x_low, x_high, attention, size):
    _check_batch(x_low, x_high, attention)
    return x_high


def _check_batch(x_low, x_high, attention):
    sizes = {"x_low": x_low.shape[0], "x_high": x_high.shape[0], "attention": attention.shape[0]}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"x_low, x_high and attention must share the batch size, got {described}")


def spatial_shape(x):
    return tuple(int(s) for s in x.shape[1:-1])


def grid_shape(attention):
    return tuple(int(s) for s in attention.shape[1:])


def static_value(value):
    """``value`` as NumPy (torch tensors are always concrete here: Keras' torch backend runs eagerly)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return np.asarray([static_value(v) for v in value])
    return np.asarray(value)


def x64():
    return True


def cumsum(x, axis: int):
    """A running sum in ``x``'s dtype (Keras' ``ops.cumsum`` returns float32 for float64 on this backend)."""
    return torch.cumsum(x, dim=axis)
