"""Which backend runs a call: NumPy arrays go to the Numba kernels, CuPy arrays to CUDA.

CuPy is never imported here; an array is recognised as CuPy's by its type's
module, so ``import atskern`` needs only NumPy and Numba.
"""

from __future__ import annotations

import importlib
import importlib.util

CPU = "cpu"
GPU = "gpu"


def is_cupy_array(array) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def backend_of(**arrays) -> str:
    """``'gpu'`` if the named arrays are CuPy arrays, ``'cpu'`` otherwise; mixing is a TypeError."""
    kinds = {name: (GPU if is_cupy_array(a) else CPU) for name, a in arrays.items() if a is not None}
    found = set(kinds.values())
    if len(found) > 1:
        described = ", ".join(f"{name} is a {'CuPy' if k == GPU else 'NumPy'} array" for name, k in kinds.items())
        raise TypeError(f"arrays must all live on the same device: {described}")
    return found.pop() if found else CPU


def require_current_device(**arrays) -> None:
    """A ValueError naming the first CuPy array that is not on the current device (the kernels launch there and
    would read another device's memory: an illegal-address fault that ends the process's CUDA context)."""
    current = cupy().cuda.runtime.getDevice()
    for name, array in arrays.items():
        if array is not None and array.device.id != current:
            raise ValueError(f"{name} is on GPU {array.device.id} but the current device is GPU {current}; call "
                             f"under `with cupy.cuda.Device({array.device.id}):`")


_cupy = None


def cupy():
    """The ``cupy`` module (imported once, on the first GPU call), or an ImportError saying how to install it."""
    global _cupy
    if _cupy is None:
        if importlib.util.find_spec("cupy") is None:
            raise ImportError(
                "CuPy is needed for GPU arrays: pip install 'atskern[cuda12]' (CUDA 12) or 'atskern[cuda13]' (CUDA 13)"
            )
        _cupy = importlib.import_module("cupy")
    return _cupy


def array_module(backend: str):
    if backend == GPU:
        return cupy()
    import numpy

    return numpy
