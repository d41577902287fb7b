"""Load the CUDA sources of this folder into CuPy modules, compiled once per device and options."""

from __future__ import annotations

import functools
from pathlib import Path

from .._backend import cupy

SOURCE_DIR = Path(__file__).resolve().parent

THREADS_PER_BLOCK = 256
"""Default block size of the launches; tests lower it so tiny inputs span several blocks."""


def source(name: str) -> str:
    """The text of ``name`` (a ``.cu`` file of this folder) with its local ``#include``s inlined."""
    lines = []
    for line in (SOURCE_DIR / name).read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith('#include "'):
            lines.append(source(stripped.split('"')[1]))
        else:
            lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _module(name: str, options: tuple[str, ...], device_id: int):
    cp = cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=source(name), options=("--std=c++17",) + options)


def function(name: str, kernel: str, options: tuple[str, ...] = ()):
    """The compiled ``kernel`` of source file ``name`` on the current device (memoized)."""
    cp = cupy()
    return _module(name, tuple(options), cp.cuda.Device().id).get_function(kernel)
