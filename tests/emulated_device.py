"""Just enough of CuPy, backed by host memory, for atskern's GPU code to run end to end on the host builds of the
kernels (``tests/cuda_host``): the sampling backend and its read-back, and the public front ends
(``atskern.sample``, ``atskern.extract_patches``, ``atskern.scatter_patches``) with their launches.

A device array is a NumPy array in host memory whose type poses as CuPy's (:class:`DeviceArray`: ``.data.ptr`` is
its address). An allocation is host memory filled with a byte pattern (a missed zeroing shows), the memset is
``ctypes.memset``, and ``driver.launchKernel`` reads the packed argument slots back (as wide as each parameter of the
kernel) and calls the host launcher: the untyped launch path of the CuPy code, end to end.
"""

from __future__ import annotations

import ctypes
import math
import sys
import types

import numpy as np

from .cuda_host_build import C_TYPES, kernel_parameters


class DeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy one (its type's module is ``cupy``; ``.data.ptr`` is its address)."""

    __module__ = "cupy"
    device = types.SimpleNamespace(id=0)

    @property
    def data(self):
        return Memory(self.ctypes.data)

    def get(self):
        return np.array(self)

    @property
    def __cuda_array_interface__(self):
        return {"data": (self.ctypes.data, False), "shape": self.shape, "typestr": self.dtype.str,
                "strides": self.strides, "version": 3}


def device_array(array) -> DeviceArray:
    """``array`` (any NumPy array: its address, strides and memory kept) as a :class:`DeviceArray`."""
    return array.view(DeviceArray)


def at_address(shape, dtype, ptr: int, strides=None) -> DeviceArray:
    """The array ``(shape, dtype, strides)`` whose element 0 lies at host address ``ptr`` (memory the caller keeps
    alive), as ``cupy.ndarray(shape, dtype, memptr=..., strides=...)`` makes it."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if strides is None:
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * dtype.itemsize for i in range(len(shape)))
    if math.prod(shape) == 0:
        return np.empty(shape, dtype).view(DeviceArray)
    low = ptr + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = ptr + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + dtype.itemsize
    memory = np.frombuffer((ctypes.c_uint8 * (high - low)).from_address(low), np.uint8)
    return np.ndarray(shape, dtype, buffer=memory, offset=ptr - low, strides=strides).view(DeviceArray)


def placed(array, shift=0, strides=None):
    """A device copy of ``array`` whose element 0 lies ``shift`` bytes past a 256-byte boundary (with negative
    strides: its lowest byte); ``strides``: per axis, the step between elements in units of the axis's contiguous
    stride (2: every other slot; negative: the axis reversed), a layout that no two elements share."""
    array = np.asarray(array)
    steps = (1,) * array.ndim if strides is None else strides
    shape = array.shape
    byte_strides, block = [], array.itemsize  # block: the bytes one step of the next axis out must clear
    for n, k in zip(reversed(shape), reversed(steps)):
        byte_strides.insert(0, block * k)
        block *= abs(k) * n
    span = sum((n - 1) * abs(s) for n, s in zip(shape, byte_strides)) + array.itemsize if array.size else 0
    raw = np.zeros(span + 512, np.uint8)
    first = -(-raw.ctypes.data // 256) * 256 + shift
    first += sum((n - 1) * -s for n, s in zip(shape, byte_strides) if s < 0)
    view = np.ndarray(shape, array.dtype, buffer=raw, offset=first - raw.ctypes.data, strides=tuple(byte_strides))
    view[...] = array
    return view.view(DeviceArray)


def install(monkeypatch, lib, source, modules) -> "EmulatedDevice":
    """An :class:`EmulatedDevice` of the host build ``lib`` (the kernels of ``atskern/gpu/<source>``, handle ``i`` for
    the ``i``-th kernel name in sorted order) put in place of CuPy for ``modules`` (their ``cupy()``) and for an
    ``import cupy`` (``atskern._validation``'s overlap check), until ``monkeypatch`` undoes it."""
    device = EmulatedDevice(lib, sorted(kernel_parameters(source)), source)
    for module in modules:
        monkeypatch.setattr(module, "cupy", lambda: device.module)
    monkeypatch.setitem(sys.modules, "cupy", device.module)
    return device


class EmulatedDevice:
    """The stand-in CuPy module (``.module``) of one host build ``lib`` of the kernels of ``source``
    (``atskern/gpu/<source>``); ``names[handle]`` is the kernel that handle ``handle`` launches. ``launched`` lists the
    kernels and memsets issued, ``waits`` the stream synchronizations."""

    def __init__(self, lib, names, source):
        self.lib, self.names, self.source, self.buffers, self.launched = lib, names, source, [], []
        self.host_buffers, self.waits = {}, 0
        stream = types.SimpleNamespace(ptr=0, synchronize=self.synchronize)
        cuda = types.SimpleNamespace(
            alloc=self.alloc, alloc_pinned_memory=lambda size: np.zeros(size, np.uint8),
            runtime=types.SimpleNamespace(getDevice=lambda: 0, memsetAsync=self.memset, memcpyAsync=self.memcpy,
                                          memcpyDeviceToHost=2, hostAlloc=self.host_alloc, freeHost=self.free_host,
                                          pointerGetAttributes=self.pointer_attributes),
            driver=types.SimpleNamespace(launchKernel=self.launch_kernel, ctxGetCurrent=lambda: 1),
            get_current_stream=lambda: stream)
        self.module = types.SimpleNamespace(
            cuda=cuda, ndarray=self.ndarray, empty=self.empty, ascontiguousarray=self.ascontiguousarray,
            asarray=self.asarray, zeros=self.zeros, uint8=np.uint8, float64=np.float64, int64=np.int64,
            may_share_memory=np.may_share_memory, shares_memory=np.shares_memory)

    def synchronize(self):
        self.waits += 1

    def host_alloc(self, size, flags):
        """Mapped host memory: on the emulated device, host memory at the same address (a byte pattern first)."""
        assert flags == 3  # cudaHostAllocPortable | cudaHostAllocMapped
        buffer = np.full(size, 0x5A, np.uint8)
        self.host_buffers[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def free_host(self, ptr):
        del self.host_buffers[ptr]

    def pointer_attributes(self, ptr):
        assert ptr in self.host_buffers
        return types.SimpleNamespace(devicePointer=ptr)

    def alloc(self, size):
        buffer = np.full(size, 0xA5, np.uint8)
        self.buffers.append(buffer)
        return Memory(buffer.ctypes.data, size)

    def ndarray(self, shape, dtype, memptr, strides=None):
        return at_address(shape, dtype, memptr.ptr, strides)

    def empty(self, shape, dtype=np.float64):
        """A fresh C-contiguous array at a 256-byte aligned address (as CuPy's allocator gives), a byte pattern
        first."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        memory = self.alloc(math.prod(shape) * np.dtype(dtype).itemsize + 256)
        return at_address(shape, dtype, -(-memory.ptr // 256) * 256)

    def zeros(self, shape, dtype=np.float64):
        out = self.empty(shape, dtype)
        out[...] = 0
        return out

    def ascontiguousarray(self, array):
        if array.flags.c_contiguous:
            return array
        out = self.empty(array.shape, array.dtype)
        out[...] = array
        return out

    def asarray(self, array, dtype=None):
        if isinstance(array, DeviceArray) and (dtype is None or array.dtype == dtype):
            return array
        host = np.asarray(array, dtype)
        out = self.empty(host.shape, host.dtype)
        out[...] = host
        return out

    def memset(self, ptr, value, size, stream):
        ctypes.memset(ptr, value, size)
        self.launched.append("memset")

    def memcpy(self, dst, src, size, kind, stream):
        ctypes.memmove(dst, src, size)

    def launch_kernel(self, handle, gx, gy, gz, bx, by, bz, shared, stream, table, extra):
        name = self.names[handle]
        kinds = kernel_parameters(self.source)[name]
        words = [ctypes.c_uint64.from_address(ctypes.c_uint64.from_address(table + 8 * i).value).value
                 for i in range(len(kinds))]
        width = {"i32": 32, "u32": 32, "i64": 64, "u64": 64, "ptr": 64}
        values = []
        for kind, word in zip(kinds, words):
            word &= (1 << width[kind]) - 1
            if kind in ("i32", "i64") and word >> (width[kind] - 1):
                word -= 1 << width[kind]
            values.append((word or None) if kind == "ptr" else word)
        assert (gy, gz, by, bz, shared, extra) == (1, 1, 1, 1, 0, 0)
        function = getattr(self.lib, "host_" + name)
        function.argtypes = [ctypes.c_uint, ctypes.c_uint] + [C_TYPES[k] for k in kinds]
        function(gx, bx, *values)
        self.launched.append(name)


class Memory:
    """A device allocation as atskern uses one: an address, ``+ offset``, and its size."""

    def __init__(self, ptr, size=None):
        self.ptr, self.size = ptr, size

    def __add__(self, offset):
        return Memory(self.ptr + offset)
