"""ats._bridge: DLPack between TensorFlow and NumPy (and CuPy on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from ats import _bridge  # noqa: E402
from ats._kernels import aligned_empty  # noqa: E402

from .conftest import HAS_GPU  # noqa: E402


def data_pointer(tensor) -> int:
    return np.from_dlpack(tensor).ctypes.data


def test_aligned_array_is_shared_without_copy():
    array = aligned_empty((64, 33), np.float32)
    array[...] = np.arange(array.size, dtype=np.float32).reshape(array.shape)
    tensor = _bridge.from_numpy(array)
    assert data_pointer(tensor) == array.ctypes.data
    np.testing.assert_array_equal(tensor.numpy(), array)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.empty(100, np.uint8)[1:97].view(np.float32).reshape(4, 6),  # misaligned
        lambda: np.arange(48, dtype=np.float64).reshape(6, 8)[:, ::2],  # not contiguous
        lambda: np.frombuffer(np.arange(12, dtype=np.int32).tobytes(), dtype=np.int32),  # read-only
    ],
    ids=["misaligned", "strided", "readonly"],
)
def test_unimportable_arrays_are_copied_to_aligned_memory(make):
    array = make()
    if array.dtype == np.float32:
        array[...] = np.arange(array.size).reshape(array.shape)
    tensor = _bridge.from_numpy(array)  # would abort the process if handed over as is
    assert data_pointer(tensor) % 64 == 0
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_tensor_to_numpy_is_a_read_only_view():
    tensor = tf.range(10.0)
    view = _bridge.to_numpy(tensor)
    assert not view.flags.writeable
    assert view.ctypes.data == data_pointer(tensor)
    np.testing.assert_array_equal(view, np.arange(10.0))


def test_round_trip_keeps_values_and_dtype():
    for dtype in (np.uint8, np.float16, np.int64, np.float64):
        array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
        back = _bridge.to_numpy(_bridge.from_numpy(array))
        assert back.dtype == dtype
        np.testing.assert_array_equal(back, array)


def test_xla_context_detected_only_under_jit_compile():
    seen = []

    def probe(x):
        seen.append(_bridge.in_xla_context())
        return x + 1

    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    tf.function(probe)(tf.constant(1.0))
    probe(tf.constant(1.0))
    assert seen == [True, False, False]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not tf.config.list_physical_devices("GPU"), reason="needs CuPy and a TF GPU")
def test_cupy_round_trip_on_gpu():
    import cupy

    with tf.device("GPU:0"):
        tensor = tf.random.normal((32, 32))
    array = _bridge.to_cupy(tensor)
    np.testing.assert_array_equal(cupy.asnumpy(array), tensor.numpy())
    back = _bridge.from_cupy(array * 2)
    np.testing.assert_allclose(back.numpy(), 2 * tensor.numpy())
