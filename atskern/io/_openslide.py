"""The OpenSlide backend (optional): formats tifffile cannot read, and a reference for the tests."""

from __future__ import annotations

import os

import numpy as np

from ._deps import require
from ._guard import ReadGuard
from ._identity import changed_error, file_identity


class OpenSlideBackend:
    """Pyramid levels through OpenSlide's ``read_region`` (RGBA converted to RGB, transparent pixels 0).

    Thread-safe: ``close`` waits for the reads in flight (OpenSlide aborts the
    process when its handle is closed under a read); a later read opens the
    file again, as does a forked child (its own handle).
    """

    name = "openslide"
    kind = "openslide"

    def __init__(self, path: str):
        self.openslide = require("openslide")
        self.path = path
        self._identity = file_identity(os.stat(path))
        self._handle = None
        self._pid = None
        self._guard = ReadGuard()
        with self._guard.reading(self._slide) as handle:
            self.dimensions = [(h, w) for w, h in handle.level_dimensions]
            self.downsamples = [float(d) for d in handle.level_downsamples]
            self.vendor = handle.properties.get("openslide.vendor")

    def _slide(self):
        """The handle to read with (called under the guard's lock): opened on first use, after a close, and in a
        forked child."""
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            if file_identity(os.stat(self.path)) != self._identity:  # its levels would not be the slide's
                raise changed_error(self.path)
            self._handle = self.openslide.OpenSlide(self.path)
            self._pid = pid
        return self._handle

    def level_shapes(self):
        return [(h, w, 3) for h, w in self.dimensions]

    def level0_origin(self, level: int, y: int, x: int) -> tuple:
        """The level-0 ``(x, y)`` OpenSlide maps back to (y, x) of ``level``.

        OpenSlide divides the location by its single ``level_downsamples[level]``
        (the mean of the per-axis factors), so the location is computed with
        that factor, not the per-axis ones (which would drift by several pixels
        across a level whose factors differ). Where ``x * downsample`` is not an
        integer, OpenSlide lands between pixels (up to half a level-0 pixel
        off) and interpolates them."""
        downsample = self.downsamples[level]
        return int(round(x * downsample)), int(round(y * downsample))

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 pixels of ``level`` starting at (y, x), a region inside the level."""
        origin = self.level0_origin(level, y, x)
        with self._guard.reading(self._slide) as handle:
            rgba = np.asarray(handle.read_region(origin, level, (w, h)))
        return rgba[..., :3]

    def close(self) -> None:
        """Close the handle once the reads in flight are done (a later read opens the file again)."""
        with self._guard.idle():
            if self._handle is not None and self._pid == os.getpid():
                self._handle.close()
            self._handle = None
