"""Zero-copy handover of torch tensors to atskern's kernels (NumPy on the CPU, CuPy on CUDA) and back.

CPU tensors become NumPy views (``Tensor.numpy()``) and kernel results come
back through ``torch.from_numpy``: no copy either way. CUDA tensors cross
through DLPack (``cupy.from_dlpack`` / ``torch.from_dlpack``) while CuPy's
current stream is torch's current stream (:func:`kernel_stream`), so the
kernels are ordered after the work that produced their inputs and before the
work that reads their outputs without any synchronization.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import torch

from atskern import _backend

# torch dtypes NumPy has no twin for, moved as same-size integers (gathers only move bytes)
_BYTE_TWINS = {torch.bfloat16: torch.int16}


def cupy():
    """The ``cupy`` module (atskern's, imported once), or an ImportError saying how to install it."""
    try:
        return _backend.cupy()
    except ImportError:
        raise ImportError("ats.torch needs CuPy for CUDA tensors: pip install 'atskern[cuda12]' (CUDA 12) or "
                          "'atskern[cuda13]' (CUDA 13)") from None


def byte_twin(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a same-size integer view when NumPy/CuPy have no such dtype (bfloat16)."""
    twin = _BYTE_TWINS.get(tensor.dtype)
    return tensor if twin is None else tensor.view(twin)


def to_kernel(tensor: torch.Tensor, *, strided: bool = False):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``tensor``'s memory (made C-contiguous first if needed).

    ``strided=True`` hands a CPU tensor over with its own strides (a ``channels_last``, sliced or expanded
    image: the CPU gather reads any layout in place, where a contiguous copy would cost the whole image per
    call). On CUDA call it inside :func:`kernel_stream`.
    """
    tensor = tensor.detach()
    if strided and tensor.device.type == "cpu":
        return tensor.numpy()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    if tensor.device.type == "cuda":
        return cupy().from_dlpack(tensor)
    raise TypeError(f"ats.torch kernels run on CPU and CUDA tensors, got a tensor on {tensor.device}")


def from_kernel(array) -> torch.Tensor:
    """A torch tensor sharing a kernel result's memory (``torch.from_numpy`` or ``torch.from_dlpack``)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


@contextlib.contextmanager
def kernel_stream(device: torch.device):
    """Run CuPy kernels on torch's current CUDA stream of ``device``, their temporaries from torch's allocator
    (no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    cp = cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cp.cuda.Device(index):
        with _cupy_stream(torch.cuda.current_stream(index).cuda_stream, index), cp.cuda.using_allocator(_torch_allocator):
            yield


@functools.lru_cache(maxsize=64)
def _cupy_stream(pointer: int, index: int):
    """CuPy's handle of torch's stream ``pointer`` on device ``index`` (made once per stream: CuPy warns on each)."""
    cp = cupy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 deprecates ExternalStream for from_external
        return cp.cuda.ExternalStream(pointer, index)


def _torch_allocator(size: int):
    """CuPy allocations from torch's caching allocator (on torch's current device and stream), so a CUDA graph
    that torch captures owns every temporary of a kernel call (its private pool during capture)."""
    cp = cupy()
    buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=torch.device("cuda", cp.cuda.Device().id))
    memory = cp.cuda.UnownedMemory(buffer.data_ptr(), buffer.numel(), buffer)
    return cp.cuda.MemoryPointer(memory, 0)
