"""``open_slide``: a whole-slide image as lazy pyramid levels, read patch by patch."""

from __future__ import annotations

import itertools
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._memory import output_array
from .._validation import check_fill
from ._cache import TileCache
from ._deps import available
from ._tiff import SlideFormatError

_TOKENS = itertools.count()
_POOL_LOCK = threading.Lock()


def _new_pool_lock():  # a fork can copy the lock while another thread holds it
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pool_lock)
DEFAULT_CACHE_BYTES = 128 << 20


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _patch_size(patch_size, name="patch_size"):
    if isinstance(patch_size, numbers.Integral) and not isinstance(patch_size, bool):
        patch_size = (patch_size, patch_size)
    try:
        size = tuple(int(p) for p in patch_size)
        ok = len(size) == 2 and all(p == q and p >= 1 for p, q in zip(size, patch_size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (rows, columns), got {patch_size!r}")
    return size


def _offsets(offsets, name="offsets"):
    array = np.asarray(offsets)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must be (K, 2) (row, column) first pixels in the level, got shape {array.shape}")
    limit = 2**62  # far past any level: such a patch is all fill, and no cast wraps it round to the slide
    if array.dtype.kind == "u":
        return np.minimum(array, np.uint64(limit)).astype(np.int64)
    if array.dtype.kind != "i":
        if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            return np.clip(array, -limit, limit).astype(np.int64)
        if array.size:
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _axis_index(key, axis: int, size: int) -> range:
    """The rows (axis 0) or columns (axis 1) an int or a slice of non-negative step selects, as a range."""
    if isinstance(key, (bool, np.bool_)):
        raise IndexError(f"SlideLevel takes ints and slices, got the bool {key!r} for axis {axis} (NumPy would read "
                         "it as a new axis)")
    if isinstance(key, numbers.Integral):
        i = int(key) + size if key < 0 else int(key)
        if not 0 <= i < size:
            raise IndexError(f"index {key} is out of range for axis {axis} of size {size}")
        return range(i, i + 1)
    if isinstance(key, slice):
        start, stop, step = key.indices(size)
        if step < 0:
            raise IndexError("negative steps are not supported on a SlideLevel")
        return range(start, stop, step)
    raise IndexError(f"SlideLevel supports ints and slices, got {type(key).__name__}")


def _tile_groups(index: np.ndarray, tile: int) -> list:
    """``(tile number, slice into index)`` for each run of increasing pixel indices that lies in one tile."""
    tiles = index // tile
    starts = np.flatnonzero(np.r_[True, tiles[1:] != tiles[:-1]])
    ends = np.r_[starts[1:], len(tiles)]
    return [(int(tiles[a]), slice(int(a), int(b))) for a, b in zip(starts, ends)]


TILES_PER_READ = 64
"""Tiles decoded at once by a strided read (its memory: this many decoded tiles, not the spanned region)."""


class SlideLevel:
    """One pyramid level: a lazy, read-only array ``(H, W, C)``.

    Indexing with ints and slices (``level[y0:y1, x0:x1]``, ``level[::100,
    ::100]``) reads only the tiles under the selected pixels; ``np.asarray(level)``
    reads the whole level (asked for). ``downsample`` is the mean of the
    per-axis factors against level 0 (as OpenSlide reports it), ``downsamples``
    the per-axis ``(rows, columns)`` ones.
    """

    def __init__(self, slide, index, shape, dtype, tile_shape, downsamples):
        self._slide = slide
        self.index = index
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.tile_shape = tile_shape
        self.downsamples = downsamples
        self.downsample = float(sum(downsamples) / 2)

    ndim = 3

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"SlideLevel(index={self.index}, shape={self.shape}, dtype={self.dtype}, "
                f"downsample={self.downsample:g}, tile_shape={self.tile_shape})")

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3 or any(k is Ellipsis for k in key):
            raise IndexError("SlideLevel takes up to 3 slices/ints (rows, columns, channels); no Ellipsis")
        if len(key) == 3 and isinstance(key[2], (bool, np.bool_)):
            raise IndexError(f"SlideLevel takes ints and slices, got the bool {key[2]!r} for the channels")
        key = key + (slice(None),) * (3 - len(key))
        rows, cols = (_axis_index(key[axis], axis, self.shape[axis]) for axis in range(2))
        region = self._slide._read_pixels(self.index, rows, cols)
        squeeze = tuple(axis for axis in range(2) if isinstance(key[axis], numbers.Integral))
        if squeeze:
            region = region.reshape(tuple(s for a, s in enumerate(region.shape) if a not in squeeze))
        return region[(Ellipsis, key[2])]

    def __array__(self, dtype=None, copy=None):
        data = self._slide.read_level(self.index)
        return data if dtype is None else data.astype(dtype, copy=False)


class Slide:
    """A pyramidal whole-slide image opened by :func:`open_slide`.

    ``levels`` are :class:`SlideLevel` objects (lazy, read-only, largest
    first). Reads decode only the tiles under the requested pixels, in a
    thread pool of ``threads`` workers, and keep decoded tiles in an LRU
    :class:`TileCache` (``cache_bytes`` budget, or a ``cache`` shared between
    slides). Thread-safe; after a fork (a DataLoader worker) the child opens
    its own file handle and thread pool on its first read, and a pickled
    slide reopens the file where it is unpickled.
    """

    def __init__(self, path, backend, *, threads=None, cache=None, cache_bytes=DEFAULT_CACHE_BYTES, options=None):
        self.path = os.fsdecode(path)
        self._backend = backend
        self.backend = backend.name
        self.kind = getattr(backend, "kind", backend.name)
        threads = _default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self.threads = int(threads)
        if cache is not None and not isinstance(cache, TileCache):
            raise TypeError(f"cache must be an atskern.io.TileCache or None, got {type(cache).__name__}")
        self.cache = cache if cache is not None else TileCache(_check_cache_bytes(cache_bytes))
        self._options = dict(options or {}, threads=self.threads, cache_bytes=self.cache.max_bytes)
        self._token = next(_TOKENS)
        self._pool = None
        self._pool_pid = None
        if hasattr(backend, "levels"):
            shapes = [lv.shape for lv in backend.levels]
            tiles = [lv.tile for lv in backend.levels]
            dtypes = [lv.dtype for lv in backend.levels]
        else:
            shapes = backend.level_shapes()
            tiles = [None] * len(shapes)
            dtypes = [np.dtype(np.uint8)] * len(shapes)
        h0, w0 = shapes[0][:2]
        self._level_specs = tuple((i, shape, dtype, tile, (h0 / shape[0], w0 / shape[1]))
                                  for i, (shape, dtype, tile) in enumerate(zip(shapes, dtypes, tiles)))

    # -- description -------------------------------------------------------
    @property
    def levels(self) -> tuple:
        """The :class:`SlideLevel` objects, largest first (made on each access: a level refers to its slide, the
        slide not to its levels, so a dropped slide closes its file at once, with no reference cycle to collect)."""
        return tuple(SlideLevel(self, *spec) for spec in self._level_specs)

    @property
    def level_count(self) -> int:
        return len(self._level_specs)

    @property
    def shape(self) -> tuple:
        """Level 0's ``(H, W, C)``."""
        return self.levels[0].shape

    def __repr__(self) -> str:
        return (f"Slide({self.path!r}, backend={self.backend!r}, kind={self.kind!r}, "
                f"levels={[lv.shape[:2] for lv in self.levels]})")

    def level(self, level) -> SlideLevel:
        """The :class:`SlideLevel` ``level`` (an int; negative counts from the smallest)."""
        if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Integral):
            raise TypeError(f"level must be an int, got {type(level).__name__}")
        n = len(self._level_specs)
        if not -n <= level < n:
            raise ValueError(f"level {level} is out of range: {self.path} has {n} levels (0 to {n - 1})")
        return SlideLevel(self, *self._level_specs[level])

    def best_level(self, max_side: int) -> int:
        """The largest level whose sides are both at most ``max_side`` pixels (else the smallest level)."""
        if isinstance(max_side, (bool, np.bool_)) or not isinstance(max_side, numbers.Integral):
            raise TypeError(f"max_side must be an int (pixels), got {max_side!r}")
        for index, shape, *_ in self._level_specs:
            if max(shape[:2]) <= max_side:
                return index
        return len(self._level_specs) - 1

    # -- process and thread plumbing ---------------------------------------
    def _executor(self):
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:  # no pool yet, or a forked child (threads do not survive)
            with _POOL_LOCK:
                if self._pool is None or self._pool_pid != pid:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="atskern-io")
                    self._pool_pid = pid
        return self._pool

    def _map(self, fn, items):
        if self.threads == 1 or len(items) < 2:
            return [fn(item) for item in items]
        try:
            return list(self._executor().map(fn, items))
        except RuntimeError:  # "cannot schedule new futures after shutdown": a close() in another thread
            return [fn(item) for item in items]

    def close(self) -> None:
        """Close the file and stop the thread pool (also done at exit, or when the slide is collected). Reads in
        flight in other threads finish first; a later read opens the file again."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        return (_reopen, (self.path, self.backend, self._options))

    # -- tiles ---------------------------------------------------------------
    def _tiles(self, level: int, keys):
        """Decoded tiles for ``keys`` ((row, col) pairs), from the cache or decoded in the pool."""
        found, missing = {}, []
        for key in keys:
            tile = self.cache.get((self._token, level, *key))
            if tile is None:
                missing.append(key)
            else:
                found[key] = tile
        if missing:
            read = self._backend.read_tile
            decoded = self._map(lambda key: read(level, *key), missing)
            for key, tile in zip(missing, decoded):
                self.cache.put((self._token, level, *key), tile)
                found[key] = tile
        return found

    # -- reads ---------------------------------------------------------------
    def read_patches(self, offsets, patch_size, level=0, *, fill=0, out=None) -> np.ndarray:
        """Patches of ``patch_size`` starting at ``offsets`` in level ``level``.

        ``offsets``: integer ``(K, 2)`` first pixels (row, column) in that
        level's pixels, anywhere: pixels outside the level take ``fill``.
        Returns ``(K, ph, pw, C)`` of the level's dtype (into ``out`` if given).
        Only the tiles under the patches are read and decoded.
        """
        lv = self.level(level)
        offsets = _offsets(offsets)
        ph, pw = _patch_size(patch_size)
        shape = (offsets.shape[0], ph, pw, lv.shape[2])
        if out is None:
            out = output_array(shape, lv.dtype, "offsets and patch_size", np.empty)
        elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != lv.dtype:
            raise ValueError(f"out must be a NumPy array of shape {shape} and dtype {lv.dtype}, got "
                             f"{getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}")
        elif not out.flags.writeable:
            raise ValueError("out must be writeable")
        fill_value = check_fill(fill, lv.dtype)
        if not len(offsets):
            return out
        H, W = lv.shape[:2]
        y0, x0 = offsets[:, 0], offsets[:, 1]
        ya, yb = np.clip(y0, 0, H), np.clip(y0 + ph, 0, H)
        xa, xb = np.clip(x0, 0, W), np.clip(x0 + pw, 0, W)
        visible = (yb > ya) & (xb > xa)
        inside = visible & (ya == y0) & (yb == y0 + ph) & (xa == x0) & (xb == x0 + pw)
        out[~inside] = fill_value
        if lv.tile_shape is None:  # a backend that reads regions (OpenSlide)
            self._read_regions(lv, out, np.flatnonzero(visible), y0, x0, ya, yb, xa, xb)
            return out
        th, tw = lv.tile_shape
        spans = []
        needed = {}
        for k in np.flatnonzero(visible):
            rows = range(int(ya[k]) // th, (int(yb[k]) - 1) // th + 1)
            cols = range(int(xa[k]) // tw, (int(xb[k]) - 1) // tw + 1)
            spans.append((k, rows, cols))
            for key in itertools.product(rows, cols):
                needed[key] = None
        tiles = self._tiles(lv.index, list(needed))
        for k, rows, cols in spans:
            py, px = int(y0[k]), int(x0[k])
            for r in rows:
                ty = r * th
                r0, r1 = max(int(ya[k]), ty), min(int(yb[k]), ty + th)
                for c in cols:
                    tx = c * tw
                    c0, c1 = max(int(xa[k]), tx), min(int(xb[k]), tx + tw)
                    out[k, r0 - py:r1 - py, c0 - px:c1 - px] = tiles[r, c][r0 - ty:r1 - ty, c0 - tx:c1 - tx]
        return out

    def _read_regions(self, lv, out, ks, y0, x0, ya, yb, xa, xb):
        def one(k):
            region = self._backend.read_region(lv.index, int(ya[k]), int(xa[k]), int(yb[k] - ya[k]),
                                               int(xb[k] - xa[k]))
            out[k, ya[k] - y0[k]:yb[k] - y0[k], xa[k] - x0[k]:xb[k] - x0[k]] = region

        self._map(one, list(ks))

    def _read_pixels(self, level: int, rows: range, cols: range) -> np.ndarray:
        """The pixels ``rows`` x ``cols`` (ranges of positive step inside the level) of level ``level``.

        With steps of 1, one region; with larger steps only the tiles holding
        selected pixels are decoded, ``TILES_PER_READ`` at a time (OpenSlide:
        one selected row at a time), so memory follows the result, not the
        spanned region.
        """
        lv = self.level(level)
        if not len(rows) or not len(cols):
            return np.zeros((len(rows), len(cols), lv.shape[2]), lv.dtype)
        if rows.step == 1 and cols.step == 1:
            return self.read_region((rows.start, cols.start), (len(rows), len(cols)), level)
        out = np.empty((len(rows), len(cols), lv.shape[2]), lv.dtype)
        if lv.tile_shape is None:
            span = (1, cols[-1] - cols.start + 1)
            for i, row in enumerate(rows):
                out[i] = self.read_region((row, cols.start), span, level)[0, ::cols.step]
            return out
        self._read_tiles_strided(lv, np.asarray(rows), np.asarray(cols), out)
        return out

    def _read_tiles_strided(self, lv, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` with the pixels ``rows`` x ``cols`` (increasing) of ``lv``, a band of tile rows at a time."""
        th, tw = lv.tile_shape
        col_groups = _tile_groups(cols, tw)
        for band, rsel in _tile_groups(rows, th):
            in_rows = (rows[rsel] - band * th)[:, None]
            for first in range(0, len(col_groups), TILES_PER_READ):
                chunk = col_groups[first:first + TILES_PER_READ]
                tiles = self._tiles(lv.index, [(band, c) for c, _ in chunk])
                for c, csel in chunk:
                    out[rsel, csel] = tiles[band, c][in_rows, cols[csel] - c * tw]

    def read_region(self, origin, size, level=0, *, fill=0) -> np.ndarray:
        """One region ``(h, w, C)`` at ``origin`` (row, column) of level ``level``; outside pixels take ``fill``."""
        origin = np.asarray(origin)
        if origin.shape != (2,):
            raise ValueError(f"origin must be (row, column), got {origin.tolist()!r}")
        offsets = _offsets(origin.reshape(1, 2), "origin")
        return self.read_patches(offsets, _patch_size(size, "size"), level, fill=fill)[0]

    def read_level(self, level) -> np.ndarray:
        """The whole level as one array (reads every tile: for the small levels of a pyramid)."""
        lv = self.level(level)
        return self.read_region((0, 0), lv.shape[:2], lv.index)

    def read_multiscale(self, samples, grid_shape, patch_sizes, levels=(0,), *, margin=0.0, fill=0):
        """Patches around attention-grid cells, from one or more levels.

        ``samples``: integer ``(K, 2)`` cells of a ``grid_shape`` attention
        grid (e.g. ``atskern.sample``'s indices of one slide). Each level's
        offsets are :func:`atskern.patch_offsets` of that level's shape (the
        cell centre mapped into the level, the patch centred on it; ``margin``
        the attention network's receptive-field margin as a fraction).
        ``patch_sizes``: one size for all levels or one per level. Returns a
        list with one ``(K, ph, pw, C)`` array per level.
        """
        import atskern

        samples = np.asarray(samples)
        if samples.ndim != 2 or samples.shape[1] != 2:
            raise ValueError(f"samples must be (K, 2) grid cells of one slide, got shape {samples.shape}")
        levels = [levels] if isinstance(levels, numbers.Integral) else list(levels)
        if not levels:
            raise ValueError("levels must name at least one level")
        if isinstance(patch_sizes, numbers.Integral) or (
                isinstance(patch_sizes, (tuple, list)) and len(patch_sizes) == 2
                and all(isinstance(p, numbers.Integral) for p in patch_sizes) and len(levels) != 2):
            patch_sizes = [patch_sizes] * len(levels)
        patch_sizes = list(patch_sizes)
        if len(patch_sizes) != len(levels):
            raise ValueError(f"patch_sizes must give one size per level ({len(levels)}), got {len(patch_sizes)}")
        result = []
        for level, size in zip(levels, patch_sizes):
            lv = self.level(level)
            size = _patch_size(size, "patch_sizes")
            offsets = atskern.patch_offsets(samples[None], grid_shape, lv.shape[:2], size, margin=margin)[0]
            result.append(self.read_patches(offsets, size, lv.index, fill=fill))
        return result


def _reopen(path, backend, options):
    return open_slide(path, backend=backend, **options)


def _check_cache_bytes(cache_bytes) -> int:
    if isinstance(cache_bytes, (bool, np.bool_)) or not isinstance(cache_bytes, numbers.Integral) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be an int >= 0 (the decoded-tile cache budget in bytes; 0: no cache), "
                         f"got {cache_bytes!r}")
    return int(cache_bytes)


def _slide_path(path) -> str:
    """``path`` (str, bytes or os.PathLike) as a str, checked to name an existing file."""
    try:
        path = os.fsdecode(path)
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike naming a slide file, got {type(path).__name__}") \
            from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"no slide at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a slide file")
    return os.path.abspath(path)  # files are reopened by path (after a close, in a forked child): not another one


def _check_pyramid(path: str, level_count: int, require_pyramid: bool) -> None:
    if require_pyramid and level_count < 2:
        raise SlideFormatError(
            f"{path}: a single-level slide (no pyramid): ATS reads its attention view from a "
            f"low-resolution level; convert it to a pyramid, e.g. `vips tiffsave in.tif out.tif --tile "
            f"--pyramid --compression jpeg`, or pass require_pyramid=False to read level 0 only")


def _tiff_or_fallback(path: str, backend: str, series: int):
    """``(tifffile backend, None)``, or ``(None, its error)`` where ``backend="auto"`` may fall back to OpenSlide
    (installed, and its 8-bit RGB would be the file's own values); else raises the tifffile backend's error."""
    from ._tiff import TiffBackend, openslide_keeps_values

    try:
        return TiffBackend(path, series), None
    except SlideFormatError as error:
        if backend == "tifffile" or not available("openslide"):
            raise
        if not openslide_keeps_values(path, series):
            raise SlideFormatError(f"{error} (backend='auto' does not fall back to OpenSlide here: it reads 8-bit "
                                   "RGB, not this file's samples)") from None
        return None, error


def _openslide_backend(path: str, tiff_error):
    from ._openslide import OpenSlideBackend

    if tiff_error is None:
        return OpenSlideBackend(path)
    try:  # auto, after tifffile refused it: OpenSlide's own error says less than tifffile's, which has the fix
        return OpenSlideBackend(path)
    except Exception as error:
        raise SlideFormatError(f"{tiff_error} (OpenSlide cannot read it either: {error})") from None


def open_slide(path, *, backend="auto", threads=None, cache=None, cache_bytes=DEFAULT_CACHE_BYTES, series=0,
               require_pyramid=True) -> Slide:
    """Open a whole-slide image for patch reads.

    ``path``: a str, bytes or os.PathLike. ``backend``: ``"tifffile"`` (tiled
    TIFF, BigTIFF, OME-TIFF, SubIFD and SVS pyramids; JPEG, JPEG 2000,
    deflate, LZW, zstd tiles through imagecodecs), ``"openslide"`` (any
    format OpenSlide reads, as 8-bit RGB; needs openslide-python and
    openslide-bin) or ``"auto"`` (tifffile, else OpenSlide when installed and
    the file's samples are 8-bit). ``threads`` decoding threads (default
    ``min(4, cores)``), ``cache_bytes`` the decoded-tile cache budget (or a
    shared :class:`TileCache` as ``cache``). A slide with one level is
    refused unless ``require_pyramid=False`` (the attention network reads a
    low-resolution level). Raises ``FileNotFoundError`` for a missing file,
    :class:`SlideFormatError` (a ``ValueError``) for a file it cannot read,
    with the fix in the message.
    """
    path = _slide_path(path)
    if backend not in ("auto", "tifffile", "openslide"):
        raise ValueError(f"backend must be 'auto', 'tifffile' or 'openslide', got {backend!r}")
    if isinstance(series, bool) or not isinstance(series, numbers.Integral):
        raise TypeError(f"series must be an integer (the TIFF's image series), got {series!r}")
    if cache is None:
        _check_cache_bytes(cache_bytes)
    series = int(series)
    options = dict(series=series, require_pyramid=require_pyramid)
    impl, tiff_error = None, None
    if backend in ("auto", "tifffile"):
        impl, tiff_error = _tiff_or_fallback(path, backend, series)
    if impl is not None:
        _check_pyramid(path, len(impl.levels), require_pyramid)
    else:
        impl = _openslide_backend(path, tiff_error)
        try:
            _check_pyramid(path, len(impl.dimensions), require_pyramid)
        except SlideFormatError:
            impl.close()
            raise
    return Slide(path, impl, threads=threads, cache=cache, cache_bytes=cache_bytes, options=options)
