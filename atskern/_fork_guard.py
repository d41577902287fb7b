"""Public CPU calls and ``fork``: no fork while a call runs in another thread, one kernel thread in a child at risk.

Numba's TBB layer stops its worker threads before a fork and starts them
again after it, but only when the forking thread is the one that started
the layer and no other thread is attached to it ("Unable to join threads to
shut down before fork()", "Attempted to fork from a non-main thread"). Else
the child inherits a thread pool whose threads it does not have, and its
parallel kernels can wait for them for ever: ``DataLoader`` workers forked
while another thread sampled, or after a thread other than the forking one
had run the kernels (TensorFlow calls them from its own threads), hung that
way. So:

- every public CPU call is counted, a fork waits until no other thread is
  inside one (``os.register_at_fork``), and no call starts until the fork is
  done: the pool is never forked in the middle of a parallel region, nor of
  a compilation;
- a child forked after another thread than the forking one made a CPU call
  runs its kernels on its calling thread (Numba's ``set_num_threads(1)`` in
  each of its threads: a one-slot task arena needs no worker), as PyTorch's
  data-loader workers run their own ops. Draws do not depend on it.
"""

from __future__ import annotations

# logging registers fork hooks when first imported (Numba imports it on a first CPU call); imported during a fork's
# wait, its after-fork hook would release a lock its before-fork hook never took: imported before the guard's hooks
import logging  # noqa: F401
import os
import threading
import time
import warnings

PATIENCE_S = 600.0
"""How long a fork waits for the calls in flight before it goes ahead with a warning (a call that never ends
must not hang the process that forks)."""


class ForkGuard:
    """Counts the calls in flight (a thread's nested calls once) and the threads that made one; :meth:`before_fork`
    waits for the other threads' calls to end and holds new ones back until :meth:`after_fork_in_parent`."""

    def __init__(self):
        self._local = threading.local()
        self._callers: set[int] = set()
        self._child_at_risk = False
        self.single_threaded = False
        """Whether this process is a child at risk (see the module docstring): :meth:`enter` then calls
        :attr:`single_thread` once in each thread."""
        self.single_thread = None
        """A callable making the calling thread's CPU kernels run on it alone (set by ``atskern.cpu._threading``)."""
        self._fresh_state(set())

    def _fresh_state(self, in_call: set[int]) -> None:
        self._lock = threading.Lock()
        self._state = threading.Condition(self._lock)  # waits on the lock taken as such (a C-level ``with``)
        self._in_call = in_call
        """The threads inside a public call: one ``add``/``discard`` each, which an exception cannot split."""
        self._forking = False

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def enter(self) -> int:
        """Count a public call of this thread (not a nested one); returns the call's nesting level for
        :meth:`exit`. Call it inside the ``try`` whose ``finally`` calls :meth:`exit`: whatever line an exception
        (a KeyboardInterrupt) stops it at, :meth:`exit` undoes exactly what it did (a thread is in
        ``_in_call`` or not, one set operation each way)."""
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        if depth == 0:
            if self.single_threaded and not getattr(local, "single", False) and self.single_thread is not None:
                self.single_thread()
                local.single = True
            with self._lock:
                while self._forking:
                    self._state.wait()
                self._in_call.add(threading.get_ident())
            if not getattr(local, "known", False):
                with self._lock:
                    self._callers.add(threading.get_ident())
                local.known = True
        return depth + 1

    def exit(self, level: int | None = None) -> None:
        """End the call :meth:`enter` returned ``level`` for (None: this thread's innermost). Idempotent for a
        given level, so a caller whose ``exit`` was interrupted can call it again."""
        local = self._local
        level = self._depth() if level is None else level
        if level <= 1:
            with self._lock:
                self._in_call.discard(threading.get_ident())
                if self._forking and not self._in_call:
                    self._state.notify_all()
        local.depth = max(level - 1, 0)

    def before_fork(self) -> None:
        me = threading.get_ident()  # a call of the forking thread itself cannot end before the fork
        deadline = time.monotonic() + PATIENCE_S
        with self._state:
            self._forking = True
            while self._in_call - {me}:
                left = deadline - time.monotonic()
                if left <= 0:
                    warnings.warn(f"atskern: forking while {len(self._in_call - {me})} CPU call(s) of other threads still "
                                  f"run after {PATIENCE_S:.0f} s; parallel kernels may hang in the child",
                                  RuntimeWarning, stacklevel=2)
                    break
                self._state.wait(left)
            self._child_at_risk = any(ident != me for ident in self._callers)

    def after_fork_in_parent(self) -> None:
        with self._state:
            self._forking = False
            self._state.notify_all()

    def after_fork_in_child(self) -> None:
        me = threading.get_ident()
        self._fresh_state({me} if me in self._in_call else set())  # the child has the forking thread only
        self._callers = {threading.get_ident()} if getattr(self._local, "known", False) else set()
        if self._child_at_risk:
            self.single_threaded = True
            self._local.single = False  # the forking thread too, at its next call


GUARD = ForkGuard()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=GUARD.before_fork, after_in_parent=GUARD.after_fork_in_parent,
                        after_in_child=GUARD.after_fork_in_child)
