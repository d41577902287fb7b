"""Optional dependencies of :mod:`atskern.io`, imported on first use with an install hint."""

from __future__ import annotations

import importlib

_HINTS = {
    "tifffile": "pip install 'atskern[slides]'  (or: pip install tifffile imagecodecs)",
    "imagecodecs": "pip install 'atskern[slides]'  (or: pip install imagecodecs)",
    "openslide": "pip install 'atskern[openslide]'  (or: pip install openslide-python openslide-bin)",
    "tqdm": "pip install 'atskern[slides]'  (or: pip install tqdm)",
}


def require(module: str):
    """Import ``module`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _HINTS.get(module, f"pip install {module}")
        raise ImportError(f"atskern.io needs the optional package {module!r} to read slides: {hint}") from exc


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without raising)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
