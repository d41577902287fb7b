"""Numba decorators shared by the CPU kernels, with an on-disk cache in a per-user directory.

Compiled kernels are cached (``cache=True``) in, by priority:

1. ``NUMBA_CACHE_DIR`` if it is set (Numba's own rule, for every cached function);
2. ``$XDG_CACHE_HOME/atskern/numba`` (default ``~/.cache/atskern/numba``);
3. ``<temporary folder>/atskern-numba-<uid>``;

never the package's own ``__pycache__`` (a site-packages folder is often read-only or shared).
Inside that directory Numba keys each cache file by the source file's absolute folder, so
several installs of atskern never overwrite each other's entries. Only atskern's functions
are redirected (a cache locator of our own); other libraries' Numba caches are left where
Numba puts them. Caching is turned off only if no directory is writable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba

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


def jit(*args, **kwargs):
    """``numba.njit`` with nogil, and the disk cache when a cache directory is writable."""
    kwargs.setdefault("cache", CACHE)
    kwargs.setdefault("nogil", True)
    return numba.njit(*args, **kwargs)
