"""The OpenSlide backend (optional): formats tifffile cannot read, and a reference for the tests."""

from __future__ import annotations

import os

import numpy as np

from ._deps import require


class OpenSlideBackend:
    """Pyramid levels through OpenSlide's ``read_region`` (RGBA converted to RGB, transparent pixels 0)."""

    name = "openslide"
    kind = "openslide"

    def __init__(self, path: str):
        self.openslide = require("openslide")
        self.path = path
        self._handle = None
        self._pid = None
        handle = self._slide()
        self.dimensions = [(h, w) for w, h in handle.level_dimensions]
        self.vendor = handle.properties.get("openslide.vendor")

    def _slide(self):
        pid = os.getpid()
        if self._handle is None or self._pid != pid:  # a forked child opens its own handle
            self._handle = self.openslide.OpenSlide(self.path)
            self._pid = pid
        return self._handle

    def level_shapes(self):
        return [(h, w, 3) for h, w in self.dimensions]

    def read_region(self, level: int, y: int, x: int, h: int, w: int, downsample: tuple) -> np.ndarray:
        """``(h, w, 3)`` uint8 pixels of ``level`` starting at (y, x), a region inside the level."""
        handle = self._slide()
        origin = (int(round(x * downsample[1])), int(round(y * downsample[0])))  # OpenSlide: level-0 (x, y)
        rgba = np.asarray(handle.read_region(origin, level, (w, h)))
        return rgba[..., :3]

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
