"""The Numba threading layer of the parallel kernels: safe under ``fork`` and concurrent Python threads by default.

Numba picks its layer once, when the first parallel kernel is compiled or
launched. Its defaults fail where users put data loading:

- GNU OpenMP (``omp``, picked when TBB is absent) kills a child forked from a
  process that already ran a parallel kernel ("fork() called from a process
  already using GNU OpenMP"): ``multiprocessing`` fork pools hang, torch
  ``DataLoader`` workers die;
- ``workqueue`` is fork-safe but aborts the process when two Python threads
  launch parallel kernels at once.

So, before any kernel is compiled, :func:`select` chooses ``tbb`` (fork- and
thread-safe; the ``tbb`` wheel is a dependency). pip puts ``libtbb.so.12`` in
``<prefix>/lib``, which the dynamic loader does not search, so it is loaded
by path first. Without a usable TBB the kernels run on ``workqueue`` with a
process-wide lock around each public CPU call (:mod:`atskern._serial`;
fork-safe; threads take turns, the kernels themselves still run on every core), and a warning says how to
get TBB. A user's ``NUMBA_THREADING_LAYER`` is respected; the lock is added
whenever the layer can be ``workqueue``. Draws do not depend on the layer or
the thread count (counter-based generator, fixed work decomposition).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import threading
import warnings

import numba

from .. import _fork_guard

TBB_LIBRARIES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}
INSTALL_HINT = "pip install tbb (a dependency of atskern)"

_lock = threading.RLock()


def _reset_lock_in_child():
    global _lock
    _lock = threading.RLock()  # a fork taken while another thread held it must not inherit a held lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def _launched() -> bool:
    from numba.np.ufunc import parallel

    return bool(getattr(parallel, "_is_initialized", False))


def _load_tbb() -> bool:
    """Whether Numba's TBB layer can load, after loading the pip wheel's ``libtbb`` by path if needed."""
    name = TBB_LIBRARIES.get(sys.platform, TBB_LIBRARIES["linux"])
    try:
        for entry in importlib.metadata.files("tbb") or ():
            if entry.name == name:
                ctypes.CDLL(str(entry.locate()), mode=getattr(os, "RTLD_GLOBAL", 0))
                break
    except (importlib.metadata.PackageNotFoundError, OSError):
        pass
    try:
        from numba.np.ufunc import parallel, tbbpool  # noqa: F401 - needs libtbb loadable

        parallel._check_tbb_version_compatible()
    except (ImportError, OSError, AttributeError):
        return False
    return True


_MAY_PICK_TBB = ("tbb", "safe", "threadsafe", "forksafe", "default")
"""Settings of ``NUMBA_THREADING_LAYER`` under which Numba takes TBB when it can (``safe`` takes nothing else)."""


def _select() -> tuple[str, bool]:
    """``(layer, needs_lock)``; sets ``numba.config.THREADING_LAYER`` unless the user or a launch already did."""
    if _launched():
        layer = numba.threading_layer()
        return layer, layer == "workqueue"
    requested = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    configured = str(numba.config.THREADING_LAYER).lower()
    if not requested and configured != "default":  # set in code (numba.config) before atskern loaded
        requested = configured
    if requested:
        if requested in _MAY_PICK_TBB:
            _load_tbb()  # Numba finds the tbb wheel's library only once it is loaded
        if requested in ("omp", "threadsafe"):
            # OpenMP workers spinning next to TensorFlow's busy threads turned a 0.1 ms sample call into
            # 24 ms on a loaded 2-core machine; passive waiting avoids it (an explicit setting wins)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return requested, requested not in ("tbb", "omp", "threadsafe", "safe")
    if _load_tbb():
        numba.config.THREADING_LAYER = "tbb"
        return "tbb", False
    warnings.warn(
        "atskern: Intel TBB could not be loaded, so the CPU kernels run on Numba's 'workqueue' threading layer, "
        "one parallel kernel at a time across Python threads (fork-safe and thread-safe, but concurrent calls "
        f"wait for each other). For concurrent kernels: {INSTALL_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue", True


LAYER, NEEDS_LOCK = _select()


def _one_kernel_thread() -> None:
    """The calling thread's parallel kernels on one thread: a one-slot task arena, which needs no TBB worker (a
    forked child at risk, see ``atskern._fork_guard``)."""
    numba.set_num_threads(1)


_fork_guard.GUARD.single_thread = _one_kernel_thread


PARALLEL_SYMBOLS = (
    b"numba_parallel_for",
    b"do_scheduling_signed",
    b"do_scheduling_unsigned",
    b"allocate_sched",
    b"deallocate_sched",
    b"get_num_threads",
    b"set_num_threads",
    b"get_thread_id",
    b"set_parallel_chunksize",
    b"get_parallel_chunksize",
    b"get_sched_size",
)
"""The C functions of the threading layer that compiled code calls by name. Numba tells the JIT where they are
only when it starts the layer (``numba.np.ufunc.parallel._launch_threads``): code linked before that gets null
addresses for them."""


def launch():
    """Start the threading layer chosen above now (no-op once started), so the :data:`PARALLEL_SYMBOLS` resolve.

    Numba does this when it compiles a parallel kernel, and when it loads one from its disk cache, but not when it
    loads a cached kernel that only *calls* a parallel one it had itself loaded from the cache: such an entry
    records nothing to re-run (Numba issues 8578 and 9938), and the first call jumps to address 0.
    """
    from numba.np.ufunc import parallel

    parallel._launch_threads()


def launch_lock():
    """The process-wide lock around CPU kernel calls where the layer needs one (``workqueue``), else None."""
    return _lock if NEEDS_LOCK else None
