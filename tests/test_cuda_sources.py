"""Every CUDA source compiles with nvcc (PTX for sm_90), so a kernel syntax error never lands."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from atskern.gpu._module import SOURCE_DIR, source

SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files found in {SOURCE_DIR}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("name", SOURCES)
def test_cuda_source_compiles(name, tmp_path):
    inlined = tmp_path / name
    inlined.write_text(source(name))
    result = subprocess.run(
        ["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-Werror", "all-warnings", str(inlined), "-o", str(tmp_path / "out.ptx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_scatter_keeps_subnormals_under_cupys_ftz(tmp_path):
    """CuPy compiles every kernel with -ftz=true; the deterministic scatter's float32 sums must still keep
    subnormals (inline add.rn.f32), or they would differ from the CPU kernel's."""
    inlined = tmp_path / "patches.cu"
    inlined.write_text(source("patches.cu"))
    ptx = tmp_path / "patches.ptx"
    result = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-ftz=true", str(inlined), "-o", str(ptx)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    start = text.index(".entry scatter_f32_i32")
    body = text[start:text.index(".entry", start + 10)]
    assert "add.rn.f32" in body
    assert ".ftz.f32" not in body
