"""The wheel ships both packages and the CUDA sources the GPU kernels compile at run time."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("module, missing, message", [
    ("ats.torch", "torch", "ats.torch needs PyTorch, which is not installed: pip install 'atskern[torch]'"),
    ("ats.jax", "jax", "ats.jax needs JAX, which is not installed: pip install 'atskern[jax]'"),
    ("ats.ops", "tensorflow", "ats.ops needs TensorFlow, which is not installed: pip install 'atskern[tensorflow-cpu]'"),
    ("ats.tf.xla", "tensorflow", "ats.tf.xla needs TensorFlow"),
    ("ats.keras", "keras", "ats.keras needs Keras 3, which is not installed"),
    ("ats.keras", "tensorflow", "Keras' backend is 'tensorflow' (Keras' default), which is not installed"),
])
def test_a_missing_framework_names_what_to_install(module, missing, message):
    """Importing an adapter without its framework says which extra installs it (a bare "No module named" before;
    Keras without its default backend installed: which backend, and KERAS_BACKEND)."""
    code = f"import sys; sys.modules[{missing!r}] = None\ntry:\n    import {module}\nexcept ImportError as e:\n" \
           f"    print('ERROR', e)\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]))
    env.pop("KERAS_BACKEND", None)
    env["KERAS_HOME"] = "/nonexistent"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert message in done.stdout, (done.stdout, done.stderr[-2000:])
