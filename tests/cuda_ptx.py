"""sampling.cu as PTX for sm_90, built once per test process, and ptxas's verbose report of some of its kernels."""

from __future__ import annotations

import subprocess
from pathlib import Path

from atskern.gpu._module import source


def build_sampling_ptx(folder: Path) -> Path:
    """sampling.cu compiled to PTX in ``folder`` with the default compile options (256-thread selecting blocks)
    and CuPy's -ftz=true."""
    from atskern.gpu import sampling as gs

    inlined = folder / "sampling.cu"
    inlined.write_text(source("sampling.cu"))
    ptx = folder / "sampling.ptx"
    result = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-ftz=true", *gs.compile_options(256),
                             str(inlined), "-o", str(ptx)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ptx


def ptxas_verbose(ptx: Path, entries: tuple[str, ...], cubin: Path) -> str:
    """What ``ptxas -v`` (sm_90) says of the ``entries`` of ``ptx``: each function's registers, shared memory and
    spills."""
    result = subprocess.run(["ptxas", "-v", "-arch=sm_90", "--entry", ",".join(entries), str(ptx), "-o", str(cubin)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr
