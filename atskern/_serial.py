"""Public CPU calls counted by the fork guard (``atskern._fork_guard``: no fork while one runs in another thread),
and behind the threading layer's launch lock where it needs one (``atskern.cpu._threading``).

Numba's ``workqueue`` layer (the fallback where TBB cannot be loaded) aborts
the process when two Python threads launch parallel kernels at once; the lock
makes them take turns. Parallel kernels are also launched from inside other
compiled functions, so the lock is taken here, around each public call, not
around each kernel. With TBB (the default) no lock is taken. CuPy calls never
take either and never import Numba.
"""

from __future__ import annotations

import functools

from ._backend import is_cupy_array
from ._fork_guard import GUARD
from ._fpenv import ieee_subnormals


def _first_array(args):
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return first


_threading = None
"""``atskern.cpu._threading``, imported on the first CPU call (a CuPy call never imports Numba)."""


def _launch_lock():
    global _threading
    if _threading is None:
        from .cpu import _threading
    return _threading.launch_lock()


def cpu_serialized(function, module: str):
    """``function`` for CPU arrays counted by the fork guard, and behind the launch lock when the threading layer
    needs it; named as the attribute of ``module`` that holds it (so ``pickle`` finds it there: multiprocessing
    pools, spawned DataLoader workers)."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        if is_cupy_array(_first_array(args)):
            return function(*args, **kwargs)
        level = None
        try:
            level = GUARD.enter()
            lock = _launch_lock()
            with ieee_subnormals():
                if lock is None:
                    return function(*args, **kwargs)
                with lock:
                    return function(*args, **kwargs)
        finally:
            try:
                GUARD.exit(level)
            except BaseException:  # a KeyboardInterrupt inside exit: once more (it is idempotent), then raise
                GUARD.exit(level)
                raise

    call.__module__ = module
    return call
