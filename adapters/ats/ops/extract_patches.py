"""``ats.ops.extract_patches``: the 2019 import path of the patch gather.

In the 2019 library ``ats.ops.extract_patches`` was a package holding the
compiled op, imported as ``from ats.ops.extract_patches import extract_patches``.
Here ``ats.ops.extract_patches`` is this module, and the module itself is
callable, so both spellings work::

    from ats.ops.extract_patches import extract_patches
    patches = extract_patches(x, offsets, size)

    import ats.ops
    patches = ats.ops.extract_patches(x, offsets, size)

``size`` may be a list, a tuple, an int, a NumPy array or a tensor whose value
is known when the op is traced (a constant, or a tensor computed from static
shapes); a size known only when the graph runs cannot give the patches a
shape, and raises a ValueError saying so.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import tensor_util

# The package has defined the gather function by the time this module runs
# (ats/ops/__init__.py imports it last); import machinery replaces the
# package's attribute with this module only after the module has run.
_gather = sys.modules[__package__].__dict__["extract_patches"]
if isinstance(_gather, types.ModuleType):  # a reload: the package attribute is already this module
    _gather = _gather._gather


def _trace_time_value(tensor):
    """The value of an integer tensor if TensorFlow can compute it while tracing (constants, static shapes)."""
    value = tf.get_static_value(tensor)
    if value is None and tensor.shape.rank == 1:
        try:  # slices and stacks of tf.shape() of statically shaped tensors
            shape = tensor_util.constant_value_as_shape(tensor)
        except (TypeError, ValueError):
            return None
        if shape.is_fully_defined():
            value = np.array(shape.as_list())
    return value


def static_size(size, name: str = "size"):
    """``size`` as Python ints if its value is known now; a ValueError naming ``name`` otherwise."""
    if isinstance(size, (tf.Tensor, tf.Variable)) or (
        isinstance(size, (list, tuple)) and any(isinstance(s, (tf.Tensor, tf.Variable)) for s in size)
    ):
        value = _trace_time_value(tf.convert_to_tensor(size) if isinstance(size, (list, tuple)) else size)
        if value is None:
            raise ValueError(
                f"{name} must be known when the op is traced (a list, a tuple or a constant tensor), got {size!r} "
                "whose value is only known when the graph runs; the patches' shape depends on it. "
                "Pass the size as Python ints"
            )
        size = value
    if isinstance(size, np.ndarray):
        if not np.issubdtype(size.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {size.dtype}")
        size = size.tolist()
    if isinstance(size, np.integer):
        size = int(size)
    return size


def extract_patches(x, offsets, size, **kwargs):
    """Patches of ``x`` (``(B, *spatial, C)``) at ``offsets`` (``(B, K, D)``) of shape ``size``.

    The 2019 signature ``extract_patches(x, offsets, size)``: returns
    ``(B, K, *size, C)``; pixels outside ``x`` are 0 (``fill=`` changes
    that). Keyword arguments go to :func:`ats.ops.extract_patches`' gather
    (``fill``, ``channels_first``); see the module docstring for ``size``.
    """
    return _gather(x, offsets, static_size(size), **kwargs)


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`extract_patches` (``ats.ops.extract_patches(...)``)."""

    def __call__(self, *args, **kwargs):
        return extract_patches(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__all__ = ["extract_patches", "static_size"]
