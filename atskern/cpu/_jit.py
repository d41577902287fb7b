"""Numba decorators shared by the CPU kernels, with an on-disk cache where one can be written.

Numba's ``cache=True`` fails at decoration time when no cache directory is
writable (a read-only site-packages, say). We pick a writable directory
(``NUMBA_CACHE_DIR`` if set, else the package folder, else a per-user cache
folder, else the temporary folder) and turn caching off only if none works.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba

from . import _threading  # chooses the threading layer before any kernel is compiled


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _choose_cache_dir() -> Path | None:
    configured = os.environ.get("NUMBA_CACHE_DIR")
    candidates = [Path(configured)] if configured else []
    candidates += [
        Path(__file__).resolve().parent / "__pycache__",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atskern" / "numba",
        Path(tempfile.gettempdir()) / f"atskern-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}",
    ]
    for candidate in candidates:
        if _writable(candidate):
            return candidate
    return None


CACHE_DIR = _choose_cache_dir()
if CACHE_DIR is not None and CACHE_DIR != Path(__file__).resolve().parent / "__pycache__":
    numba.config.CACHE_DIR = str(CACHE_DIR)
CACHE = CACHE_DIR is not None


def jit(*args, **kwargs):
    """``numba.njit`` with nogil, and the disk cache when a cache directory is writable."""
    kwargs.setdefault("cache", CACHE)
    kwargs.setdefault("nogil", True)
    return numba.njit(*args, **kwargs)
