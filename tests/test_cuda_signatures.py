"""The launch lists of ``atskern.gpu`` against the kernels' own parameter lists, and the untyped packing of
``atskern.gpu._launch``.

The CuPy path launches through the driver with every argument in an 8-byte slot (``_launch``): nothing checks the
argument count or kinds at launch, so these tests do, on every path of both modules, against the parameters of the
preprocessed CUDA sources (``g++ -E``).
"""

from __future__ import annotations

import ctypes
import shutil
import struct
import threading
import types

import numpy as np
import pytest

from atskern import _validation as v
from atskern.gpu import _launch
from atskern.gpu import patches as gp
from atskern.gpu import sampling as gs

from .cuda_host_build import kernel_parameters

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")

RANGES = {"i32": (-2**31, 2**31), "u32": (0, 2**32), "i64": (-2**63, 2**63), "u64": (0, 2**64)}


def check_arguments(source, name, args):
    kinds = kernel_parameters(source)[name]
    assert len(args) == len(kinds), f"{name}: {len(args)} arguments for {len(kinds)} parameters"
    for i, (kind, arg) in enumerate(zip(kinds, args)):
        if kind == "ptr":
            assert isinstance(arg, np.ndarray) or (type(arg) is int and arg == 0), f"{name} argument {i}: {arg!r}"
        else:
            low, high = RANGES[kind]
            assert type(arg) is int and low <= arg < high, f"{name} argument {i} ({kind}): {arg!r}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, replace, logits", [(10, False, False), (10, False, True), (5, True, False),
                                                 (5, True, True), (2049, False, False), (3000, False, True)])
@pytest.mark.parametrize("seed_array", [False, True])
@pytest.mark.parametrize("finish", ["finish_rows", "select_rows", "sample_rows", "sample_cluster_rows"])
def test_sampling_launches_match_the_kernel_parameters(dtype, n, replace, logits, seed_array, finish):
    rows, size = 3, 5000
    fused = finish == "select_rows"
    p = gs.plan(rows, size, n, replace, 256, multiprocessors=4, chunk=1024, fused=fused,
                whole_rows=finish.startswith("sample_"), row_cluster=8 if finish == "sample_cluster_rows" else 0)
    ws = gs.workspace(np.empty, rows, size, n, p, replace, logits)
    weights = np.zeros((rows, size), dtype)
    seed_ptr = np.zeros(1, np.uint64) if seed_array else None
    steps = gs.launches(weights, n, (50, 100), 2**64 - 1, replace, logits, ws, p, np.empty((rows, n, 2), np.int32),
                        np.empty((rows, n), dtype), seed_ptr)
    launched = [step for step in steps if step not in (gs.SORT_STEP, gs.ZERO_STEP)]
    assert launched
    names = {step[0][:-4] for step in launched}
    assert ("select_rows" in names) == p.fused == (fused and not replace and not p.sort)
    assert not (p.fused and names & {"chunk_topn", "finish_rows"})
    assert (names == {finish}) == p.whole_rows == (finish.startswith("sample_") and not replace and not p.sort)
    for name, grid, block, args in launched:
        check_arguments(gs.SOURCE, name, args)
        assert len(grid) == len(block) == 1 and grid[0] >= 1 and block[0] in (256, gs.stats_threads(256))
        if name.startswith("sample_cluster_rows"):
            assert grid[0] == rows * 8  # a cluster of 8 blocks a row


def _patch_case(channels_first, offsets_dtype, ndim):
    shape = (2, 3, 11, 13) if channels_first else (2, 11, 13, 3)
    if ndim == 3:
        shape = shape[:2] + (5,) + shape[2:] if channels_first else shape[:1] + (5,) + shape[1:]
    x = np.zeros(shape, np.float32)
    offsets = np.zeros((2, 4, ndim), offsets_dtype)[:, ::-1]  # strided offsets go to the kernel as they are
    patch = (3,) * ndim
    return x, offsets, patch


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("offsets_dtype", [np.int32, np.uint8, np.int64])
@pytest.mark.parametrize("ndim", [2, 3])
def test_patch_launches_match_the_kernel_parameters(channels_first, offsets_dtype, ndim):
    x, offsets, patch = _patch_case(channels_first, offsets_dtype, ndim)
    layout, fill = v.check_gather(x, offsets, patch, -1.5, channels_first, None)
    out = np.empty(layout.patches_shape, x.dtype)
    name, grid, block, args = gp.gather_launch(x, offsets, layout, fill, out)
    check_arguments(gp.SOURCE, name, args)
    grad = np.zeros(layout.patches_shape, np.float64)
    scatter_layout, _ = v.check_scatter(grad, offsets, x.shape[1:-1] if not channels_first else x.shape[2:],
                                        channels_first, None)
    image = np.empty(scatter_layout.image_shape, np.float64)
    for deterministic in (True, False):
        name, grid, block, args = gp.scatter_launch(grad, offsets, scatter_layout, image, deterministic)
        check_arguments(gp.SOURCE, name, args)


def test_words_are_the_little_endian_bytes_of_each_parameter():
    """A slot's low bytes are the parameter: an int32 -5 reads back as -5 from the first 4 bytes of its word; a
    uint64 seed keeps all 64 bits; None is a null pointer; a device array gives its address."""
    device = types.SimpleNamespace(data=types.SimpleNamespace(ptr=0x7F0000001000))
    interface = types.SimpleNamespace(__cuda_array_interface__={"data": (0x7F0000002000, False)})
    words = _launch.pack([-5, 2**64 - 1, None, np.int32(-7), np.uint64(2**63), device, interface, True])
    raw = struct.pack("<8Q", *words)
    assert struct.unpack_from("<i", raw, 0)[0] == -5
    assert struct.unpack_from("<Q", raw, 8)[0] == 2**64 - 1
    assert struct.unpack_from("<Q", raw, 16)[0] == 0
    assert struct.unpack_from("<i", raw, 24)[0] == -7
    assert words[4:] == [2**63, 0x7F0000001000, 0x7F0000002000, 1]
    with pytest.raises(TypeError, match="integer, None or a device array"):
        _launch.pack([np.zeros(3)])
    with pytest.raises(TypeError, match="integer, None or a device array"):
        _launch.pack([1.5])


def _fake_cupy(calls):
    def launch_kernel(*arguments):
        handle, gx, gy, gz, bx, by, bz, shared, stream, table, extra = arguments
        count = calls["count"]
        slots = [ctypes.c_uint64.from_address(table + 8 * i).value for i in range(count)]
        calls["launches"].append(((handle, gx, gy, gz, bx, by, bz, shared, stream, extra),
                                  [ctypes.c_uint64.from_address(s).value for s in slots], table,
                                  threading.get_ident()))

    bound = calls.setdefault("bound", set())  # threads with a current context

    def free(ptr):
        assert ptr == 0
        calls.setdefault("bind", []).append(threading.get_ident())
        bound.add(threading.get_ident())

    driver = types.SimpleNamespace(launchKernel=launch_kernel,
                                   ctxGetCurrent=lambda: 0x77 if threading.get_ident() in bound else 0)
    runtime = types.SimpleNamespace(free=free)
    stream = types.SimpleNamespace(ptr=0xABC)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(driver=driver, runtime=runtime,
                                                            get_current_stream=lambda: stream))


def test_launch_passes_a_table_of_slots_holding_the_words(monkeypatch):
    calls = {"launches": [], "count": 4}
    monkeypatch.setattr(_launch, "cupy", lambda: _fake_cupy(calls))
    kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=0x1234))
    _launch.launch(kernel, (7,), (256,), (3, -1, None, 2**64 - 2))
    _launch.launch(0x99, (2, 3), (32, 4, 2), (5, 6, 7, 8), stream=0x55)
    (first, words, _, _), (second, words2, _, _) = calls["launches"]
    assert first == (0x1234, 7, 1, 1, 256, 1, 1, 0, 0xABC, 0) and words == [3, 2**64 - 1, 0, 2**64 - 2]
    assert second == (0x99, 2, 3, 1, 32, 4, 2, 0, 0x55, 0) and words2 == [5, 6, 7, 8]


def test_each_thread_packs_into_its_own_slots(monkeypatch):
    """Two threads launching at once never write each other's slots (the driver reads them during the call)."""
    calls = {"launches": [], "count": 2}
    monkeypatch.setattr(_launch, "cupy", lambda: _fake_cupy(calls))
    barrier = threading.Barrier(2)

    def run(value):
        barrier.wait()
        _launch.launch(1, (1,), (32,), (value, value))
        barrier.wait()  # both threads' slots alive at once

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({table for _, _, table, _ in calls["launches"]}) == 2
    assert len({thread for _, _, _, thread in calls["launches"]}) == 2
    assert sorted(words for _, words, _, _ in calls["launches"]) == [[0, 0], [1, 1]]


def test_a_launch_without_a_current_context_binds_one(monkeypatch):
    """A thread that has made no runtime call has no current context for a driver launch: its first launch makes
    one (``cudaFree(0)``); later launches, and threads that have one, make no such call."""
    calls = {"launches": [], "count": 1, "bound": {threading.get_ident()}}  # this thread: a context already
    monkeypatch.setattr(_launch, "cupy", lambda: _fake_cupy(calls))

    def launches(barrier=None):
        for _ in range(3):
            _launch.launch(1, (1,), (32,), (0,))
        if barrier is not None:
            barrier.wait()  # both workers alive at once: distinct thread idents

    barrier = threading.Barrier(2)
    workers = [threading.Thread(target=launches, args=(barrier,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    launches()
    assert sorted(calls["bind"]) == sorted(worker.ident for worker in workers) and len(calls["launches"]) == 9
