"""The tifffile backend: tiled TIFF / BigTIFF, OME-TIFF, SubIFD and SVS pyramids, tiles read with ``os.pread``.

tifffile parses the file structure once (the pyramid, each level's tile
offsets and byte counts, its decode function); the tiles are then read with
``os.pread`` on a descriptor of our own (no shared file position) and
decoded by tifffile's decode closure, i.e. imagecodecs, which releases the
GIL. The descriptor is closed by :meth:`TiffBackend.close` (which waits for
reads in flight: the number could otherwise be reused by another file
mid-read) or when the backend is collected.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np

from ._deps import require
from ._guard import ReadGuard
from ._identity import changed_error, file_identity

CONVERT_HINT = (
    "convert it to a tiled pyramid, e.g. `vips tiffsave in.tif out.tif --tile --pyramid --bigtiff "
    "--compression jpeg --tile-width 256 --tile-height 256`, or from Python with "
    "`atskern.io.write_pyramid(path, tifffile.imread(src))` for an image that fits in memory"
)


class SlideFormatError(ValueError):
    """The file is a TIFF that atskern.io cannot read as a tiled pyramid (the message says how to convert it)."""


@dataclass
class TiffLevel:
    shape: tuple  # (H, W, C)
    dtype: np.dtype
    tile: tuple  # (th, tw)
    tiles_across: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    decode: object
    jpegtables: bytes | None


def _level_from_page(page, index: int, path: str) -> TiffLevel:
    if not page.is_tiled:
        raise SlideFormatError(
            f"{path}: level {index} is strip-based (not tiled); atskern.io reads only tiled TIFFs, "
            f"so that patches decode only the tiles under them: {CONVERT_HINT}")
    if page.tiledepth != 1:
        raise SlideFormatError(f"{path}: level {index} has volumetric tiles (depth {page.tiledepth}); not supported")
    axes = page.axes
    if axes not in ("YX", "YXS"):
        raise SlideFormatError(f"{path}: level {index} has axes {axes!r}; atskern.io reads 2-D images (YX or YXS)")
    if page.samplesperpixel > 1 and page.planarconfig != 1:
        raise SlideFormatError(f"{path}: level {index} stores its samples in separate planes (planar configuration 2); "
                               f"{CONVERT_HINT}")
    height, width = int(page.imagelength), int(page.imagewidth)
    channels = int(page.samplesperpixel) if axes == "YXS" else 1
    if page.dtype is None:
        raise SlideFormatError(f"{path}: level {index} has an unsupported sample format")
    tile = (int(page.tilelength), int(page.tilewidth))
    decode = page.decode  # built (and memoized by tifffile) now, in one thread
    return TiffLevel(
        shape=(height, width, channels),
        dtype=np.dtype(page.dtype.str),  # NumPy's own uint64 (tifffile's 'Q' is a type torch refuses)
        tile=tile,
        tiles_across=-(-width // tile[1]),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
        decode=decode,
        jpegtables=page.jpegtables,
    )


def _check_one_page_per_level(level, index: int, series: int, path: str) -> None:
    """Refuse a level stored over several pages (an OME-TIFF stored CYX: one page per channel), or with axes
    other than YX / YXS: atskern.io reads a level from one page, which would be one plane of it."""
    pages = len(level.pages)
    if pages > 1 or level.axes not in ("YX", "YXS"):
        raise SlideFormatError(
            f"{path}: series {series} has axes {level.axes!r} (level {index}: shape {tuple(level.shape)} in "
            f"{pages} page{'s' if pages != 1 else ''}); atskern.io reads 2-D images stored as one page per level, "
            f"with axes YX or YXS (samples interleaved in each pixel): {CONVERT_HINT}")


def openslide_keeps_values(path: str, series: int = 0) -> bool:
    """Whether OpenSlide (8-bit RGB) would return the file's own values: True for a file tifffile cannot parse
    (OpenSlide reads other formats), else whether the series' samples are uint8, 1 or 3 a pixel, not a palette."""
    tifffile = require("tifffile")
    try:
        tif = tifffile.TiffFile(path)
    except tifffile.TiffFileError:
        return True
    with tif:
        page = tif.series[series].keyframe if 0 <= series < len(tif.series) else tif.pages.first
        return (page.dtype is not None and np.dtype(page.dtype) == np.uint8 and page.samplesperpixel in (1, 3)
                and page.photometric != tifffile.PHOTOMETRIC.PALETTE)


def _check_codec(tif, page, path):
    compression = int(page.compression)
    if compression == 1:
        return
    try:
        from tifffile import TIFF

        TIFF.DECOMPRESSORS[compression]
    except (KeyError, ImportError) as exc:  # imagecodecs missing or a codec it lacks
        require("imagecodecs")
        raise SlideFormatError(f"{path}: no decoder for TIFF compression {compression} ({exc})") from exc


class TiffBackend:
    """Pyramid levels of a TIFF file, read tile by tile."""

    name = "tifffile"

    def __init__(self, path: str, series: int = 0):
        tifffile = require("tifffile")
        self.path = path
        self._identity = file_identity(os.stat(path))
        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as exc:
            raise SlideFormatError(f"{path}: not a TIFF file tifffile can read ({exc})") from exc
        try:
            if not tif.series:
                raise SlideFormatError(f"{path}: the TIFF holds no image series")
            if not 0 <= series < len(tif.series):
                raise ValueError(f"series must be in [0, {len(tif.series)}) for {path}, got {series}")
            for i, level in enumerate(tif.series[series].levels):
                _check_one_page_per_level(level, i, series, path)
            pages = [level.keyframe for level in tif.series[series].levels]
            for page in pages:
                _check_codec(tif, page, path)
            self.levels = [_level_from_page(page, i, path) for i, page in enumerate(pages)]
            self.kind = tif.series[series].kind
        finally:
            tif.close()  # everything needed is in memory; tiles are read with our own descriptor
        self._fd = None
        self._pid = None
        self._closer = None
        self._guard = ReadGuard()  # preads in flight on self._fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_fd=None, _pid=None, _closer=None)
        return state

    def _descriptor(self) -> int:
        """The descriptor to read with (called under the guard's lock): opened on first use, after a close, and in
        a forked child (its own)."""
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._closer is not None:
                self._closer.detach()  # a forked child's copy of the parent's descriptor: left to the parent
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            if file_identity(os.fstat(fd)) != self._identity:  # its tiles would be read at the old file's offsets
                os.close(fd)
                raise changed_error(self.path)
            self._fd, self._pid = fd, pid
            self._closer = weakref.finalize(self, os.close, fd)
        return self._fd

    def read_tile(self, level: int, row: int, col: int) -> np.ndarray:
        """Decode one tile as ``(th, tw, C)``; an empty tile (byte count 0) reads as zeros."""
        info = self.levels[level]
        index = row * info.tiles_across + col
        count = int(info.bytecounts[index])
        th, tw = info.tile
        if count == 0:
            return np.zeros((th, tw, info.shape[2]), info.dtype)
        with self._guard.reading(self._descriptor) as fd:
            data = os.pread(fd, count, int(info.offsets[index]))
        if len(data) != count:
            raise OSError(f"{self.path}: short read of tile {index} at level {level} (file truncated?)")
        segment = info.decode(data, index, jpegtables=info.jpegtables)[0]
        return np.asarray(segment).reshape(th, tw, info.shape[2])

    def close(self) -> None:
        """Close the descriptor once the reads in flight are done (a later read opens the file again)."""
        with self._guard.idle():
            if self._closer is not None and self._pid == os.getpid():
                self._closer()  # os.close, once
            self._fd, self._closer = None, None
