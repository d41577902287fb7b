"""IEEE subnormal arithmetic for CPU calls made from threads that flush subnormals to zero.

TensorFlow's executor threads (``tf.function``, ``tf.numpy_function``) and XLA's CPU threads (``jax.pure_callback``)
run with the x86 MXCSR bits FTZ and DAZ set (on ARM, FPCR's FZ): there a subnormal weight (below 1.2e-38 in float32,
2.2e-308 in float64) reads as 0, in NumPy and in compiled kernels alike, so ``atskern.sample`` never drew such a
cell (or called its row empty) where the same call on the main thread draws it with its exact probability.
:func:`ieee_subnormals` puts the calling thread in the C library's default floating-point environment (IEEE
subnormals, round to nearest) for the duration of a call and restores the caller's afterwards; where the thread
does not flush it does nothing but two comparisons.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_SUBNORMAL = 5e-324
_SMALLEST_NORMAL = 2.2250738585072014e-308
_ZERO = 0.0
_HALF = 0.5
_ENV_BYTES = 512
"""Larger than any C library's ``fenv_t`` (32 bytes on x86-64 glibc, 8 on aarch64)."""


def flushing() -> bool:
    """Whether this thread reads subnormal inputs as 0 (DAZ) or flushes subnormal results to 0 (FTZ)."""
    # module globals, not literals: CPython would fold a constant expression when compiling, on another thread
    return not _SUBNORMAL > _ZERO or not _SMALLEST_NORMAL * _HALF > _ZERO


@functools.cache
def _c_library():
    """``(fegetenv, fesetenv, FE_DFL_ENV)`` of the C library (glibc and musl: ``FE_DFL_ENV`` is the pointer -1;
    macOS: ``_FE_DFL_ENV``), else None; loaded on the first call from a flushing thread (no library search, which
    runs a subprocess on Linux, at import)."""
    try:
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libm.so.6")
            except OSError:
                lib = ctypes.CDLL(None)  # the symbols the process has loaded (musl: libc holds them)
            default = ctypes.c_void_p(ctypes.c_size_t(-1).value)
        elif sys.platform == "darwin":
            lib = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
            default = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.in_dll(lib, "_FE_DFL_ENV")))
        else:
            return None
        get, set_ = lib.fegetenv, lib.fesetenv
    except (OSError, AttributeError, ValueError, TypeError):
        return None
    get.argtypes = set_.argtypes = [ctypes.c_void_p]
    get.restype = set_.restype = ctypes.c_int
    return get, set_, default


class ieee_subnormals:
    """``with ieee_subnormals():`` runs the body with IEEE subnormals on this thread if it flushes them, and restores
    the thread's environment afterwards (a class, not a generator: it wraps every CPU call)."""

    __slots__ = ("_saved",)

    def __enter__(self):
        self._saved = None
        library = _c_library() if flushing() else None
        if library is not None:
            get, set_, default = library
            saved = ctypes.create_string_buffer(_ENV_BYTES)
            if get(saved) == 0 and set_(default) == 0:
                self._saved = saved
        return self

    def __exit__(self, *exc_info):
        if self._saved is not None:
            _c_library()[1](self._saved)
            self._saved = None
        return False
