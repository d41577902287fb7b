"""The status in mapped host memory (``atskern.gpu._mapped``, ``atskern.gpu.sampling.MAPPED_STATUS``) on the CPU:
the buffer's allocation, device addresses and growth through a stand-in runtime, and which calls of
``atskern.sample`` ask for it. The kernels writing into it run on the host build in
``test_cuda_host_sampling.py``, on a GPU in ``test_gpu_sampling.py``."""

from __future__ import annotations

import gc
import types

import numpy as np
import pytest

import atskern
from atskern.gpu import _mapped
from atskern.gpu import sampling as gs


class _Runtime:
    """cudaHostAlloc, cudaFreeHost and cudaPointerGetAttributes over NumPy buffers; device 1 maps each buffer at
    another address, device 2 cannot map host memory."""

    def __init__(self):
        self.buffers, self.flags, self.device = {}, [], 0

    def hostAlloc(self, size, flags):
        buffer = np.zeros(size, np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        self.flags.append(flags)
        return buffer.ctypes.data

    def freeHost(self, ptr):
        del self.buffers[ptr]

    def pointerGetAttributes(self, ptr):
        assert ptr in self.buffers
        if self.device == 2:
            raise RuntimeError("cudaErrorInvalidValue")
        return types.SimpleNamespace(devicePointer=ptr + (0x1000_0000_0000 if self.device == 1 else 0))


@pytest.fixture
def runtime(monkeypatch):
    runtime = _Runtime()
    monkeypatch.setattr(_mapped, "cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setattr(_mapped, "_buffers", _mapped._Buffers())
    return runtime


def test_status_buffer_is_mapped_per_device_grown_and_freed(runtime):
    status, address = _mapped.status_buffer((3, 4), 0)
    assert runtime.flags == [_mapped.HOST_ALLOC_PORTABLE | _mapped.HOST_ALLOC_MAPPED] and len(runtime.buffers) == 1
    assert status.shape == (3, 4) and status.dtype == np.int64 and address == status.ctypes.data
    status[...] = 7
    (buffer,) = runtime.buffers.values()
    assert np.array_equal(buffer[:96].view(np.int64), np.full(12, 7))  # the view is the allocation itself
    runtime.device = 1
    again, elsewhere = _mapped.status_buffer((2, 4), 1)
    assert again.ctypes.data == status.ctypes.data and elsewhere == address + 0x1000_0000_0000
    assert _mapped.status_buffer((2, 4), 0)[1] == address  # each device's address, asked once
    runtime.device = 0
    big, big_address = _mapped.status_buffer((1000, 4), 0)  # more than the first 4 KiB: a new buffer
    assert big.shape == (1000, 4) and big_address == big.ctypes.data != address
    del again, buffer
    gc.collect()
    assert len(runtime.buffers) == 2 and np.all(status == 7)  # a view keeps its memory alive
    del status
    gc.collect()
    assert list(runtime.buffers) == [big_address]  # then the outgrown buffer is freed


def test_a_device_that_cannot_map_keeps_the_status_on_the_device(runtime):
    runtime.device = 2
    assert _mapped.status_buffer((2, 4), 2) is None


@pytest.mark.parametrize("validate, return_status, asked", [(True, False, True), (True, True, False),
                                                            (False, False, False), (False, True, False)])
def test_only_a_status_read_back_at_once_asks_for_host_memory(monkeypatch, validate, return_status, asked):
    """``atskern.sample`` asks the GPU backend for ``host_status`` when it reads the status back itself, before the
    thread's next call: validated calls that do not return the status (a returned status stays on the device)."""
    from bench import _stand_in_cupy

    seen = []
    with _stand_in_cupy.installed() as cp:
        real = gs.sample
        monkeypatch.setattr(gs, "sample", lambda *args, **kwargs: seen.append(kwargs["host_status"]) or
                            real(*args, **{k: v for k, v in kwargs.items() if k != "host_status"}))
        out = atskern.sample(cp.ndarray((2, 16, 16), np.float32), 4, seed=1, validate=validate,
                             return_status=return_status)
    assert seen == [asked] and len(out) == (3 if return_status else 2)


@pytest.mark.parametrize("call", ["sample", "extract_patches", "scatter_patches"])
def test_arrays_on_another_device_are_refused_by_name(call):
    """A CuPy array on a device other than the current one gets a ValueError naming it before anything is launched
    (the kernels run on the current device: reading the other device's memory faults and ends the CUDA context)."""
    from bench import _stand_in_cupy

    with _stand_in_cupy.installed() as cp:
        elsewhere = types.SimpleNamespace(id=1)
        if call == "sample":
            attention = cp.ndarray((2, 16, 16), np.float32)
            attention.device = elsewhere
            with pytest.raises(ValueError, match=r"attention is on GPU 1 but the current device is GPU 0"):
                atskern.sample(attention, 4, seed=1)
        else:
            images = cp.ndarray((2, 32, 32, 3), np.float32)
            offsets = cp.ndarray((2, 4, 2), np.int64)
            offsets.device = elsewhere
            with pytest.raises(ValueError, match=r"offsets is on GPU 1 .*cupy.cuda.Device\(1\)"):
                if call == "extract_patches":
                    atskern.extract_patches(images, offsets, 8)
                else:
                    atskern.scatter_patches(cp.ndarray((2, 4, 8, 8, 3), np.float32), offsets, (32, 32))
