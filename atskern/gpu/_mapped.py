"""A thread's page-locked host buffer mapped into the device's address space: kernels store into it directly.

``atskern.gpu.sampling`` hands it to a validated call (``MAPPED_STATUS``): the block that writes the status's
summary row copies the whole status into it, so the host reads it after one wait for the stream, with no
device-to-host copy queued behind the kernels. One buffer per thread, grown as needed and reused by the thread's
next call: a call reads its status before the thread issues another (``sampling.read_status``; a call interrupted
before its read, then a call on another stream, could see the first call's late copy).

The buffer comes from ``cudaHostAlloc`` with the portable and mapped flags; the address a kernel uses on the current
device is ``cudaPointerGetAttributes``' device pointer (with unified addressing it is usually the host address, not
always: it is asked per device). Where the device cannot map it, :func:`status_buffer` returns None and the caller
keeps the status in device memory.
"""

from __future__ import annotations

import threading

import numpy as np

from .._backend import cupy

HOST_ALLOC_PORTABLE = 1  # cudaHostAllocPortable
HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped
MIN_BYTES = 4096


class _HostAllocation:
    """``nbytes`` of page-locked, device-mapped host memory, freed when the last array viewing it is collected (its
    ``__array_interface__`` makes it the base of those arrays)."""

    def __init__(self, nbytes: int):
        runtime = cupy().cuda.runtime
        self._free = runtime.freeHost
        self.nbytes = int(nbytes)
        self.host = int(runtime.hostAlloc(self.nbytes, HOST_ALLOC_PORTABLE | HOST_ALLOC_MAPPED))

    @property
    def __array_interface__(self):
        return {"shape": (self.nbytes // 8,), "typestr": "<i8", "data": (self.host, False), "version": 3}

    def __del__(self):
        host, self.host = getattr(self, "host", 0), 0
        if host:
            try:
                self._free(host)
            except Exception:  # interpreter shutdown: CUDA may be gone first
                pass


class MappedBuffer:
    """``nbytes`` of page-locked, device-mapped host memory: ``words``, an int64 NumPy view of all of it (an array
    viewing it keeps the memory alive), and its address in each device's kernels (:meth:`device_address`)."""

    def __init__(self, nbytes: int):
        allocation = _HostAllocation(nbytes)
        self.nbytes, self.host = allocation.nbytes, allocation.host
        self.words = np.asarray(allocation)
        self._devices = {}

    def device_address(self, device_id: int) -> int:
        """The buffer's address in kernels of device ``device_id`` (the current one when called); 0 if unmapped."""
        address = self._devices.get(device_id)
        if address is None:
            try:
                address = int(cupy().cuda.runtime.pointerGetAttributes(self.host).devicePointer)
            except Exception:  # a device without mapped host memory: CUDARuntimeError
                address = 0
            self._devices[device_id] = address
        return address


class _Buffers(threading.local):
    def __init__(self):
        self.buffer = None


_buffers = _Buffers()


def status_buffer(shape, device_id: int):
    """This thread's mapped buffer as an int64 array of ``shape`` and that array's device address on ``device_id``
    (grown as needed; the previous contents are not kept), or None where the device cannot map host memory."""
    nbytes = 8 * int(np.prod(shape))
    buffer = _buffers.buffer
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _buffers.buffer = MappedBuffer(max(nbytes, MIN_BYTES))
    address = buffer.device_address(device_id)
    if not address:
        return None
    return buffer.words[: nbytes // 8].reshape(shape), address
