"""CuPy arrays whose elements a CUDA kernel cannot address, and their byte-wise copies.

A CUDA load or store of a ``T`` faults ("misaligned address", which ends the process's CUDA context) unless its
address is a multiple of ``T``'s size. CuPy lets a view start at any byte (a ``memptr`` offset, a byte slice viewed
as a wider dtype), so an array's address or strides need not be multiples of its item size. atskern's kernels, and
CuPy's own typed kernels (``ascontiguousarray`` and ``astype`` included), would fault on such an array. The GPU front
ends therefore copy a misaligned input byte by byte into a fresh array (CuPy allocations are 256-byte aligned) and
write a misaligned output through its bytes: the results are those of an aligned array, and no kernel sees another
address.
"""

from __future__ import annotations

from .._backend import cupy


def misaligned(*arrays) -> bool:
    """Whether the address or one of the strides of one of ``arrays`` is not a multiple of its item size (a power
    of two). One call for all of a kernel's arrays: it is on every GPU call's host path."""
    for array in arrays:
        item = array.dtype.itemsize
        if item > 1:
            bits = array.data.ptr
            for stride in array.strides:
                bits |= stride
            if bits & (item - 1):
                return True
    return False


def byte_view(array):
    """``array``'s bytes as a ``uint8`` array ``(*shape, itemsize)`` over the same memory (any address, any strides:
    a one-byte element is always aligned)."""
    cp = cupy()
    item = array.dtype.itemsize
    return cp.ndarray(array.shape + (item,), cp.uint8, memptr=array.data, strides=array.strides + (1,))


def aligned_copy(array):
    """A C-contiguous copy of ``array`` in a fresh allocation, made by one-byte copies (a typed read of ``array``
    itself would fault)."""
    copy = cupy().empty(array.shape, array.dtype)
    write_through_bytes(copy, array)
    return copy


def aligned(array):
    """``array`` itself, or its :func:`aligned_copy` where it is :func:`misaligned`."""
    return aligned_copy(array) if misaligned(array) else array


def aligned_output(out):
    """Where a kernel writes the result meant for ``out``: ``out`` itself, or a fresh array where it is
    :func:`misaligned` (then :func:`written_back`)."""
    return cupy().empty(out.shape, out.dtype) if misaligned(out) else out


def written_back(out, written):
    """``out``, holding what the kernel wrote into ``written`` (:func:`aligned_output`)."""
    if written is not out:
        write_through_bytes(out, written)
    return out


def write_through_bytes(out, result) -> None:
    """``out[...] = result`` (same shape and dtype), ``out`` at any address: one-byte copies."""
    byte_view(out)[...] = byte_view(result)
