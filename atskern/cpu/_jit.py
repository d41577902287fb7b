"""Numba decorators shared by the CPU kernels, with an on-disk cache in a per-user directory.

Compiled kernels are cached (``cache=True``) in, by priority:

1. ``NUMBA_CACHE_DIR`` if it is set (Numba's own rule, for every cached function);
2. ``$XDG_CACHE_HOME/atskern/numba`` (default ``~/.cache/atskern/numba``);
3. ``<temporary folder>/atskern-numba-<uid>``;

never the package's own ``__pycache__`` (a site-packages folder is often read-only or shared).
Each compiled signature goes to a data file named by a hash of its index key (Numba numbers them
1, 2, ... in the order one process compiled them: two processes that compile different signatures
on a cold cache at the same time, e.g. data-loader workers or DDP ranks, wrote different code under
one name, and a third loaded one signature's machine code for another and crashed).
Inside that directory Numba keys each cache file by the source file's absolute folder, so
several installs of atskern never overwrite each other's entries. Only atskern's functions
are redirected (a cache locator of our own); other libraries' Numba caches are left where
Numba puts them. Caching is turned off only if no directory is writable.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import numba

from . import _threading  # chooses the threading layer before any kernel is compiled

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def cache_candidates() -> list[Path]:
    """Where the cache may live, in order of preference (see the module docstring)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    candidates = [Path(configured)] if configured else []
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates += [
        user_cache / "atskern" / "numba",
        Path(tempfile.gettempdir()) / f"atskern-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}",
    ]
    return candidates


def _choose_cache_dir() -> Path | None:
    for candidate in cache_candidates():
        if _writable(candidate):
            return candidate
    return None


CACHE_DIR = _choose_cache_dir()
CACHE = CACHE_DIR is not None


def _install_locator(cache_dir: Path) -> bool:
    """Make Numba cache atskern's functions (only) under ``cache_dir``; False if Numba's API moved."""
    try:
        from numba.core import caching

        base = (caching._SourceFileBackedLocatorMixin, caching._CacheLocator)
        impl = caching.CacheImpl
    except AttributeError:
        return False

    class AtskernCacheLocator(*base):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(str(cache_dir), self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            try:
                Path(py_file).resolve().relative_to(PACKAGE_DIR)
            except (ValueError, OSError):
                return None
            return super().from_function(py_func, py_file)

    classes = impl._locator_classes
    if not any(c.__name__ == AtskernCacheLocator.__name__ for c in classes):
        # after Numba's NUMBA_CACHE_DIR locator, before its in-tree (__pycache__) one
        names = [c.__name__ for c in classes]
        at = names.index("UserProvidedCacheLocator") + 1 if "UserProvidedCacheLocator" in names else 0
        classes.insert(at, AtskernCacheLocator)
    return True


if CACHE_DIR is not None and not os.environ.get("NUMBA_CACHE_DIR"):
    if not _install_locator(CACHE_DIR):
        numba.config.CACHE_DIR = str(CACHE_DIR)


def _entries_by_key():
    """``numba.core.caching.IndexDataCacheFile`` with one data file per index key (see the module docstring),
    or None if Numba's API moved."""
    try:
        from numba.core.caching import IndexDataCacheFile
    except ImportError:
        return None

    class EntriesByKey(IndexDataCacheFile):
        def save(self, key, data):
            digest = hashlib.sha256(pickle.dumps(key, protocol=4)).hexdigest()[:24]
            data_name = self._index_name[: -len(".nbi")] + f".{digest}.nbc"
            self._save_data(data_name, data)  # before the index names it (a reader skips a missing file anyway)
            overloads = self._load_index()
            if overloads.get(key) != data_name:
                overloads[key] = data_name
                self._save_index(overloads)

    return EntriesByKey


_ENTRIES_BY_KEY = _entries_by_key()


def _keyed_entries(dispatcher):
    """``dispatcher`` with its disk cache (if any) writing one data file per key."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if _ENTRIES_BY_KEY is not None and cache_file is not None and isinstance(cache_file, _ENTRIES_BY_KEY.__base__):
        cache_file.__class__ = _ENTRIES_BY_KEY
    return dispatcher


def jit(*args, **kwargs):
    """``numba.njit`` with nogil, and the disk cache (one file per compiled signature) when a cache directory is
    writable."""
    kwargs.setdefault("cache", CACHE)
    kwargs.setdefault("nogil", True)
    if len(args) == 1 and callable(args[0]):
        return _keyed_entries(numba.njit(**kwargs)(args[0]))
    decorate = numba.njit(*args, **kwargs)
    return lambda function: _keyed_entries(decorate(function))
