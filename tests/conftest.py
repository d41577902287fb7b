"""Shared fixtures: the list of backends, GPU cases skipped where no CUDA device exists."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest


def _cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any CUDA/driver failure means "no GPU here"
        return False


HAS_GPU = _cuda_available()

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("gpu", id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")]),
]


def to_backend(array, backend):
    """``array`` (NumPy) on ``backend``: itself for 'cpu', a CuPy copy for 'gpu'."""
    if backend == "gpu":
        import cupy

        return cupy.asarray(array)
    return array


def to_numpy(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def small_gpu_blocks(monkeypatch):
    """Launch GPU kernels with tiny blocks so small inputs still span several blocks."""
    from atskern.gpu import _module

    monkeypatch.setattr(_module, "THREADS_PER_BLOCK", 32)


@pytest.fixture(params=["i32", "i64"])
def index_width(request, monkeypatch):
    """Run the GPU patch kernels with 32-bit and (forced by a tiny limit) 64-bit index arithmetic."""
    from atskern.gpu import patches as gp

    if request.param == "i64":
        monkeypatch.setattr(gp, "INT32_LIMIT", 1)
    gp.clear_caches()
    yield request.param
    gp.clear_caches()


FINISHES = ["finish_rows", "select_rows", "sample_rows", "sample_cluster_rows"]
HOST_ROW_CLUSTER = 4  # ATS_ROW_CLUSTER of tests/cuda_host/sampling_host.cpp, the harness the CuPy path's tests emulate


@pytest.fixture(params=FINISHES)
def finish(request, monkeypatch):
    """GPU sampling with each row finished by a finish_rows launch, by its last select_rows block in the
    selecting launch (atskern.gpu.sampling.FUSED_FINISH), sampled whole by one sample_rows block
    (atskern.gpu.sampling.WHOLE_ROWS: every row here), or by a cluster of blocks (sample_cluster_rows,
    ROW_CLUSTER), on the host build and the CuPy path alike; the value is the kernel that finishes the rows
    (without replacement)."""
    use_finish(monkeypatch, request.param)
    return request.param


def use_finish(monkeypatch, finish: str) -> None:
    """Set ``atskern.gpu.sampling``'s knobs so that ``finish`` (one of :data:`FINISHES`) finishes every row."""
    from atskern.gpu import sampling as gs

    whole = finish in ("sample_rows", "sample_cluster_rows")
    monkeypatch.setattr(gs, "FUSED_FINISH", finish == "select_rows")
    monkeypatch.setattr(gs, "WHOLE_ROWS", (1 << 30) if whole else 0)
    monkeypatch.setattr(gs, "WHOLE_ROWS_UNSCREENED", whole)
    monkeypatch.setattr(gs, "ROW_CLUSTER", HOST_ROW_CLUSTER if finish == "sample_cluster_rows" else 0)
    monkeypatch.setattr(gs, "_clusters", lambda device_id: True)


@pytest.fixture(scope="session")
def sampling_ptx(tmp_path_factory):
    """sampling.cu as PTX for sm_90 (:func:`tests.cuda_ptx.build_sampling_ptx`), compiled once per test process;
    skips where nvcc or ptxas is missing."""
    if shutil.which("nvcc") is None or shutil.which("ptxas") is None:
        pytest.skip("nvcc/ptxas not on PATH")
    from .cuda_ptx import build_sampling_ptx

    return build_sampling_ptx(tmp_path_factory.mktemp("sampling_ptx"))


SAMPLING_PTXAS_ENTRIES = ("chunk_stats_f32", "chunk_stats_f64", "chunk_topn_f32", "chunk_topn_f64", "finish_rows_f32",
                          "finish_rows_f64", "sample_rows_f32", "sample_rows_f64")
"""The kernels of :func:`sampling_ptxas`' report."""


@pytest.fixture(scope="session")
def sampling_ptxas(sampling_ptx):
    """``ptxas -v``'s report (sm_90) of the :data:`SAMPLING_PTXAS_ENTRIES` of :func:`sampling_ptx`, assembled once
    per test process."""
    from .cuda_ptx import ptxas_verbose

    return ptxas_verbose(sampling_ptx, SAMPLING_PTXAS_ENTRIES, sampling_ptx.with_suffix(".cubin"))
