"""A stand-in for CuPy whose device calls do nothing: atskern's GPU front ends and backends run their host work
(argument checks, plans, packing, launch calls) on a machine without a GPU, for ``bench.host_path``.

Arrays carry a shape, a dtype, C-contiguous strides and an address, and pass atskern's CuPy-array checks (their
type's module is ``cupy``); allocation hands out addresses; ``launchKernel``, ``memsetAsync`` and ``synchronize``
return at once; a status read-back reports valid rows. :func:`installed` puts it in place of CuPy for a ``with``
block (and puts back whatever was there, a real CuPy included).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import types

import numpy as np

_FIRST_ADDRESS = 1 << 40


class _Memory:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __add__(self, offset: int):
        return _Memory(self.ptr + offset)


class _Flags:
    c_contiguous = True
    f_contiguous = False


class ndarray:
    """Shape, dtype, C-contiguous strides and a device address (on device 0); no data."""

    __module__ = "cupy"
    flags = _Flags()
    device = types.SimpleNamespace(id=0)

    def __init__(self, shape, dtype=np.float64, memptr=None):
        self.shape = shape = tuple(int(s) for s in shape)
        self.dtype = dtype = np.dtype(dtype)
        self.ndim = len(shape)
        self.size = math.prod(shape)
        self.itemsize = dtype.itemsize
        self.nbytes = self.size * self.itemsize
        strides, step = [], self.itemsize
        for extent in reversed(shape):
            strides.append(step)
            step *= extent
        self.strides = tuple(reversed(strides))
        self.data = memptr if memptr is not None else _Memory(_FIRST_ADDRESS)

    @property
    def __cuda_array_interface__(self):
        return {"data": (self.data.ptr, False), "shape": self.shape, "typestr": self.dtype.str, "strides": None,
                "version": 3}

    def reshape(self, *shape):
        shape = list(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        if -1 in shape:
            shape[shape.index(-1)] = self.size // math.prod(s for s in shape if s != -1)
        return ndarray(shape, self.dtype, self.data)

    def astype(self, dtype, copy=True):
        return self if np.dtype(dtype) == self.dtype and not copy else ndarray(self.shape, dtype)

    def view(self, dtype):
        return ndarray(self.shape, dtype, self.data)

    def fill(self, value):
        pass

    def __len__(self):
        return self.shape[0]


def _copy_valid_status(destination, source, nbytes, kind, stream):
    status = np.zeros((nbytes // 32, 4), np.int64)
    status[:, 2] = 1 << 20  # every row: 2^20 positive weights, nothing bad
    ctypes.memmove(destination, status.ctypes.data, nbytes)


class _Stream:
    ptr = 0

    def synchronize(self):
        pass


_STREAM = _Stream()


def module() -> types.SimpleNamespace:
    """The stand-in ``cupy`` module."""
    runtime = types.SimpleNamespace(getDevice=lambda: 0, memsetAsync=lambda *args: None, free=lambda ptr: None,
                                    memcpyAsync=_copy_valid_status, memcpyDeviceToHost=2)
    driver = types.SimpleNamespace(ctxGetCurrent=lambda: 1, launchKernel=lambda *args: None)
    cuda = types.SimpleNamespace(alloc=lambda nbytes: _Memory(_FIRST_ADDRESS), driver=driver, runtime=runtime,
                                 get_current_stream=lambda: _STREAM, alloc_pinned_memory=lambda nbytes: bytearray(nbytes))
    return types.SimpleNamespace(
        ndarray=ndarray, cuda=cuda, float32=np.float32, float64=np.float64,
        empty=lambda shape, dtype=np.float64: ndarray((shape,) if isinstance(shape, int) else shape, dtype),
        ascontiguousarray=lambda array: array)


@contextlib.contextmanager
def installed():
    """CuPy replaced by the stand-in inside the block: ``atskern._backend``'s module and the kernel handles
    (every kernel is handle 1, nothing is compiled); everything is put back after."""
    from atskern import _backend
    from atskern.gpu import patches, sampling

    saved = (_backend._cupy, sampling._handle, sampling._multiprocessors, patches._handle)
    _backend._cupy = module()
    sampling._handle = lambda name, options, device_id: 1
    sampling._multiprocessors = lambda device_id: 132
    patches._handle = lambda name, device: 1
    sampling.recorded_call.cache_clear()
    try:
        yield _backend._cupy
    finally:
        _backend._cupy, sampling._handle, sampling._multiprocessors, patches._handle = saved
        sampling.recorded_call.cache_clear()
