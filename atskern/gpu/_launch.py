"""Kernel launches through the CUDA driver, arguments packed here: the host cost of a launch is a few µs.

CuPy's ``RawKernel.__call__`` converts each argument by type (about 0.6 µs an argument: 22 µs for the 30 of
``finish_rows`` on an H100 host, 6 µs for none), and the sampling and patch kernels take 14 to 30. Here every
argument goes into an 8-byte slot as a 64-bit integer (a device address, an integer, or a NumPy integer scalar)
and ``cuLaunchKernel`` copies from each slot as many bytes as the kernel's parameter has: the low bytes, which on
a little-endian host hold the same value for a 4-byte ``int``. Every parameter of these kernels is a pointer or an
integer of at most 8 bytes (no floating-point scalars, no structs). The argument count is not checked at launch
(the driver takes the kernel's own); the CPU tests check every launch list of both modules against the
parameter lists of the preprocessed CUDA sources (``tests/test_cuda_signatures.py``).

The slots are per thread and per argument count, so concurrent launches from several threads do not share them;
the driver copies the arguments before ``launchKernel`` returns.

A driver-API launch runs in the calling thread's current context, and a thread that has made no CUDA runtime call
has none (CuPy's own launches guard against this; CuPy issue #72): a launch that finds no current context makes the
current device's primary context current with a harmless runtime call (``cudaFree(0)``), never during a stream
capture (a capturing thread has a context).
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from .._backend import cupy

WORD = (1 << 64) - 1


class _Slots(threading.local):
    def __init__(self):
        self.by_count = {}


_slots = _Slots()


def _table(count: int):
    """This thread's slots for ``count`` arguments: (writable bytes, address of the pointer table, packer, and the
    two arrays behind them, kept alive with the entry)."""
    entry = _slots.by_count.get(count)
    if entry is None:
        values = np.zeros(max(count, 1), np.uint64)
        pointers = (values.ctypes.data + 8 * np.arange(max(count, 1), dtype=np.uint64)).astype(np.uint64)
        entry = (memoryview(values).cast("B"), int(pointers.ctypes.data), struct.Struct(f"<{count}Q"), values, pointers)
        _slots.by_count[count] = entry
    return entry


def word(arg) -> int:
    """An argument as the unsigned 64-bit word of its slot: a Python or NumPy integer (two's complement), None (a
    null pointer), or a device array (its address: CuPy's ``.data.ptr``, else ``__cuda_array_interface__``)."""
    if type(arg) is int:
        return arg & WORD
    if arg is None:
        return 0
    data = getattr(arg, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is not None:
        return ptr
    if isinstance(arg, (np.integer, bool, np.bool_)):
        return int(arg) & WORD
    interface = getattr(arg, "__cuda_array_interface__", None)
    if interface is not None:
        return interface["data"][0]
    raise TypeError(f"a kernel argument must be an integer, None or a device array, got {type(arg).__name__}")


def pack(args) -> list:
    """The slot words of a launch's arguments (:func:`word` of each)."""
    return [a & WORD if type(a) is int else word(a) for a in args]


def bind_context(cp) -> None:
    """Make the current device's primary context current where this thread has none (see the module docstring)."""
    if cp.cuda.driver.ctxGetCurrent() == 0:
        cp.cuda.runtime.free(0)


def launch(function, grid, block, args, stream=None):
    """Launch ``function`` (a CuPy ``RawKernel`` of the current device, or its ``CUfunction`` address) on ``grid``
    x ``block`` (1 to 3 dims each) with ``args`` on ``stream`` (a CuPy stream or a ``CUstream`` address; default:
    CuPy's current stream). Asynchronous, CUDA-graph capturable."""
    cp = cupy()
    bind_context(cp)
    handle = function if type(function) is int else function.kernel.ptr
    if stream is None:
        stream = cp.cuda.get_current_stream().ptr
    elif type(stream) is not int:
        stream = stream.ptr
    view, table, packer, _, _ = _table(len(args))
    packer.pack_into(view, 0, *pack(args))
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    cp.cuda.driver.launchKernel(handle, gx, gy, gz, bx, by, bz, 0, stream, table, 0)
