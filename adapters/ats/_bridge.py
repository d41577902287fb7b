"""Moving tensors between TensorFlow and the atskern kernels.

Two roads:

- **DLPack, for eager tensors** (:func:`to_numpy`, :func:`from_numpy`,
  :func:`to_cupy`, :func:`from_cupy`). Zero-copy where TensorFlow allows:
  ``np.from_dlpack`` of a CPU tensor is a read-only view; TensorFlow imports
  only legacy DLPack capsules of C-contiguous, writable arrays, and on the CPU
  it assumes (without checking: the process aborts otherwise) a 64-byte
  aligned buffer, so anything else is first copied into a 64-byte aligned
  buffer.
- **``tf.numpy_function``, inside graphs** (:func:`numpy_call`): what the ops
  use, so they run eagerly and inside ``tf.function``. In a graph TensorFlow
  hands its CPU buffers to NumPy without a copy; an eager call copies the
  inputs. Neither road compiles under XLA: :func:`numpy_call` raises a clear
  error when traced inside ``jit_compile=True`` (``ats.ops.sample`` and
  ``extract_patches`` switch to :mod:`ats.tf.xla` there instead of calling it).

On the GPU, TensorFlow and CuPy run on different CUDA streams and legacy
DLPack carries no stream, so :func:`to_cupy` waits for the device before
CuPy reads and :func:`from_cupy` waits for CuPy's stream before TensorFlow
reads (stream-safe, at the price of a synchronization).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ._kernels import ALIGNMENT, aligned_empty


class XLAUnsupportedError(NotImplementedError):
    """An ats op that calls a NumPy/CuPy kernel was traced inside an XLA (jit_compile) function."""

    # Exception's own constructor lets autograph re-raise this type (with its
    # message) instead of wrapping it in a StagingError.
    __init__ = Exception.__init__


def is_aligned(array: np.ndarray, alignment: int = ALIGNMENT) -> bool:
    return array.ctypes.data % alignment == 0


def importable(array: np.ndarray) -> np.ndarray:
    """``array`` itself if TensorFlow can import it through DLPack, else a 64-byte aligned copy."""
    array = np.asarray(array)
    if array.flags.c_contiguous and array.flags.writeable and is_aligned(array) and array.size:
        return array
    copy = aligned_empty(array.shape, array.dtype)
    copy[...] = array
    return copy


def from_numpy(array: np.ndarray) -> tf.Tensor:
    """A CPU ``tf.Tensor`` sharing ``array``'s memory when it is contiguous, writable and 64-byte aligned.

    Anything else is copied into an aligned buffer first. The tensor keeps the
    buffer alive; do not write to ``array`` while the tensor is in use.
    """
    array = importable(array)
    if array.size == 0:
        return tf.constant(array)
    if array.dtype.type.__module__.startswith("ml_dtypes"):  # bfloat16, float8...: DLPack has no code for them
        return _from_ml_dtypes(array)
    # A legacy capsule: ``__dlpack__()`` without ``max_version``.
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def _from_ml_dtypes(array: np.ndarray) -> tf.Tensor:
    """The tensor of an ml_dtypes array: its bits through DLPack as unsigned integers, bitcast to the TF dtype
    (a copy where TF cannot bitcast to it)."""
    try:
        target = tf.as_dtype(array.dtype)
        bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        return tf.bitcast(tf.experimental.dlpack.from_dlpack(bits.__dlpack__()), target)
    except (TypeError, ValueError, BufferError, tf.errors.OpError):
        return tf.constant(array)


def to_numpy(tensor) -> np.ndarray:
    """A read-only NumPy view of an eager CPU tensor (zero-copy); a copy for tensors on other devices."""
    tensor = tf.convert_to_tensor(tensor)
    if "GPU" in tensor.device.upper():
        return tensor.numpy()
    try:
        return np.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError, tf.errors.OpError):  # OpError: float8 has no DLPack code
        return tensor.numpy()


def _cupy():
    from atskern._backend import cupy

    return cupy()


def to_cupy(tensor):
    """A CuPy array sharing an eager GPU tensor's memory, safe to read on CuPy's stream."""
    cp = _cupy()
    tensor = tf.convert_to_tensor(tensor)
    if "GPU" not in tensor.device.upper():
        raise ValueError(f"to_cupy needs a tensor on a GPU, got one on {tensor.device!r}")
    capsule = tf.experimental.dlpack.to_dlpack(tensor)
    array = cp.from_dlpack(capsule) if hasattr(cp, "from_dlpack") else cp.fromDlpack(capsule)
    # TensorFlow may still be writing the tensor on its own stream.
    cp.cuda.Device(array.device.id).synchronize()
    return array


def from_cupy(array) -> tf.Tensor:
    """A GPU ``tf.Tensor`` sharing a CuPy array's memory (a contiguous copy when it is not contiguous)."""
    cp = _cupy()
    array = cp.ascontiguousarray(array)
    # Work queued on CuPy's stream must land before TensorFlow reads the buffer.
    cp.cuda.get_current_stream().synchronize()
    return tf.experimental.dlpack.from_dlpack(array.toDlpack())


def in_xla_context() -> bool:
    """True while tracing inside ``tf.function(jit_compile=True)`` (or another XLA context)."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def require_no_xla(op_name: str) -> None:
    if in_xla_context():
        raise XLAUnsupportedError(
            f"{op_name} calls an atskern kernel through tf.numpy_function, which XLA cannot compile; "
            "run it outside jit_compile=True (Keras: model.compile(..., jit_compile=False); "
            "layers that need it set supports_jit=False so Keras does this by default)"
        )


def _on_cpu(tensor) -> bool:
    return isinstance(tensor, tf.Tensor) and "GPU" not in tensor.device.upper()


def numpy_call(func, inputs, tout, *, name: str, stateful: bool = False):
    """Run the NumPy function ``func`` on tensors: results are tensors of dtype ``tout``.

    Eagerly on CPU tensors it goes through DLPack (inputs as read-only views,
    aligned outputs shared with TensorFlow), where an eager
    ``tf.numpy_function`` would copy its inputs. Otherwise it is
    ``tf.numpy_function`` with the XLA check; graph results still need
    ``set_shape``.
    """
    inputs = list(inputs)
    if tf.executing_eagerly() and all(_on_cpu(t) for t in inputs):
        results = func(*(to_numpy(t) for t in inputs))
        if isinstance(tout, (list, tuple)):
            return [from_numpy(np.asarray(r, dtype=t.as_numpy_dtype)) for r, t in zip(results, tout)]
        return from_numpy(np.asarray(results, dtype=tout.as_numpy_dtype))
    require_no_xla(name)
    return tf.numpy_function(func, inputs, tout, stateful=stateful, name=name.replace(".", "_"))
