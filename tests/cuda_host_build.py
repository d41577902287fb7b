"""Build a ``tests/cuda_host/*.cpp`` harness (a CUDA source compiled for the host against the shims) with g++."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent / "cuda_host"
SOURCE_DIR = Path(__file__).resolve().parents[1] / "atskern" / "gpu"

SANITIZE = "ATS_HOST_SANITIZE"
"""Environment variable: ``1`` builds the harnesses with AddressSanitizer and UndefinedBehaviorSanitizer (alignment
included, and float-to-integer conversions out of range, which a GPU saturates and C++ leaves undefined), every
report fatal; the process must preload their runtimes (``tests/test_cuda_host_sanitized.py``)."""

PROBE = "#include <ucontext.h>\nint main() { ucontext_t context; return getcontext(&context); }\n"


def sanitizer_flags() -> list[str]:
    """The g++ flags of a sanitized build where :data:`SANITIZE` asks for one, else none."""
    if os.environ.get(SANITIZE) != "1":
        return []
    return ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def build_host_library(folder: Path, harness: str) -> ctypes.CDLL:
    """Compile ``tests/cuda_host/<harness>.cpp`` into ``folder`` and load it; skip where g++ or <ucontext.h> (the
    shims' fibers) is missing."""
    (folder / "probe.cpp").write_text(PROBE)
    probe = subprocess.run(["g++", "-std=c++20", "-pthread", str(folder / "probe.cpp"), "-o", str(folder / "probe")],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"g++ cannot build with <ucontext.h>: {probe.stderr.strip()[:200]}")
    out = folder / f"{harness}.so"
    # -fno-gnu-unique: a template's function-local statics (the shims' __shared__ variables) would otherwise be
    # STB_GNU_UNIQUE symbols, bound to the first loaded library's copy across every harness of another block size
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-gnu-unique", "-Wall", "-Wextra", "-Wshadow",
                            "-Werror", "-Wno-unknown-pragmas", *sanitizer_flags(), f"-I{HERE}", f"-I{SOURCE_DIR}",
                            str(HERE / f"{harness}.cpp"), "-o", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return ctypes.CDLL(str(out))


C_TYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int, "u32": ctypes.c_uint, "i64": ctypes.c_longlong,
           "u64": ctypes.c_ulonglong}
_SCALARS = {"int": "i32", "unsigned int": "u32", "unsigned": "u32", "long long": "i64", "long long int": "i64",
            "unsigned long long": "u64", "unsigned long long int": "u64", "float": "f32", "double": "f64"}
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+'
                     r'(?:__(?:launch_bounds|cluster_dims)__\s*\((?:[^()]|\([^()]*\))*\)\s*)*'  # attributes
                     r'(\w+)\s*\(([^)]*)\)')


def _parameter_kind(declaration: str) -> str:
    """``ptr`` for a pointer, else the scalar's tag (i32, u32, i64, u64, f32, f64) of one C parameter declaration."""
    if "*" in declaration:
        return "ptr"
    words = [w for w in declaration.split() if w not in ("const", "__restrict__", "__restrict")]
    return _SCALARS[" ".join(words[:-1])]  # the last word is the parameter's name


@functools.lru_cache(maxsize=None)
def kernel_parameters(source: str) -> dict:
    """``{kernel name: parameter kinds}`` of the ``extern "C" __global__`` kernels of ``atskern/gpu/<source>``, read
    from the preprocessed source (``g++ -E``: the kernels declared through macros included), as the driver sees
    them: what every launch list must match, argument for argument (``atskern.gpu._launch`` packs them untyped)."""
    result = subprocess.run(["g++", "-E", "-P", "-x", "c++", "-std=c++17", f"-I{HERE}", f"-I{SOURCE_DIR}",
                             str(SOURCE_DIR / source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    kernels = {}
    for match in _KERNEL.finditer(result.stdout):
        declarations = [d.strip() for d in match.group(2).split(",") if d.strip()]
        kernels[match.group(1)] = tuple(_parameter_kind(d) for d in declarations)
    assert kernels, f"no kernel found in {source}"
    return kernels


def call_host(lib, source: str, name: str, grid, block, args):
    """Run kernel ``name`` of ``source`` through the host build ``lib`` (its ``host_<name>`` launcher) with a launch
    list's arguments (NumPy arrays for pointers, 0 for a null one, integers), typed from the kernel's parameters."""
    kinds = kernel_parameters(source)[name]
    assert len(grid) == len(block) == 1 and len(args) == len(kinds), (name, len(args), len(kinds))
    function = getattr(lib, "host_" + name)
    function.argtypes = [ctypes.c_uint, ctypes.c_uint] + [C_TYPES[k] for k in kinds]
    values = [arg.ctypes.data if isinstance(arg, np.ndarray) else (None if arg is None else int(arg)) for arg in args]
    function(grid[0], block[0], *values)
