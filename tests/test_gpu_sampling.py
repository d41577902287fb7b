"""The fused GPU sampling path (issue 10 items 1, 2 and 4): validation from the kernels' status, validate=False,
device seeds, CUDA-graph capture through ats.torch. Marked gpu: skipped without a CUDA device (the kernels' logic
runs on the CPU in tests/test_cuda_host_sampling.py)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import atskern
from atskern import reference

from .conftest import HAS_GPU

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")]


def _bad_rows(dtype=np.float32):
    attention = np.random.default_rng(0).random((6, 40, 30)).astype(dtype) + 0.01
    attention[1, 3, 4] = np.nan
    attention[2, 0, 0] = -1.0
    attention[3] = 0.0
    attention[4, 7, 7] = np.inf
    return attention


def _assert_each_bad_row_raises_as_on_the_cpu(attention, replace):
    """Each of _bad_rows' bad rows alone (the others made valid): the GPU's error is the CPU path's, word for word."""
    import cupy as cp

    for row in (1, 2, 3, 4):
        only = attention.copy()
        for other in (1, 2, 3, 4):
            if other != row:
                only[other] = 0.5
        with pytest.raises(ValueError) as cpu_error:
            atskern.sample(only, 5, replace=replace, seed=1)
        with pytest.raises(ValueError) as gpu_error:
            atskern.sample(cp.asarray(only), 5, replace=replace, seed=1)
        assert str(gpu_error.value) == str(cpu_error.value), row


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("replace", [False, True])
def test_validation_messages_equal_the_cpu_path(replace):
    import cupy as cp

    _assert_each_bad_row_raises_as_on_the_cpu(_bad_rows(), replace)
    short = np.zeros((2, 50), np.float32)
    short[:, :3] = 1
    with pytest.raises(ValueError) as cpu_error:
        atskern.sample(short, 5, seed=1, strict=True)
    with pytest.raises(ValueError) as gpu_error:
        atskern.sample(cp.asarray(short), 5, seed=1, strict=True)
    assert str(gpu_error.value) == str(cpu_error.value)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("replace", [False, True])
def test_validate_false_gives_the_documented_result(replace):
    """Bad rows: in-range indices, probs exactly 0, the status left on the device; check_status raises later."""
    import cupy as cp

    attention = _bad_rows()
    indices, probs, status = atskern.sample(cp.asarray(attention), 5, replace=replace, seed=3, validate=False,
                                            return_status=True)
    assert isinstance(status, cp.ndarray)
    indices, probs = indices.get(), probs.get()
    assert ((indices >= 0) & (indices < np.array([40, 30]))).all()
    assert (probs[1:5] == 0).all() and (probs[[0, 5]] > 0).all()
    cpu_indices, cpu_probs, cpu_status = atskern.sample(attention, 5, replace=replace, seed=3, validate=False,
                                                        return_status=True)
    assert (cpu_probs[1:5] == 0).all()
    assert np.array_equal(status.get()[:, :3], cpu_status[:, :3])
    with pytest.raises(ValueError, match="attention row 1 contains NaN or inf"):
        atskern.check_status(status, 5, replace=replace)
    assert np.array_equal(indices[[0, 5]], cpu_indices[[0, 5]])


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_device_seed_draws_as_the_int_seed(replace, logits):
    import cupy as cp

    attention = np.random.default_rng(1).random((4, 300, 7)) * (1 if not logits else 30)
    seed = 2**63 + 5
    want = atskern.sample(attention, 9, replace=replace, logits=logits, seed=seed)
    got = atskern.sample(cp.asarray(attention), 9, replace=replace, logits=logits, seed=cp.array([seed], cp.uint64))
    assert np.array_equal(got[0].get(), want[0])
    np.testing.assert_allclose(got[1].get(), want[1], rtol=1e-12)


@pytest.mark.usefixtures("finish")
def test_scale_free_and_large_n_on_the_device():
    import cupy as cp

    base = np.random.default_rng(2).random((1, 5000))
    attention = np.concatenate([base * 1e-320, base * 1e300, base])
    for n in (7, 1990, 3500):  # 3500: beyond the shared-memory selection (2048), every key sorted
        want = atskern.sample(attention, n, seed=4)
        got = atskern.sample(cp.asarray(attention), n, seed=4)
        assert np.array_equal(got[0].get(), want[0]), n
        np.testing.assert_allclose(got[1].get(), want[1], rtol=1e-12)


def _large_n_rows(dtype):
    """Plain, near-tie, short (fillers), exact-tie (+inf keys, float64 only) and rescaled (float64) rows."""
    rng = np.random.default_rng(4)
    size = 6000
    rows = [rng.random(size), np.choose(rng.integers(0, 3, size), [1.0, np.nextafter(1.0, 2.0), 2.0])]
    short = np.zeros(size)
    short[rng.choice(size, 1500, replace=False)] = rng.random(1500) + 0.5
    rows.append(short)
    if dtype == np.float64:
        ties = np.full(size, 5e-324)  # keys -log(u) / 5e-324 overflow to +inf: drawn in position order
        ties[rng.choice(size, 300, replace=False)] = 1.0
        rows += [ties, rng.random(size) * 1e-300]
    return np.stack(rows).astype(dtype)


@pytest.mark.parametrize("threads", [32, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_n_selected_on_the_device(monkeypatch, threads, dtype, finish):
    """n up to 2048 through the block radix sort (no full sort of the row), at the smallest and the default block
    size, several chunks a row: draws equal the reference's, probabilities the CPU path's; 2049 takes the sort."""
    import cupy as cp

    from atskern.gpu import _module
    from atskern.gpu import sampling as gs

    monkeypatch.setattr(_module, "THREADS_PER_BLOCK", threads)
    monkeypatch.setattr(gs, "MIN_CHUNK", 4096)
    attention = _large_n_rows(dtype)
    for n in (1921, 2048, 2049):
        p = gs.plan(len(attention), attention.shape[1], n, False, threads, 132)
        assert p.sort == (n > 2048) and p.whole_rows == (finish.startswith("sample_") and n <= 2048)
        got_i, got_p = atskern.sample(cp.asarray(attention), n, seed=n)
        want_i, cpu_i, cpu_p = _large_n_expected(dtype, n)
        assert np.array_equal(got_i.get(), want_i), n
        assert np.array_equal(cpu_i, want_i), n
        np.testing.assert_allclose(got_p.get(), cpu_p, rtol=1e-6 if dtype == np.float32 else 1e-12)


@functools.lru_cache(maxsize=None)
def _large_n_expected(dtype, n):
    """The reference's draws and the CPU path's draws and probabilities of ``_large_n_rows(dtype)`` (seed n),
    computed once per worker: the reference takes most of the test's time, and every finish asks for them."""
    attention = _large_n_rows(dtype)
    return (reference.sample(attention, n, seed=n)[0],) + tuple(atskern.sample(attention, n, seed=n))


def _screening_rows(dtype, size):
    """Rows for each way of sampling without replacement: even (screened), one cell holding half the mass (selected
    chunk by chunk), 40 positive cells (selected: fewer than screening expects), zero-heavy, and a float64 row that
    pass 1 rescales (screened there)."""
    rng = np.random.default_rng(size)
    rows = rng.random((5, size)) + 0.05
    rows[1, 7] = size
    rows[2, 40:] = 0
    rows[3, ::3] = 0
    if dtype == np.float64:
        rows[4] *= 1e-300
    return rows.astype(dtype)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("capacity", ["planned", "tight"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 10, 100])
def test_screened_selected_and_alone_rows_draw_as_the_cpu(monkeypatch, n, dtype, capacity):
    """Screened rows (every key under the row's bound into one buffer, sorted), rows selected chunk by chunk, and,
    with a screening buffer of n + 1 slots, screened rows that overflow it and finish_rows selects alone: the
    draws equal the CPU kernel's and the reference's, over many chunks of a 300x300 map."""
    import cupy as cp

    from atskern.gpu import sampling as gs

    if capacity == "tight":
        monkeypatch.setattr(gs, "screen_capacity", lambda n_, size, threads: n_ + 1)
    attention = _screening_rows(dtype, 300 * 300).reshape(5, 300, 300)
    got_i, got_p = atskern.sample(cp.asarray(attention), n, seed=n + 7)
    cpu_i, cpu_p = atskern.sample(attention, n, seed=n + 7)
    want_i, _ = reference.sample(attention, n, seed=n + 7)
    assert np.array_equal(got_i.get(), cpu_i) and np.array_equal(cpu_i, want_i)
    np.testing.assert_allclose(got_p.get(), cpu_p, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_validate_false_call_is_capturable_in_a_cuda_graph():
    """validate=False with a device seed: no host synchronization, so a CuPy stream capture works and a replay
    with a new seed value draws anew."""
    import cupy as cp

    attention = cp.asarray(np.random.default_rng(3).random((8, 64, 64)).astype(np.float32))
    seed = cp.array([11], cp.uint64)
    atskern.sample(attention, 10, seed=seed, validate=False)  # compile and load outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        indices, _ = atskern.sample(attention, 10, seed=seed, validate=False)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    first = indices.get()
    assert np.array_equal(first, atskern.sample(attention.get(), 10, seed=11)[0])
    seed[...] = 12
    graph.launch(stream)
    stream.synchronize()
    assert np.array_equal(indices.get(), atskern.sample(attention.get(), 10, seed=12)[0])


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("rows", [1, 37, 300])
@pytest.mark.parametrize("dtype, replace", [(np.float32, False), (np.float64, False), (np.float32, True)])
def test_mapped_status_validates_as_the_device_status(monkeypatch, rows, dtype, replace):
    """``MAPPED_STATUS``: the block that writes a validated call's summary row copies the status into mapped host
    memory; the draws, probabilities and every validation error equal those of the status read back from device
    memory and of the CPU path, on a stream of CuPy's and on the null stream (300 rows: more than a block's threads
    in the summary's loops)."""
    import cupy as cp

    from atskern.gpu import _mapped
    from atskern.gpu import sampling as gs

    attention = (np.random.default_rng(rows).random((rows, 64, 48)) + 0.01).astype(dtype)
    monkeypatch.setattr(gs, "MAPPED_STATUS", False)
    want_i, want_p = atskern.sample(cp.asarray(attention), 9, seed=4, replace=replace)
    monkeypatch.setattr(gs, "MAPPED_STATUS", True)
    buffers = []
    original = _mapped.status_buffer
    monkeypatch.setattr(_mapped, "status_buffer", lambda *args: buffers.append(original(*args)) or buffers[-1])
    for stream in (cp.cuda.Stream(non_blocking=True), cp.cuda.Stream.null):
        with stream:
            got_i, got_p = atskern.sample(cp.asarray(attention), 9, seed=4, replace=replace)
        assert np.array_equal(got_i.get(), want_i.get()) and np.array_equal(got_p.get(), want_p.get())
    assert len(buffers) == 2 and all(buffer is not None for buffer in buffers)  # the mapped path was taken
    cpu_i, _ = atskern.sample(attention, 9, seed=4, replace=replace)
    assert np.array_equal(want_i.get(), cpu_i)

    _assert_each_bad_row_raises_as_on_the_cpu(_bad_rows(dtype), replace)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_attention_draws_as_the_cpu(dtype):
    """Attention at an address that is not a multiple of its item size (a byte slice viewed as float), contiguous
    or strided: the CPU's draws, the CUDA context intact; a device seed at such an address is a TypeError."""
    import cupy as cp

    from bench.gpu_smoke import bytes_off

    attention = np.random.default_rng(9).random((3, 20, 33)).astype(dtype) + 0.01
    want_indices, _ = atskern.sample(attention, 6, seed=4)
    contiguous = bytes_off(cp, attention)
    strided = contiguous[:, ::-2, :]
    want_strided, _ = atskern.sample(attention[:, ::-2], 6, seed=4)
    for device_attention, want in [(contiguous, want_indices), (strided, want_strided)]:
        indices, _ = atskern.sample(device_attention, 6, seed=4)
        assert np.array_equal(indices.get(), want)
    seed_raw = cp.zeros(16, np.uint8)
    seed = cp.ndarray((1,), np.uint64, memptr=seed_raw.data + 4)
    with pytest.raises(TypeError, match="multiple of 8"):
        atskern.sample(cp.asarray(attention), 6, seed=seed)
    cp.cuda.runtime.deviceSynchronize()  # a fault would surface here
