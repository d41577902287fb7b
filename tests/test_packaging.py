"""The wheel ships both packages and the CUDA sources the GPU kernels compile at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("atskern-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    cuda_sources = {f"atskern/gpu/{p.name}" for p in (ROOT / "atskern" / "gpu").glob("*.cu*")}
    assert cuda_sources and cuda_sources <= names
    for module in ("atskern/__init__.py", "atskern/reference.py", "atskern/cpu/sampling.py", "ats/__init__.py"):
        assert module in names, f"{module} missing from the wheel"
    assert not any(name.startswith(("tests/", "bench/", "examples/")) for name in names)
