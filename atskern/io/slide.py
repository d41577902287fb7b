"""``open_slide``: a whole-slide image as lazy pyramid levels, read patch by patch."""

from __future__ import annotations

import itertools
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._memory import output_array
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


def _offsets(offsets):
    array = np.asarray(offsets)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"offsets must be (K, 2) (row, column) first pixels in the level, got shape {array.shape}")
    limit = 2**62  # far past any level: such a patch is all fill, and no cast wraps it round to the slide
    if array.dtype.kind == "u":
        return np.minimum(array, np.uint64(limit)).astype(np.int64)
    if array.dtype.kind != "i":
        if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            return np.clip(array, -limit, limit).astype(np.int64)
        if array.size:
            raise TypeError(f"offsets must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


class SlideLevel:
    """One pyramid level: a lazy, read-only array ``(H, W, C)``.

    Indexing with slices (``level[y0:y1, x0:x1]``) reads only the tiles under
    the region; ``np.asarray(level)`` reads the whole level (asked for).
    ``downsample`` is the mean of the per-axis factors against level 0 (as
    OpenSlide reports it), ``downsamples`` the per-axis ``(rows, columns)`` ones.
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
        key = key + (slice(None),) * (3 - len(key))
        spans, squeeze = [], []
        for axis in range(2):
            k = key[axis]
            size = self.shape[axis]
            if isinstance(k, numbers.Integral):
                i = int(k) + size if k < 0 else int(k)
                if not 0 <= i < size:
                    raise IndexError(f"index {k} is out of range for axis {axis} of size {size}")
                spans.append((i, i + 1, 1))
                squeeze.append(axis)
            elif isinstance(k, slice):
                spans.append(k.indices(size))
            else:
                raise IndexError(f"SlideLevel supports ints and slices, got {type(k).__name__}")
        (y0, y1, ys), (x0, x1, xs) = spans
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        if ys < 0 or xs < 0:
            raise IndexError("negative steps are not supported on a SlideLevel")
        region = self._slide.read_region((y0, x0), (h, w), level=self.index) if h and w else \
            np.zeros((h, w, self.shape[2]), self.dtype)
        region = region[::ys, ::xs]
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
        self.path = str(path)
        self._backend = backend
        self.backend = backend.name
        self.kind = getattr(backend, "kind", backend.name)
        threads = _default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self.threads = int(threads)
        if cache is not None and not isinstance(cache, TileCache):
            raise TypeError(f"cache must be an atskern.io.TileCache or None, got {type(cache).__name__}")
        self.cache = cache if cache is not None else TileCache(cache_bytes)
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
        self.levels = tuple(
            SlideLevel(self, i, shape, dtype, tile, (h0 / shape[0], w0 / shape[1]))
            for i, (shape, dtype, tile) in enumerate(zip(shapes, dtypes, tiles))
        )

    # -- description -------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def shape(self) -> tuple:
        """Level 0's ``(H, W, C)``."""
        return self.levels[0].shape

    def __repr__(self) -> str:
        return (f"Slide({self.path!r}, backend={self.backend!r}, kind={self.kind!r}, "
                f"levels={[lv.shape[:2] for lv in self.levels]})")

    def level(self, level) -> SlideLevel:
        """The :class:`SlideLevel` ``level`` (an int; negative counts from the smallest)."""
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):
            raise TypeError(f"level must be an int, got {type(level).__name__}")
        n = len(self.levels)
        if not -n <= level < n:
            raise ValueError(f"level {level} is out of range: {self.path} has {n} levels (0 to {n - 1})")
        return self.levels[level]

    def best_level(self, max_side: int) -> int:
        """The largest level whose sides are both at most ``max_side`` (else the smallest level)."""
        for lv in self.levels:
            if max(lv.shape[:2]) <= max_side:
                return lv.index
        return len(self.levels) - 1

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
        try:
            fill_value = np.array(fill).astype(lv.dtype, casting="same_kind" if lv.dtype.kind == "f" else "unsafe")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fill must be a number, got {fill!r}") from exc
        if np.ndim(fill_value) != 0 or (lv.dtype.kind in "iu" and fill_value != fill):
            raise ValueError(f"fill {fill!r} does not fit the slide's dtype {lv.dtype}")
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
                                               int(xb[k] - xa[k]), lv.downsamples)
            out[k, ya[k] - y0[k]:yb[k] - y0[k], xa[k] - x0[k]:xb[k] - x0[k]] = region

        self._map(one, list(ks))

    def read_region(self, origin, size, level=0, *, fill=0) -> np.ndarray:
        """One region ``(h, w, C)`` at ``origin`` (row, column) of level ``level``; outside pixels take ``fill``."""
        origin = np.asarray(origin)
        if origin.shape != (2,):
            raise ValueError(f"origin must be (row, column), got {origin.tolist()!r}")
        return self.read_patches(origin.reshape(1, 2), _patch_size(size, "size"), level, fill=fill)[0]

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


def open_slide(path, *, backend="auto", threads=None, cache=None, cache_bytes=DEFAULT_CACHE_BYTES, series=0,
               require_pyramid=True) -> Slide:
    """Open a whole-slide image for patch reads.

    ``backend``: ``"tifffile"`` (tiled TIFF, BigTIFF, OME-TIFF, SubIFD and
    SVS pyramids; JPEG, JPEG 2000, deflate, LZW, zstd tiles through
    imagecodecs), ``"openslide"`` (any format OpenSlide reads; needs
    openslide-python and openslide-bin) or ``"auto"`` (tifffile, else
    OpenSlide when installed). ``threads`` decoding threads (default
    ``min(4, cores)``), ``cache_bytes`` the decoded-tile cache budget (or a
    shared :class:`TileCache` as ``cache``). A TIFF with one level is
    refused unless ``require_pyramid=False`` (the attention network reads a
    low-resolution level). Raises ``FileNotFoundError`` for a missing file,
    :class:`SlideFormatError` (a ``ValueError``) for a file it cannot read,
    with the fix in the message.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no slide at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a slide file")
    if backend not in ("auto", "tifffile", "openslide"):
        raise ValueError(f"backend must be 'auto', 'tifffile' or 'openslide', got {backend!r}")
    if isinstance(series, bool) or not isinstance(series, numbers.Integral):
        raise TypeError(f"series must be an integer (the TIFF's image series), got {series!r}")
    series = int(series)
    options = dict(series=series, require_pyramid=require_pyramid)
    if backend in ("auto", "tifffile"):
        from ._tiff import TiffBackend

        tiff_error = None
        try:
            impl = TiffBackend(path, series)
        except SlideFormatError as error:
            if backend == "tifffile" or not available("openslide"):
                raise
            impl, tiff_error = None, error
        if impl is not None:
            if require_pyramid and len(impl.levels) < 2:
                raise SlideFormatError(
                    f"{path}: a single-level TIFF (no pyramid): ATS reads its attention view from a "
                    f"low-resolution level; convert it to a pyramid, e.g. `vips tiffsave in.tif out.tif --tile "
                    f"--pyramid --compression jpeg`, or pass require_pyramid=False to read level 0 only")
            return Slide(path, impl, threads=threads, cache=cache, cache_bytes=cache_bytes, options=options)
    from ._openslide import OpenSlideBackend

    if backend == "openslide":
        impl = OpenSlideBackend(path)
    else:  # auto, after tifffile refused it: OpenSlide's own error says less than tifffile's, which has the fix
        try:
            impl = OpenSlideBackend(path)
        except Exception as error:
            raise SlideFormatError(f"{tiff_error} (OpenSlide cannot read it either: {error})") from None
    return Slide(path, impl, threads=threads, cache=cache, cache_bytes=cache_bytes, options=options)
