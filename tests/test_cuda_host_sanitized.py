"""The CUDA kernels' host builds under AddressSanitizer and UndefinedBehaviorSanitizer.

``tests/test_cuda_host*.py`` run the kernels' own source on the CPU. Here a selection of those tests runs again in a
subprocess whose harnesses are built with ``-fsanitize=address,undefined`` (every report fatal,
``tests/cuda_host_build.py``) and whose sanitizer runtimes are preloaded, so that NumPy's buffers (the kernels'
global memory) get redzones too. A read or write past any array, past a ``__shared__`` array, a misaligned access
(an element at an address that is not a multiple of its size, or a CUDA vector type such as ``uint4`` at one that
is not a multiple of 16: both fault on a GPU; the shim gives those types CUDA's alignment), a signed overflow, an
oversized shift or a float-to-integer conversion out of range fails it: a CPU-only stand-in for ``compute-sanitizer --tool memcheck``, for the kernels' own code.

The selection (``SELECTION``) keeps CI time down: the hypothesis fuzz of the gather, the scatter and the sampling
kernels and of the public front ends on the emulated device (every finish, ``sample_cluster_rows`` included, which
has not run on a GPU yet), the reads and writes at the arrays' edges, the misaligned arrays and
``bench.gpu_smoke``'s workouts. ``ATS_SANITIZE_SELECTION= python -m pytest tests/test_cuda_host_sanitized.py`` runs
every host test sanitized (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .cuda_host_build import HERE, SANITIZE

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_cuda_host.py", "tests/test_cuda_host_sampling.py"]
SELECTION = "fuzz or misaligned or smoke or alignment or outside or past"
"""``pytest -k`` over :data:`FILES` (the environment variable ``ATS_SANITIZE_SELECTION`` overrides it; empty: all)."""

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


def _runtime(name: str) -> str | None:
    """The path of g++'s sanitizer runtime ``lib<name>.so``, or None where it is not installed."""
    found = subprocess.run(["g++", f"-print-file-name=lib{name}.so"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.fixture(scope="module")
def sanitized_env():
    runtimes = [_runtime("asan"), _runtime("ubsan")]
    if None in runtimes:
        pytest.skip("g++'s AddressSanitizer or UndefinedBehaviorSanitizer runtime is not installed")
    return dict(os.environ, **{SANITIZE: "1", "LD_PRELOAD": ":".join(runtimes),
                               "ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0",
                               "UBSAN_OPTIONS": "print_stacktrace=1",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])})


PROBE = r"""
#include "cuda_shim.h"
extern "C" void past_the_end(int* a, int n) { a[n] = 1; }
extern "C" void vector_store(unsigned char* p) { *reinterpret_cast<uint4*>(p) = make_uint4(1, 2, 3, 4); }
"""


@pytest.mark.parametrize("call, report", [("past_the_end(a.ctypes.data, a.size)", "heap-buffer-overflow"),
                                          ("vector_store(line + 4)", "misaligned address")])
def test_the_sanitizers_report_what_a_gpu_would_fault_on(tmp_path, sanitized_env, call, report):
    """The set-up is live: a write one element past a NumPy array, and a ``uint4`` store 4 bytes past a 16-byte
    boundary, each end the process with the sanitizer's report; the same store on the boundary does not."""
    from .cuda_host_build import sanitizer_flags

    assert sanitizer_flags() == []  # only where the environment asks
    flags = subprocess.run([sys.executable, "-c", "from tests.cuda_host_build import sanitizer_flags; "
                            "print(' '.join(sanitizer_flags()))"], cwd=ROOT, env=sanitized_env, capture_output=True,
                           text=True).stdout.split()
    assert any(f.startswith("-fsanitize=address,undefined") for f in flags)
    (tmp_path / "probe.cpp").write_text(PROBE)
    library = tmp_path / "probe.so"
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", *flags, f"-I{HERE}",
                            str(tmp_path / "probe.cpp"), "-o", str(library)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    script = (f"import ctypes, numpy; lib = ctypes.CDLL({str(library)!r}); a = numpy.zeros(16, numpy.int32); "
              "line = -(-a.ctypes.data // 16) * 16; "
              "lib.past_the_end.argtypes = [ctypes.c_void_p, ctypes.c_int]; "
              "lib.vector_store.argtypes = [ctypes.c_void_p]; lib.{}; print('survived')")
    fine = subprocess.run([sys.executable, "-c", script.format("vector_store(line)")], env=sanitized_env,
                          capture_output=True, text=True)
    assert fine.returncode == 0 and "survived" in fine.stdout, fine.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", script.format(call)], env=sanitized_env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "survived" not in bad.stdout and report in bad.stderr, bad.stderr[-2000:]


def test_host_kernels_under_the_sanitizers(sanitized_env):
    """:data:`SELECTION` of the host tests, harnesses built sanitized: they pass, with no sanitizer report."""
    selection = os.environ.get("ATS_SANITIZE_SELECTION", SELECTION)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          *(["-k", selection] if selection else []), *FILES], cwd=ROOT, env=sanitized_env,
                         capture_output=True, text=True, timeout=1200)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "runtime error" not in output and "AddressSanitizer" not in output.replace(
        "ASan doesn't fully support makecontext/swapcontext", ""), output[-6000:]
    assert " passed" in run.stdout.splitlines()[-1]
