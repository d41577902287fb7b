"""Reads in flight on a backend's file handle, counted so that closing the handle waits for them."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

_GUARDS = weakref.WeakSet()
"""Live guards: a forked child gives each a fresh lock (a parent thread may have held one at the fork) and no reads
(the parent's threads do not exist in the child)."""


def _fresh_in_child():
    for guard in list(_GUARDS):
        guard._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_in_child)


class ReadGuard:
    """Counts the threads using a backend's handle (a descriptor, an OpenSlide handle).

    ``with guard.reading(acquire) as handle`` runs ``acquire()`` under the
    guard's lock (it opens the handle if needed) and counts the block as a read
    in flight; ``with guard.idle():`` holds the lock once no read is in flight,
    so that the handle can be closed without pulling it from under a read.
    A pickled guard is unpickled without reads.
    """

    def __init__(self):
        self._reset()
        _GUARDS.add(self)

    def _reset(self):
        self._lock = threading.Condition()
        self.reads = 0

    def __reduce__(self):  # a new guard, without reads, whatever the pickle protocol
        return (ReadGuard, ())

    @contextlib.contextmanager
    def reading(self, acquire):
        """Yield ``acquire()`` (called under the lock), counted as a read until the block ends."""
        with self._lock:
            handle = acquire()
            self.reads += 1
        try:
            yield handle
        finally:
            with self._lock:
                self.reads -= 1
                self._lock.notify_all()

    @contextlib.contextmanager
    def idle(self):
        """Hold the lock from the moment no read is in flight until the block ends (reads starting meanwhile
        wait)."""
        with self._lock:
            while self.reads:
                self._lock.wait()
            yield
