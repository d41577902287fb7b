"""Build a ``tests/cuda_host/*.cpp`` harness (a CUDA source compiled for the host against the shims) with g++."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent / "cuda_host"
SOURCE_DIR = Path(__file__).resolve().parents[1] / "atskern" / "gpu"

PROBE = "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n"


def build_host_library(folder: Path, harness: str) -> ctypes.CDLL:
    """Compile ``tests/cuda_host/<harness>.cpp`` into ``folder`` and load it; skip where g++ lacks C++20 <barrier>."""
    (folder / "probe.cpp").write_text(PROBE)
    probe = subprocess.run(["g++", "-std=c++20", "-pthread", str(folder / "probe.cpp"), "-o", str(folder / "probe")],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"g++ without C++20 <barrier>: {probe.stderr.strip()[:200]}")
    out = folder / f"{harness}.so"
    # -fno-gnu-unique: a template's function-local statics (the shims' __shared__ variables) would otherwise be
    # STB_GNU_UNIQUE symbols, bound to the first loaded library's copy across every harness of another block size
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-gnu-unique", "-Wall", "-Wextra", "-Wshadow",
                            "-Werror", "-Wno-unknown-pragmas", f"-I{HERE}", f"-I{SOURCE_DIR}",
                            str(HERE / f"{harness}.cpp"), "-o", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return ctypes.CDLL(str(out))


def ctype(arg):
    """A launch argument (NumPy array or scalar) as the ctypes value the host harness takes."""
    if isinstance(arg, np.ndarray):
        return ctypes.c_void_p(arg.ctypes.data)
    return {np.dtype(np.int64): ctypes.c_longlong, np.dtype(np.int32): ctypes.c_int,
            np.dtype(np.uint64): ctypes.c_ulonglong}[arg.dtype](arg)
