"""Argument checks remembered per call signature, for the GPU hot path.

A training loop calls ``extract_patches`` and ``scatter_patches`` with the same shapes, dtypes and options every
step, and their checks are several µs of a GPU call's host time (``python -m bench.host_path``). A *signature*
holds every property those checks read: the arrays' types, shapes and dtypes, and the exact types and values of
the options. A call whose signature passed the checks before gets the same result again without running them.

Only CuPy calls without ``out`` (whose checks read memory addresses, not just shapes) and with options of plain
types are remembered: a Python ``int`` or ``float`` fill (keyed by its ``repr``, so ``-0.0`` is not ``0.0``), sizes
as a Python ``int`` or a tuple of them, flags as ``bool``. ``50.0`` or ``np.int64(50)`` hash like ``50`` but the
checks treat them differently, so such calls are checked every time. Errors are never remembered.
"""

from __future__ import annotations

from ._backend import is_cupy_array

MAX_ENTRIES = 256
"""Signatures kept per check; the memo starts over when full."""


def plain_sizes(value) -> bool:
    """A Python ``int`` or a tuple of them (what a signature may hold as a size)."""
    return type(value) is int or (type(value) is tuple and all(type(s) is int for s in value))


def plain_fill(value) -> bool:
    return type(value) is int or type(value) is float


def array_signature(array) -> tuple:
    return type(array), array.shape, array.dtype


class CheckMemo:
    """``check(*args)`` remembered under a signature: ``memo(signature, *args)`` runs the check where the
    signature is None or new, and returns the stored result where it passed before."""

    def __init__(self, check):
        self._check = check
        self._results: dict = {}

    def __call__(self, signature, *args):
        if signature is None:
            return self._check(*args)
        found = self._results.get(signature)
        if found is None:
            found = self._check(*args)
            if len(self._results) >= MAX_ENTRIES:
                self._results.clear()
            self._results[signature] = found
        return found

    def clear(self):
        self._results.clear()


def gather_signature(x, offsets, patch_size, fill, channels_first, out):
    """The signature of an ``extract_patches`` call, or None where it is not remembered."""
    if (out is not None or type(channels_first) is not bool or not plain_fill(fill) or not plain_sizes(patch_size)
            or not is_cupy_array(x) or not is_cupy_array(offsets)):
        return None
    return array_signature(x), array_signature(offsets), patch_size, type(fill), repr(fill), channels_first


def scatter_signature(grad, offsets, spatial_shape, channels_first, out, deterministic):
    """The signature of a ``scatter_patches`` call, or None where it is not remembered."""
    if (out is not None or type(channels_first) is not bool or type(deterministic) is not bool
            or not plain_sizes(spatial_shape) or not is_cupy_array(grad) or not is_cupy_array(offsets)):
        return None
    return array_signature(grad), array_signature(offsets), spatial_shape, channels_first, deterministic
