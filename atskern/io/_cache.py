"""Thread-safe LRU caches: decoded tiles within a byte budget, and the slides a process keeps open."""

from __future__ import annotations

import numbers
import os
import threading
import weakref
from collections import OrderedDict

import numpy as np


class TileCache:
    """Least-recently-used cache of decoded tiles, bounded by ``max_bytes``.

    Keys are hashable (the slides use ``(slide id, level, tile row, tile
    column)``), values NumPy arrays, stored read-only. Inserting past the
    budget evicts the least recently used tiles; a tile larger than the whole
    budget is not stored. ``max_bytes=0`` disables caching. Safe to use from
    several threads; after a fork the child gets a fresh lock (the contents,
    copied on write, stay valid).
    """

    def __init__(self, max_bytes: int = 256 << 20):
        if isinstance(max_bytes, (bool, np.bool_)) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0 (a byte budget), got {max_bytes!r}")
        self.max_bytes = int(max_bytes)  # NumPy integers too, as the readers' threads
        self._tiles: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def _checked_lock(self) -> threading.Lock:
        if self._pid != os.getpid():  # forked: the parent's lock may have been held by another thread
            self._lock = threading.Lock()
            self._pid = os.getpid()
        return self._lock

    def __len__(self) -> int:
        return len(self._tiles)

    def __contains__(self, key) -> bool:
        return key in self._tiles

    def get(self, key):
        """The cached tile, marked most recently used, or None."""
        with self._checked_lock():
            tile = self._tiles.get(key)
            if tile is None:
                self.misses += 1
                return None
            self._tiles.move_to_end(key)
            self.hits += 1
            return tile

    def put(self, key, tile) -> None:
        """Store ``tile`` (made read-only) and evict down to the budget."""
        size = int(tile.nbytes)
        if size > self.max_bytes:
            return
        tile.flags.writeable = False
        with self._checked_lock():
            old = self._tiles.pop(key, None)
            if old is not None:
                self.nbytes -= int(old.nbytes)
            self._tiles[key] = tile
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, evicted = self._tiles.popitem(last=False)
                self.nbytes -= int(evicted.nbytes)
                self.evictions += 1

    def clear(self) -> None:
        with self._checked_lock():
            self._tiles.clear()
            self.nbytes = 0

    def __repr__(self) -> str:
        return (f"TileCache({len(self._tiles)} tiles, {self.nbytes} of {self.max_bytes} bytes, "
                f"hits={self.hits}, misses={self.misses}, evictions={self.evictions})")


_OPEN_SLIDES = weakref.WeakSet()


def _forget_in_child() -> None:
    for slides in list(_OPEN_SLIDES):
        slides._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class OpenSlides:
    """The slides a process keeps open, at most ``maxsize``; opening another closes the least recently used.

    ``get(key, opener)`` returns the slide cached under ``key`` or ``opener()``
    (called outside the lock). A thread still reading an evicted slide
    finishes its read (``Slide.close`` waits for the reads in flight, and a
    read after a close opens the file again, to be closed when the slide is
    dropped). A forked child starts with none (the parent's stay the
    parent's).
    """

    def __init__(self, maxsize: int = 64):
        if isinstance(maxsize, (bool, np.bool_)) or not isinstance(maxsize, numbers.Integral) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1 (open slides), got {maxsize!r}")
        self.maxsize = int(maxsize)
        self._forget()
        _OPEN_SLIDES.add(self)

    def _forget(self) -> None:
        """No slides and a new lock: also in a forked child (the parent's slides and, maybe held, lock are not
        its own), before any thread of the child can look."""
        self._slides: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slides)

    def get(self, key, opener):
        """The slide under ``key``, marked most recently used, else ``opener()`` cached (closing the evicted)."""
        with self._lock:
            slide = self._slides.get(key)
            if slide is not None:
                self._slides.move_to_end(key)
                return slide
        opened = opener()
        with self._lock:
            slide = self._slides.setdefault(key, opened)
            self._slides.move_to_end(key)
            evicted = [opened] if slide is not opened else []  # another thread opened it meanwhile
            while len(self._slides) > self.maxsize:
                evicted.append(self._slides.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return slide

    def clear(self) -> None:
        """Close every slide and forget them."""
        with self._lock:
            slides = list(self._slides.values())
            self._slides.clear()
        for slide in slides:
            slide.close()
