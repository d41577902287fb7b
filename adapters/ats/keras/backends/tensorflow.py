"""The ``ats.keras`` ops on Keras' TensorFlow backend: :mod:`ats.ops`.

``ats.ops`` calls atskern's kernels (``tf.numpy_function``, DLPack when
eager) and, when traced inside an XLA context (``jit_compile=True``), the
plain TensorFlow ops of :mod:`ats.tf.xla` instead, which draw the same
positions for the same key.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ... import ops as tf_ops
from ...ops import expectation, extract_patches, patch_offsets  # noqa: F401 (this backend's ops)
from ...ops.extract_patches import _trace_time_value
from ...tf import xla
from ...tf.xla import OPS as UINT32
from .. import _keys


def sample(attention, n, *, replace, key, deterministic):
    return tf_ops.sample(attention, n, replace=replace, seed=key, deterministic=deterministic)


def top_indices(flat, n):
    """int32 positions of each row's ``n`` largest entries, largest first, ties to the lower position."""
    return xla.top_positions(flat, n)


def _float32_bits(values):
    """uint32 bits of ``values`` rounded to float32 as NumPy rounds them. TensorFlow's cast of float64 flushes
    results below float32's smallest normal number (1.2e-38) to zero, so there the bits are computed: a float32
    subnormal is its multiple of ``2**-149`` (rounded half to even, exact in float64), with the sign bit."""
    if values.dtype != tf.float64:
        return tf.bitcast(tf.cast(values, tf.float32), tf.uint32)
    magnitude = tf.abs(values)
    multiple = tf.cast(tf.round(magnitude * 2.0**149), tf.uint32)  # up to 2**23: the smallest normal's bits
    sign = tf.cast(tf.bitwise.right_shift(tf.bitcast(values, tf.uint64), tf.constant(63, tf.uint64)), tf.uint32)
    tiny = tf.bitwise.bitwise_or(multiple, tf.bitwise.left_shift(sign, tf.constant(31, tf.uint32)))
    return tf.where(magnitude < 2.0**-126, tiny, tf.bitcast(tf.cast(values, tf.float32), tf.uint32))


def fingerprint(attention):
    """uint32 ``[word0, word1]`` of :func:`ats.keras._keys.fingerprint`, in TensorFlow ops (compiles under XLA)."""
    bits = tf.reshape(_float32_bits(tf.stop_gradient(attention)), [-1])
    index = tf.cast(tf.range(tf.size(bits)), tf.uint32)
    words = []
    for j in (0, 1):
        offset = UINT32.mul(UINT32.add(UINT32.add(index, index), tf.constant(j + 1, tf.uint32)), tf.constant(_keys.GOLDEN32, tf.uint32))
        mixed = _keys.fmix32(UINT32.add(bits, offset), UINT32)
        total = tf.reduce_sum(tf.cast(mixed, tf.int64))
        words.append(tf.cast(tf.bitwise.bitwise_and(total, tf.constant(_keys.MASK32, tf.int64)), tf.uint32))
    return tf.stack(words)


def key_words(state):
    """uint32 ``[k0, k1]`` of a seed generator state (int64 on this backend) or of two Python ints.

    Under a ``tf.distribute`` strategy with several replicas (which all read the same mirrored state),
    the replica's index is mixed into ``k1``, so that each replica draws its own patches.
    """
    state = tf.convert_to_tensor(state)
    if state.dtype != tf.uint32:
        state = tf.cast(tf.bitwise.bitwise_and(tf.cast(state, tf.int64), tf.constant(_keys.MASK32, tf.int64)), tf.uint32)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        replica = tf.cast(context.replica_id_in_sync_group, tf.uint32)
        salt = UINT32.mul(replica, tf.constant(_keys.GOLDEN32, tf.uint32))
        state = tf.bitwise.bitwise_xor(state, tf.stack([tf.constant(0, tf.uint32), salt]))
    return state


def xor(words, salt):
    return tf.bitwise.bitwise_xor(words, tf.constant(salt, tf.uint32))


def seed_key(seed):
    """Key words of a helper's seed: None stays None (``ats.ops.sample`` then draws a fresh key on every run
    of the graph); an int or an integer scalar tensor ``s`` gives the words of ``s`` (two's complement), salted."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return tf.constant(_keys.seed_key(seed))
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer or seed.shape.rank != 0:
        raise TypeError(f"seed must be None, an int or an integer scalar tensor, got {seed!r}")
    bits = tf.bitcast(seed, tf.int64) if seed.dtype == tf.uint64 else tf.cast(seed, tf.int64)
    mask = tf.constant(_keys.MASK32, tf.int64)
    high = tf.bitwise.right_shift(bits, tf.constant(32, tf.int64))
    words = tf.cast(tf.stack([tf.bitwise.bitwise_and(bits, mask), tf.bitwise.bitwise_and(high, mask)]), tf.uint32)
    salt = _keys.rank_salt()
    return xor(words, salt) if salt != (0, 0) else words


def check_inputs(x_low, x_high, attention, size):
    """The batch sizes (statically, where known) and, for an unknown spatial shape, the patch fitting x_high."""
    tf_ops.check_same_batch({"x_low": x_low, "x_high": x_high, "attention": attention})
    if x_high.shape[1:-1].is_fully_defined():
        return x_high
    check = tf.debugging.assert_less_equal(
        tf.constant(size, tf.int32),
        tf.shape(x_high)[1:-1],
        message=f"SamplePatches: patch_size {size} is larger than the spatial shape of x_high",
    )
    with tf.control_dependencies([check]):
        return tf.identity(x_high)


def spatial_shape(x):
    """``x``'s spatial sizes: Python ints where static, else a tensor."""
    spatial = x.shape[1:-1]
    return tuple(spatial) if spatial.is_fully_defined() else tf.shape(x)[1:-1]


def grid_shape(attention):
    grid = attention.shape[1:]
    return tuple(grid) if grid.is_fully_defined() else tf.shape(attention)[1:]


def static_value(value):
    """``value`` (a tensor, a list holding tensors, or plain values) as NumPy if TensorFlow knows it while
    tracing (constants, static shapes), else None."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, (tf.Tensor, tf.Variable)) for v in value):
        value = tf.convert_to_tensor(value)
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return _trace_time_value(value)
    return np.asarray(value)


def x64():
    return True


def cumsum(x, axis: int):
    return tf.math.cumsum(x, axis=axis)
