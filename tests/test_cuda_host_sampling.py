"""The CUDA sampling kernels' own source, compiled for the host and run on the CPU (no GPU needed).

``tests/cuda_host`` shims the CUDA built-ins (a block's threads are fibers meeting at __syncthreads, warp
shuffles and ballots exchange through memory between barriers, atomics under a mutex), so
``atskern/gpu/sampling.cu`` compiles with g++. Each call runs the exact launch plan of
``atskern.gpu.sampling.launches`` -- kernel names, grids, blocks and argument lists a CuPy launch gets -- on NumPy
arrays, with small blocks and chunks so that tiny rows span many blocks and the shared row bound, the buffer
compaction, the rescaling pass and the sort fallback all run. Draws must equal the CPU kernel's and the
reference's for the same seed; probabilities and the status are checked against an independent computation.
"""

from __future__ import annotations

import dataclasses
import shutil
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import atskern
from atskern import _validation as v
from atskern import reference
from atskern.cpu import sampling as cpu_sampling
from atskern.gpu import sampling as gs

from .cuda_host_build import build_host_library, call_host
from .emulated_device import DeviceArray, Memory, install, placed


pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


HARNESSES = {32: "sampling_host", 64: "sampling_host_t64"}  # ATS_SELECT_THREADS of each host build


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """The host builds by block size of the selecting kernels, built on first use."""
    built = {}

    def get(threads):
        if threads not in built:
            built[threads] = build_host_library(tmp_path_factory.mktemp(f"cuda_host_sampling_{threads}"),
                                                HARNESSES[threads])
        return built[threads]

    return get


@pytest.fixture(scope="module")
def lib(libs):
    return libs(32)


@pytest.fixture(autouse=True)
def chunked_unless_asked(monkeypatch):
    """The chunked launches for every test here that neither takes the ``finish`` fixture (which sets the knobs
    after this) nor passes ``whole_rows``: with the harness's one multiprocessor the default rule would send almost
    every row to ``sample_rows``, and these tests are about the chunked kernels."""
    monkeypatch.setattr(gs, "WHOLE_ROWS", 0)


def _garbage(shape, dtype):
    """Work space full of a byte pattern, so a kernel that reads what it never wrote shows up."""
    return np.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, 0xA5, np.uint8).view(dtype).reshape(shape)


def host_sample(lib, attention, n, *, seed, replace=False, logits=False, threads=32, chunk=128, seed_array=None,
                capacity=None, keep=None, probs_dtype=np.float64, fused=None, whole_rows=None, row_cluster=None):
    """``atskern.gpu.sampling.sample`` with the host build: (indices, float64 probs, status, plan). ``threads``
    must be the ATS_SELECT_THREADS ``lib`` was built with. ``capacity`` overrides the plan's screening buffer (0:
    every row selected chunk by chunk); ``keep`` (a dict) receives the workspace; ``probs_dtype`` is float64 (the
    tests' precision) or float32 (as the CuPy path writes float32 maps' probabilities); ``fused`` overrides
    gs.FUSED_FINISH and ``whole_rows`` gs.WHOLE_ROWS (True: a block per row, sample_rows); a whole-row plan takes
    ``row_cluster`` blocks a row (default: the harness's cluster size where gs.ROW_CLUSTER is on, else 0)."""
    rows = attention.shape[0]
    grid = attention.shape[1:]
    weights = np.ascontiguousarray(attention).reshape(rows, -1)
    size = weights.shape[1]
    if row_cluster is None:
        row_cluster = lib.host_row_cluster() if gs.ROW_CLUSTER > 1 else 0
    p = gs.plan(rows, size, n, replace, threads, multiprocessors=1, chunk=chunk, fused=fused, whole_rows=whole_rows,
                row_cluster=row_cluster)
    if capacity is not None:
        p = dataclasses.replace(p, capacity=capacity)
    ws = gs.workspace(_garbage, rows, size, n, p, replace, logits)
    if keep is not None:
        keep["workspace"] = ws
    indices = _garbage((rows, n, len(grid)), np.int32)
    probs = _garbage((rows, n), probs_dtype)
    for step in gs.launches(weights, n, grid, seed, replace, logits, ws, p, indices, probs, seed_array):
        if step == gs.ZERO_STEP:
            gs.zero_workspace(ws)
            continue
        if step == gs.SORT_STEP:
            gs.sort_keys(np, ws, n)
            continue
        name, grid_dims, block, args = step
        assert block[0] % 32 == 0
        call_host(lib, gs.SOURCE, name, grid_dims, block, args)
    return indices, probs, ws.status, p


def cpu_sample(attention, n, seed, replace, logits=False):
    """The CPU path of ``atskern.sample`` without the dtype cast: float64 probs."""
    weights = np.ascontiguousarray(attention).reshape(attention.shape[0], -1)
    if logits:
        weights = atskern.sampling.logits_to_weights(np, weights)
    grid = np.array(attention.shape[1:], np.int64)
    indices, probs, status = cpu_sampling.sample(weights, n, grid, seed, replace)
    rescale = v.rows_to_rescale(status[:-1], weights.dtype)
    if rescale.any():
        weights = atskern.sampling.rescale_rows(np, weights, status[:-1], rescale)
        indices, probs, _ = cpu_sampling.sample(weights, n, grid, seed, replace)
    return indices, probs, status


def assert_same_status(status, cpu_status):
    """Counts and the summary row exactly; the exponent column where the CPU computes it (it skips rows whose
    total shows them in range, reporting 0; the GPU always reports the largest weight's exponent)."""
    assert np.array_equal(status[:, :3], cpu_status[:, :3])
    assert np.array_equal(status[-1], cpu_status[-1])
    known = cpu_status[:-1, 3] != 0
    assert np.array_equal(status[:-1, 3][known], cpu_status[:-1, 3][known])


def flat_positions(indices, grid):
    flat = np.zeros(indices.shape[:2], np.int64)
    for d, g in enumerate(grid):
        flat = flat * g + indices[..., d]
    return flat


def independent_probs(attention, flat, logits=False):
    """Each drawn cell's probability from its own row by a plain float64 division (0 for non-positive cells)."""
    w = np.asarray(attention, np.float64).reshape(attention.shape[0], -1)
    if logits:
        w = np.exp(w - w.max(axis=1, keepdims=True))
    drawn = np.take_along_axis(w, flat, axis=1)
    return np.where(drawn > 0, drawn / w.sum(axis=1, keepdims=True), 0.0)


@pytest.mark.parametrize("replace", [False, True], ids=["successive", "replace"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_draws_equal_cpu_and_reference(lib, dtype, replace, finish):
    rng = np.random.default_rng(7 + replace)
    for trial, shape in enumerate([(3, 700), (2, 19, 23), (2, 5, 6, 7), (1, 1)]):
        attention = (rng.random(shape) ** 3).astype(dtype)
        n = min(1 if shape == (1, 1) else 5 + 7 * trial, attention[0].size)
        seed = 1000 + trial
        indices, probs, status, p = host_sample(lib, attention, n, seed=seed, replace=replace)
        assert p.whole_rows == (finish in ("sample_rows", "sample_cluster_rows") and not replace)
        assert (p.row_cluster > 1) == (finish == "sample_cluster_rows" and not replace)
        assert p.nchunks > 1 or attention[0].size <= 128 or p.whole_rows
        ref_i, ref_p = reference.sample(attention, n, replace=replace, seed=seed)
        cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, seed, replace)
        assert np.array_equal(indices, ref_i) and np.array_equal(indices, cpu_i), (trial, shape)
        np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
        np.testing.assert_allclose(probs, independent_probs(attention, flat_positions(indices, shape[1:])), rtol=1e-12)
        assert_same_status(status, cpu_status)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("screen", [True, False], ids=["screened", "selected"])
@pytest.mark.parametrize("threads, chunk, ns", [(32, 128, (1, 40)), (64, 256, (3, 100)), (32, 1024, (200,))])
def test_host_many_blocks_share_one_bound(libs, threads, chunk, ns, screen):
    """A long row in many chunks, several rows: the exact n smallest keys (n near the block room runs on the GPU:
    the host barriers are slow), screened, and selected chunk by chunk through the shared bound."""
    rng = np.random.default_rng(threads + chunk)
    attention = rng.exponential(size=(3, 3000)).astype(np.float32)
    attention[1, ::3] = 0
    for n in ns:
        assert n <= gs.max_selection_n(threads)
        indices, probs, status, _ = host_sample(libs(threads), attention, n, seed=n, threads=threads, chunk=chunk,
                                                capacity=None if screen else 0)
        cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, n, False)
        assert np.array_equal(indices, cpu_i), n
        np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
        assert_same_status(status, cpu_status)


def _large_n_rows(rng):
    """Rows for n near MAX_SELECTION_N: plain, near-ties, a short row (fillers), exact ties of +inf keys, and a
    row that the scale-free pass redoes."""
    size = 6000
    rows = np.empty((5, size))
    rows[0] = rng.random(size)
    rows[1] = np.choose(rng.integers(0, 3, size), [1.0, np.nextafter(1.0, 2.0), 2.0])  # equal and 1-ulp weights
    rows[2] = 0.0
    rows[2, rng.choice(size, 1500, replace=False)] = rng.random(1500) + 0.5  # 1500 positive: fillers follow (R1)
    rows[3] = 5e-324  # keys -log(u) / 5e-324 overflow to +inf: exact ties, drawn in position order
    rows[3, rng.choice(size, 300, replace=False)] = 1.0
    rows[4] = rng.random(size) * 1e-300  # exponent outside SCALE_FREE_EXPONENTS: pass 1 redoes it
    return rows


@pytest.mark.parametrize("threads, n", [(32, 1921), (32, 2048), (64, 2048)])
def test_host_large_n_selected_in_shared_memory(libs, threads, n, finish):
    """n up to MAX_SELECTION_N without the full sort: the chunks' buffers compact with the block radix sort (a
    chunk larger than n, so a block compacts while it scans), the row merge takes two chunks' lists, ties (equal
    +inf keys) go to the lower position across compactions and chunks, and the draws equal the reference's and
    the CPU kernel's."""
    attention = _large_n_rows(np.random.default_rng(n + threads))
    indices, probs, status, p = host_sample(libs(threads), attention, n, seed=n, threads=threads, chunk=4096)
    assert not p.sort and (p.whole_rows if finish.startswith("sample_") else p.nchunks == 2)
    ref_i, ref_p = reference.sample(attention, n, seed=n)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, n, False)
    for row in range(attention.shape[0]):
        assert np.array_equal(indices[row], ref_i[row]) and np.array_equal(indices[row], cpu_i[row]), row
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    flat = flat_positions(indices, attention.shape[1:])
    expected = independent_probs(attention * np.array([1, 1, 1, 1, 1e300])[:, None], flat)
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert_same_status(status, cpu_status)
    # independent of the reference: every draw distinct; the short row's fillers are its lowest zero cells in
    # order, with probability 0; the +inf-key row draws its 300 unit weights first, then tied cells by position
    assert all(len(np.unique(f)) == n for f in flat)
    zeros = np.flatnonzero(attention[2] == 0)[: n - 1500]
    assert np.array_equal(flat[2, 1500:], zeros) and (probs[2, 1500:] == 0).all() and (probs[2, :1500] > 0).all()
    assert set(flat[3, :300]) == set(np.flatnonzero(attention[3] == 1.0))
    assert np.array_equal(flat[3, 300:], np.flatnonzero(attention[3] != 1.0)[: n - 300])


LEVELS = [0.0, 5e-324, 1e-300, 0.25, 1.0, 1.0 + 2**-52, 3.0]  # zeros, +inf keys, equal and 1-ulp weights


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 3), size=st.integers(1, 700), n_fraction=st.floats(0.0, 1.0),
       levels=st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4, unique=True),
       chunk=st.sampled_from([128, 256, 512]), seed=st.integers(0, 2**64 - 1), screen=st.booleans(),
       finish=st.sampled_from(["finish_rows", "select_rows", "sample_rows", "sample_cluster_rows"]))
def test_host_fuzz_ties_fillers_and_chunks(lib, rows, size, n_fraction, levels, chunk, seed, screen, finish):
    """Rows drawn from a few weight levels (many equal keys, exact +inf ties, zeros: fillers, rows that the
    scale-free pass redoes), any n and chunking, each way of finishing the rows (sample_rows: a block per row):
    the host build draws as the reference and the CPU kernel."""
    fused, whole = finish == "select_rows", finish.startswith("sample_")
    rng = np.random.default_rng(seed % 2**32)
    attention = rng.choice(np.array(levels), size=(rows, size))
    attention[np.arange(rows), rng.integers(0, size, rows)] = max(max(levels), 5e-324)  # a positive cell a row
    n = max(1, int(round(n_fraction * size)))
    cluster = lib.host_row_cluster() if finish == "sample_cluster_rows" else 0
    indices, probs, status, p = host_sample(lib, attention, n, seed=seed, chunk=chunk, capacity=None if screen else 0,
                                            fused=fused, whole_rows=whole, row_cluster=cluster)
    assert p.fused == (fused and not p.sort) and p.whole_rows == (whole and not p.sort)
    ref_i, _ = reference.sample(attention, n, seed=seed)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, seed, False)
    assert np.array_equal(indices, ref_i) and np.array_equal(indices, cpu_i)
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    assert_same_status(status, cpu_status)


def test_host_sort_fallback_for_large_n(lib):
    """n beyond the shared-memory selection (MAX_SELECTION_N): every key sorted, same draws; n larger than a
    block's buffer (the presorted list is read from device memory, never copied into shared memory)."""
    rng = np.random.default_rng(3)
    attention = rng.random((2, 2300))
    attention[1, 100:] = 0  # a short row: 100 positive cells, then fillers
    n = gs.selection_capacity(32) + 10
    assert n > gs.max_selection_n()
    indices, probs, status, p = host_sample(lib, attention, n, seed=5)
    assert p.sort
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, 5, False)
    assert np.array_equal(indices, cpu_i)
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    assert_same_status(status, cpu_status)


@pytest.mark.usefixtures("finish")
def test_host_fillers_underflow_and_logits(lib):
    """Rule R1 (short rows), logits with -inf and an underflowing cell, float32 subnormal weights (CuPy's
    -ftz=true must not flush them: sampling.cu widens float32 by its bits)."""
    attention = np.zeros((4, 300), np.float32)
    attention[0, [5, 77, 250]] = [1, 2, 3]
    attention[1, :] = 1e-44  # subnormal float32: a uniform row all the same
    attention[2, 290:] = [1e-40, 1, 1e-45, 0, 2, 0, 0, 7, 1e-38, 3]
    attention[3, 123] = 1
    for n in (1, 4, 9):
        indices, probs, status, _ = host_sample(lib, attention, n, seed=11 + n)
        cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, 11 + n, False)
        assert np.array_equal(indices, cpu_i), n
        np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
        assert_same_status(status, cpu_status)
    assert np.array_equal(flat_positions(indices, (300,))[0], [*flat_positions(cpu_i, (300,))[0][:3], 0, 1, 2, 3, 4, 6])
    logits = np.log(np.where(attention > 0, attention.astype(np.float64), 0.0) + 0.0, where=attention > 0,
                    out=np.full(attention.shape, -np.inf))
    logits[0, 9] = -800.0  # exp(-800 - max) underflows to 0 in float64: not positive, a filler candidate
    for replace in (False, True):
        indices, probs, status, _ = host_sample(lib, logits, 6, seed=2, replace=replace, logits=True)
        cpu_i, cpu_p, cpu_status = cpu_sample(logits, 6, 2, replace, logits=True)
        assert np.array_equal(indices, cpu_i), replace
        np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
        assert_same_status(status, cpu_status)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("replace", [False, True], ids=["successive", "replace"])
def test_refused_logits_rows_count_their_nan_and_inf_logits(lib, replace):
    """exp(l - t) with t the row's largest finite logit, on the CPU path and in the kernels alike: beside a NaN or
    +inf logit a finite logit of 800 stays a finite weight, so the status (every column) and the message count
    exactly the NaN and +inf logits (the CPU path took t = 0 there and counted exp(800) = inf too)."""
    logits = np.array([[np.inf, 800.0, 0.0, 1.0], [np.nan, 800.0, 0.0, -800.0], [np.inf, np.inf, 5.0, 1.0],
                       [0.0, 1.0, 2.0, 3.0], [-np.inf, -np.inf, 750.0, 0.0]])
    _, _, status, _ = host_sample(lib, logits, 2, seed=1, replace=replace, logits=True)
    _, _, cpu_status = cpu_sample(logits, 2, 1, replace, logits=True)
    assert_same_status(status, cpu_status)
    assert np.array_equal(status[:3], cpu_status[:3])  # the refused rows' exponents too (the CPU takes them there)
    bad = np.isnan(logits) | (logits == np.inf)
    assert status[:-1, v.STATUS_NONFINITE].tolist() == bad.sum(axis=1).tolist() == [1, 1, 2, 0, 0]
    with pytest.raises(ValueError, match=r"row 0 contains NaN or \+inf logits \(1 entries\)"):
        atskern.sample(logits, 2, replace=replace, logits=True, seed=1)
    with pytest.raises(ValueError, match=r"row 0 contains NaN or \+inf logits \(1 entries\)"):
        v.check_status(status, 2, replace, True, False)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("replace", [False, True], ids=["successive", "replace"])
def test_host_scale_free_rows(lib, replace):
    """float64 rows at 1e-320 and 1e300: the rescaling pass (pass 1) gives the exact distribution, the same
    draws as the CPU's rescaled rerun."""
    base = np.array([1.0, 2.0, 3.0, 0.0, 5.0] * 60)
    attention = np.stack([base * 1e-320, base * 1e300, base, base * 2.0**-70])
    indices, probs, status, _ = host_sample(lib, attention, 7, seed=9, replace=replace)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, 7, 9, replace)
    assert np.array_equal(indices, cpu_i)
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    assert_same_status(status, cpu_status)
    flat = flat_positions(indices, (300,))
    np.testing.assert_allclose(probs, independent_probs(base[None].repeat(4, 0), flat), rtol=1e-12)
    assert status[-1, v.STATUS_EXPONENT] == 3  # three rows outside SCALE_FREE_EXPONENTS were redone


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_status_exponent_is_the_largest_finite_weights(lib, dtype):
    """The status's exponent column on every row, bad ones included: frexp's exponent of the row's largest finite
    weight (0 where none is positive), from NumPy (the CPU kernel reports 0 on rows its total shows in range, so
    the other tests compare it only where the CPU computes it). float32 rows take the plain path's bit tests."""
    tiny = np.finfo(dtype).smallest_subnormal
    attention = np.zeros((7, 300), dtype)
    attention[0, :5] = [-7.0, 3.0, -100.0, 0.5, -0.0]  # negatives larger in magnitude than the largest weight
    attention[1, :4] = [np.nan, 2.0, 6.0, -np.inf]
    attention[2, :3] = [tiny, 3 * tiny, 0.0]  # subnormals only
    attention[3, :3] = [np.inf, 0.25, 0.125]
    attention[4, :3] = [-1.0, -2.0, -0.0]  # nothing positive
    attention[6, ::7] = 1e30 if dtype == np.float32 else 1e300
    _, _, status, _ = host_sample(lib, attention, 3, seed=4)
    largest = np.where(np.isfinite(attention) & (attention > 0), attention, 0).max(axis=1).astype(np.float64)
    assert np.array_equal(status[:-1, v.STATUS_EXPONENT], np.frexp(largest)[1])
    assert np.array_equal(status[:-1, v.STATUS_NEGATIVE], (attention < 0).sum(axis=1))
    assert np.array_equal(status[:-1, v.STATUS_POSITIVE], (attention > 0).sum(axis=1))
    assert np.array_equal(status[:-1, v.STATUS_NONFINITE], (~np.isfinite(attention)).sum(axis=1))


@pytest.mark.usefixtures("finish")
def test_host_bad_rows_stay_in_range(lib):
    """What validate=False gives: rows that validation refuses still get in-range indices, with probability 0;
    the status says which rows are bad, exactly as the CPU kernel's."""
    attention = np.ones((5, 200), np.float32)
    attention[0, 3] = np.nan
    attention[1, 7] = -1.0
    attention[2] = 0.0
    attention[3, 9] = np.inf
    for replace in (False, True):
        indices, probs, status, _ = host_sample(lib, attention, 6, seed=1, replace=replace)
        _, _, cpu_status = cpu_sample(attention, 6, 1, replace)
        assert_same_status(status, cpu_status)
        assert ((indices >= 0) & (indices < 200)).all()
        assert (probs[:4] == 0).all() and (probs[4] > 0).all()
        with pytest.raises(ValueError, match="attention row 0 contains NaN or inf"):
            v.check_status(status, 6, replace, False, False)


@pytest.mark.usefixtures("finish")
def test_host_seed_from_device_memory(lib):
    """A seed read from a uint64 array (ats.torch's device key) draws as that seed."""
    attention = np.random.default_rng(0).random((2, 400))
    for replace in (False, True):
        by_value = host_sample(lib, attention, 5, seed=2**63 + 17, replace=replace)
        by_array = host_sample(lib, attention, 5, seed=0, replace=replace, seed_array=np.array([2**63 + 17], np.uint64))
        assert np.array_equal(by_value[0], by_array[0]) and np.array_equal(by_value[1], by_array[1])


def _merge_rows(rng, size):
    """Rows for finish_rows' merge: plain, peaked (one hot region: most chunk lists empty), equal weights,
    1-ulp ties, exact +inf key ties after 300 unit weights, a short row (fillers) and a row pass 1 rescales."""
    rows = np.empty((7, size))
    rows[0] = rng.random(size)
    rows[1] = rng.random(size) * 1e-3
    rows[1, size // 3: size // 3 + 500] += 50.0 * rng.random(500)
    rows[2] = 1.0
    rows[3] = np.choose(rng.integers(0, 2, size), [1.0, np.nextafter(1.0, 2.0)])
    rows[4] = 5e-324
    rows[4, rng.choice(size, 300, replace=False)] = 1.0
    rows[5] = 0.0
    rows[5, rng.choice(size, 70, replace=False)] = rng.random(70) + 0.1
    rows[6] = rng.random(size) * 1e-300
    return rows


@pytest.mark.parametrize("n, fused", [(9, False), (60, False), (400, False), (60, True), (400, True)],
                         ids=["9", "60", "400", "select_rows-60", "select_rows-400"])
def test_host_merge_takes_list_prefixes_under_the_bound(lib, n, fused):  # every row selected: no screening buffer
    """finish_rows with many chunk lists (47 chunks, more than the 32 threads of a block: the chunk scan and the
    statistics reduction take several rounds), more slots than a block's buffer (nchunks * n > capacity: the
    bound from the lists' heads) and rows where the prefixes overflow the buffer (+inf key ties: the bound
    bounds nothing, the tile-by-tile merge): draws equal the reference's and the CPU kernel's, ties by position."""
    attention = _merge_rows(np.random.default_rng(n), 6000)
    indices, probs, status, p = host_sample(lib, attention, n, seed=n, chunk=128, capacity=0, fused=fused,
                                            whole_rows=False)
    assert p.nchunks == 47 and p.nchunks > 32 and p.fused == fused
    assert p.nchunks * n > gs.selection_capacity(32) or n == 9
    ref_i, _ = reference.sample(attention, n, seed=n)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, n, False)
    for row in range(attention.shape[0]):
        assert np.array_equal(indices[row], ref_i[row]) and np.array_equal(indices[row], cpu_i[row]), row
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    flat = flat_positions(indices, attention.shape[1:])
    scaled = attention * np.array([1, 1, 1, 1, 1, 1, 1e300])[:, None]
    np.testing.assert_allclose(probs, independent_probs(scaled, flat), rtol=1e-12)
    assert_same_status(status, cpu_status)
    # independent of the reference: the equal-weight rows' probabilities are 1 / size; the +inf-key row draws
    # its unit weights first, then the tied cells in position order; the short row ends in its lowest zeros
    np.testing.assert_allclose(probs[2], 1.0 / 6000, rtol=1e-12)
    ones = np.flatnonzero(attention[4] == 1.0)
    assert set(flat[4, : min(n, 300)]) <= set(ones)
    if n > 300:
        assert np.array_equal(flat[4, 300:], np.flatnonzero(attention[4] != 1.0)[: n - 300])
    if n > 70:
        assert np.array_equal(flat[5, 70:], np.flatnonzero(attention[5] == 0)[: n - 70])
        assert (probs[5, 70:] == 0).all()


@pytest.mark.parametrize("chunk", [128, 1024])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_replacement_draws_scan_chunks_and_tiles(lib, dtype, chunk):
    """With replacement, one block a draw: the chunk found by a block scan of the chunk sums (47 chunks: two
    steps of 32), then the positions scanned a tile a step (1024-position chunks: 8 tiles of 128); rows with
    zeros between positive cells and a peaked row. Draws equal the CPU kernel's; probabilities an independent
    division."""
    rng = np.random.default_rng(chunk)
    attention = rng.random((4, 6000)).astype(dtype)
    attention[1, ::2] = 0
    attention[2, :5000] = 0
    attention[3] = 0
    attention[3, [17, 4500, 5999]] = [1.0, 3.0, 2.0]
    n = 20  # a block a draw: the host harness's barriers make each one slow
    indices, probs, status, p = host_sample(lib, attention, n, seed=21, replace=True, chunk=chunk)
    assert p.nchunks == -(-6000 // chunk)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, 21, True)
    assert np.array_equal(indices, cpu_i)
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    flat = flat_positions(indices, (6000,))
    np.testing.assert_allclose(probs, independent_probs(attention, flat), rtol=1e-12)
    assert set(flat[3]) <= {17, 4500, 5999} and (flat[2] >= 5000).all() and (flat[1] % 2 == 1).all()
    assert_same_status(status, cpu_status)


def test_plan_spreads_small_maps_over_many_short_blocks():
    """The default chunking on a 132-multiprocessor device: a 256² map in 16 blocks of 4 tiles, larger calls in
    about one wave of selecting blocks, replacement chunks of at most REPLACE_TILES tiles; the candidate slots
    of a row stay below 2^31."""
    tile = gs.PER_THREAD * 256
    small = gs.plan(1, 256 * 256, 10, False, 256, 132)
    assert small.chunk == gs.MIN_CHUNK == 4 * tile and small.nchunks == 16
    for rows, size in [(1, 1024**2), (1, 4096**2), (32, 1024**2), (256, 256**2)]:
        p = gs.plan(rows, size, 100, False, 256, 132)
        assert p.chunk % tile == 0 and p.nchunks * p.chunk >= size > (p.nchunks - 1) * p.chunk
        assert rows * p.nchunks <= 2 * gs.BLOCKS_PER_SM * 132 or p.chunk == gs.MIN_CHUNK
        r = gs.plan(rows, size, 100, True, 256, 132)
        assert r.chunk == min(p.chunk, gs.REPLACE_TILES * tile)
    huge = gs.plan(1, 1 << 30, 2048, False, 256, 132)
    assert huge.nchunks * 2048 < gs.MAX_SLOTS


@pytest.mark.usefixtures("finish")
def test_host_summary_row_without_its_own_launch(lib):
    """The first finish_rows writes the summary row (its last block to finish, counted in row_bound[rows]), in
    every plan: the fused pass, the rescaling pass, with replacement, and the sort fallback, whose presorted
    finish keeps the status of the unscaled weights (the CPU's): a row at 1e-300 counts as outside the scale-free
    exponents, and a row whose huge weights rescale to zeros keeps its positive count."""
    rng = np.random.default_rng(12)
    attention = rng.random((5, 2300))
    attention[1] *= 1e-300
    attention[2, :5] = 1e300  # rescaled by 2^-997: its 1e-30 weights underflow, its count must not change
    attention[2, 5:10] = 1e-30
    attention[3, :2000] = 0
    attention[4, 7] = np.inf
    for n, replace in [(5, False), (5, True), (gs.selection_capacity(32) + 10, False)]:
        assert gs.plan(5, 2300, n, replace, 32, 1, chunk=128).sort == (n > gs.max_selection_n())
        _, _, status, _ = host_sample(lib, attention, n, seed=3, replace=replace)
        _, _, cpu_status = cpu_sample(attention, n, 3, replace)
        assert_same_status(status, cpu_status)
        assert status[2, v.STATUS_POSITIVE] == 2300 and status[-1, v.STATUS_EXPONENT] == 2
        assert status[-1, v.STATUS_NONFINITE] == 1 and status[-1, v.STATUS_POSITIVE] == 300


def test_host_summary_row_reduces_across_warps(libs):
    """The summary row from many rows and a block of two warps: each extreme sits in a row that the second warp
    reads (rows 32 + 64 k), the others in the first, so a reduction that dropped a warp would show."""
    rng = np.random.default_rng(21)
    attention = rng.random((100, 300)) + 0.5
    attention[45, :3] = np.nan  # the most non-finite cells (row 45: the second warp; row 70: the first)
    attention[70, :2] = np.nan
    attention[97, 10:14] = -1.0  # the most negative cells, second warp (rows 32..63 and 96..99)
    attention[40, :280] = 0.0  # the fewest positive cells: 20
    attention[99] *= 1e-300  # outside the scale-free exponents
    attention[38] *= 1e300
    _, _, status, _ = host_sample(libs(64), attention, 5, seed=4, threads=64)
    _, _, cpu_status = cpu_sample(attention, 5, 4, False)
    assert_same_status(status, cpu_status)
    assert status[-1].tolist() == [3, 4, 20, 2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_first_tile_bound_and_its_retry(libs, dtype):
    """chunk_topn's first tile takes keys only below its own bound (the CPU's first bound on the tile's weights);
    where fewer than n fall below it, the tile is taken again without it, its statistics counted once. The
    64-thread harness expects only n keys below that bound, so each row's first block retries about half the
    time: the draws still equal the reference's, and the status (counts, sums) the CPU kernel's."""
    rng = np.random.default_rng(40)
    attention = (rng.random((24, 700)) + 0.05).astype(dtype)
    attention[::7, 5] = 0.0
    for n in (1, 5, 20):
        indices, probs, status, _ = host_sample(libs(64), attention, n, seed=n, threads=64, chunk=256, capacity=0)
        ref_i, _ = reference.sample(attention, n, seed=n)
        cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, n, False)
        assert np.array_equal(indices, ref_i) and np.array_equal(indices, cpu_i), n
        np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
        np.testing.assert_allclose(probs, independent_probs(attention, flat_positions(indices, (700,))), rtol=1e-12)
        assert_same_status(status, cpu_status)


def _plans(ws, rows, pass_=0):
    return ws.row_plan[pass_ * rows:(pass_ + 1) * rows]


def _rows_of_every_plan(dtype):
    """``(attention, size, n)``: 6 rows of 1500 weights, n = 12: even (screened), uneven (one cell holds half the
    mass), short (40 positive cells), bad (a NaN), float64 rows outside the scale-free exponents (rescaled), even."""
    rng = np.random.default_rng(5)
    size = 1500
    attention = (rng.random((6, size)) + 0.05).astype(dtype)
    attention[1, 7] = size
    attention[2, 40:] = 0
    attention[3, 11] = np.nan
    if dtype == np.float64:
        attention[4] *= 1e-300
    return attention, size, 12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_rows_screened_selected_or_alone(libs, dtype):
    """Each row's plan from its statistics (chunk_stats' last block): even rows are screened (every key under the
    row's bound t into one buffer, then sorted), uneven ones (S > W^2 / 2 want), short ones (fewer positive cells
    than want) and bad ones are selected chunk by chunk; pass 0 skips a row that pass 1 rescales, which pass 1
    screens. A screened row with fewer than n keys under t (the 64-thread harness expects only n / 2 + 1 there)
    or more than its buffer holds is selected by finish_rows alone. Every way gives the reference's draws."""
    attention, size, n = _rows_of_every_plan(dtype)
    for threads, capacity in [(32, None), (64, None), (32, n + 1)]:
        keep = {}
        indices, probs, status, p = host_sample(libs(threads), attention, n, seed=9, threads=threads, chunk=256,
                                                capacity=capacity, keep=keep, whole_rows=False)
        ws = keep["workspace"]
        plans = _plans(ws, 6)
        screened = np.isfinite(plans) & (plans > 0)
        # the 64-thread harness's smaller want screens the short row too
        assert list(screened) == [True, False, threads == 64, False, dtype == np.float32, True]
        if dtype == np.float64:
            assert plans[4] == -1.0 and 0 < _plans(ws, 6, 1)[4] < np.inf
        kept = ws.counters[6:12]  # pass 0's screened counts
        if threads == 64:  # about n / 2 + 1 keys expected below t: rows fall short of n
            assert (kept[screened] < n).any()
        else:
            assert (kept[screened] >= n).all()
        if capacity is not None:
            assert (kept[screened] > capacity).all()
        ref_i, _ = reference.sample(np.where(np.isnan(attention), 0, attention), n, seed=9)
        cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, 9, False)
        valid = [0, 1, 2, 4, 5]
        assert np.array_equal(indices[valid], ref_i[valid]) and np.array_equal(indices[valid], cpu_i[valid])
        np.testing.assert_allclose(probs[valid], cpu_p[valid], rtol=1e-12)
        assert_same_status(status, cpu_status)
        assert (probs[3] == 0).all() and ((indices >= 0) & (indices < size)).all()


def _screened_slots(ws, rows):
    """Per row, how many slots of its screening buffer sample_rows wrote (the rest keep _garbage's bytes): the
    kept keys up to the buffer's size; 0 for a row selected without screening."""
    capacity = ws.screen_keys.size // rows
    untouched = _garbage((1,), np.float64).view(np.uint64)[0]
    return (ws.screen_keys.view(np.uint64).reshape(rows, capacity) != untouched).sum(axis=1)


@pytest.mark.parametrize("whole", [False, True], ids=["finish_rows", "sample_rows"])
def test_host_screened_rows_ranked_or_sorted(lib, whole):
    """A screened row's kept keys are ranked (each entry counts the entries before it) up to RANK_MAX of them, and
    sorted with the block radix sort beyond: n = 850 keeps about 1040 keys a row, so both run, in finish_rows and
    in sample_rows (a block per row: kept keys seen as the screening buffer's written slots); the draws equal the
    reference's and the CPU kernel's."""
    rng = np.random.default_rng(85)
    attention = rng.random((4, 5000)) + 0.1
    attention[2, ::2] = 1.0
    n = 850
    keep = {}
    indices, probs, status, p = host_sample(lib, attention, n, seed=4, chunk=1024, keep=keep, whole_rows=whole)
    kept = _screened_slots(keep["workspace"], 4) if whole else keep["workspace"].counters[4:8]
    assert p.whole_rows == whole and p.capacity > 0 and (kept <= p.capacity).all() and (kept >= n).all()
    assert (kept > gs.RANK_MAX).any() and (kept <= gs.RANK_MAX).any()
    ref_i, _ = reference.sample(attention, n, seed=4)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, 4, False)
    assert np.array_equal(indices, ref_i) and np.array_equal(indices, cpu_i)
    np.testing.assert_allclose(probs, cpu_p, rtol=1e-12)
    assert_same_status(status, cpu_status)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_sample_rows_screened_selected_or_alone(libs, dtype):
    """sample_rows (a block per row, WHOLE_ROWS): even rows are screened under their plan's bound t (their
    buffers written), uneven, short and bad rows selected by the block alone (buffers untouched), a float64 row
    outside the scale-free exponents planned on its rescaled statistics (pass 1's, in the same launch); a
    screened row with fewer than n keys under t (the 64-thread harness) or more than its buffer holds is selected
    alone. One row needs no zeroed memory; several elect the summary's block through row_bound[rows]."""
    attention, size, n = _rows_of_every_plan(dtype)
    ref_i, _ = reference.sample(np.where(np.isnan(attention), 0, attention), n, seed=9)
    cpu_i, cpu_p, cpu_status = cpu_sample(attention, n, 9, False)
    valid = [0, 1, 2, 4, 5]
    for threads, capacity in [(32, None), (64, None), (32, n + 1)]:
        keep = {}
        indices, probs, status, p = host_sample(libs(threads), attention, n, seed=9, threads=threads,
                                                capacity=capacity, keep=keep, whole_rows=True)
        assert p.whole_rows and p.capacity > 0
        written = _screened_slots(keep["workspace"], 6)
        # the 64-thread harness's smaller want screens the short row too
        assert list(written > 0) == [True, False, threads == 64, False, True, True]
        if threads == 64:  # about n / 2 + 1 keys expected below t: rows fall short of n, then selected alone
            assert ((written > 0) & (written < n)).any()
        elif capacity is not None:  # more keys than the buffer holds: selected alone
            assert (written[written > 0] == capacity).all()
        else:
            assert (written[written > 0] >= n).all()
        assert np.array_equal(indices[valid], ref_i[valid]) and np.array_equal(indices[valid], cpu_i[valid])
        np.testing.assert_allclose(probs[valid], cpu_p[valid], rtol=1e-12)
        assert_same_status(status, cpu_status)
        assert (probs[3] == 0).all() and ((indices >= 0) & (indices < size)).all()
    for row in range(6):  # one row alone: no memset (the workspace is all garbage), the summary its own
        indices, probs, status, _ = host_sample(libs(32), attention[row:row + 1], n, seed=9, whole_rows=True)
        assert np.array_equal(indices[0], cpu_sample(attention[row:row + 1], n, 9, False)[0][0]), row
        assert_same_status(status, cpu_sample(attention[row:row + 1], n, 9, False)[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_sample_rows_takes_logits(lib, dtype):
    """With logits, each sample_rows block takes its row's largest finite logit itself (no row_max launch): -inf
    cells are zero weights (fillers), a row of only -inf is refused (probabilities 0), and a row whose logits are
    all about -800 is drawn as exp(l - max) gives it; the draws equal the CPU kernel's, screened (n = 7) or
    selected (n = 560: fewer positive cells than the bound wants)."""
    rng = np.random.default_rng(85)
    logits = np.log(rng.random((4, 2, 300)) + 0.01).astype(dtype)
    logits[0, :, :50] = -np.inf  # zero weights: drawn only as fillers (n = 560 > 500 positive cells)
    logits[1] = -np.inf
    logits[2] -= 800.0
    for n in (7, 560):
        keep = {}
        indices, probs, status, _ = host_sample(lib, logits, n, seed=n, logits=True, keep=keep, whole_rows=True)
        assert list(_screened_slots(keep["workspace"], 4) > 0) == [n == 7, False, n == 7, n == 7]
        cpu_i, cpu_p, cpu_status = cpu_sample(logits, n, n, False, logits=True)
        good = [0, 2, 3]
        assert np.array_equal(indices[good], cpu_i[good]), n
        np.testing.assert_allclose(probs[good], cpu_p[good], rtol=1e-12)
        assert (probs[1] == 0).all()
        assert_same_status(status, cpu_status)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("replace", [False, True], ids=["successive", "replace"])
def test_host_float32_probabilities_round_as_numpy(lib, replace):
    """float32 probabilities written by the kernels (the CuPy path, no cast launch) equal NumPy's cast of the
    float64 ones bit for bit, subnormal results included (CuPy compiles with -ftz=true: a plain conversion could
    flush them to zero, turning drawn cells into fillers)."""
    rng = np.random.default_rng(11)
    attention = np.full((3, 50), 1e-40, np.float32)  # subnormal float32 weights next to 1.0
    attention[:, 0] = 1.0
    attention[1, 1:] = rng.random(49).astype(np.float32) * np.float32(3e-38)
    attention[2] = rng.random(50).astype(np.float32) + np.float32(0.1)
    wide = host_sample(lib, attention, 50, seed=2, replace=replace)
    narrow = host_sample(lib, attention, 50, seed=2, replace=replace, probs_dtype=np.float32)
    assert np.array_equal(narrow[0], wide[0])
    expected = wide[1].astype(np.float32)
    assert narrow[1].dtype == np.float32 and np.array_equal(narrow[1].view(np.uint32), expected.view(np.uint32))
    if not replace:  # every cell drawn: subnormal probabilities were there to keep (with replacement: only cell 0)
        tiny = expected[expected != 0]
        assert (np.abs(tiny) < np.finfo(np.float32).tiny).any()


class _FakeArray:
    def __init__(self, shape, dtype, memptr):
        self.shape, self.dtype, self.ptr = tuple(shape), np.dtype(dtype), memptr.ptr
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize


@pytest.mark.parametrize("replace, n, dtype, logits", [(False, 10, np.float32, False), (False, 3000, np.float64, False),
                                                        (True, 7, np.float64, True), (False, 50, np.float64, True)])
def test_one_allocation_carves_disjoint_aligned_pieces(monkeypatch, replace, n, dtype, logits):
    """The CuPy path's single allocation: the returned arrays (status, indices, probs in the weights' dtype) and
    every scratch address lie inside it, 256-byte aligned, without overlap, each as large as the workspace the
    host build gets; the scratch is addresses, not arrays, except for the sort step (large n), which reads its
    workspace as arrays."""
    import types

    allocations = []

    def alloc(size):
        allocations.append(Memory(1 << 20, size))
        return allocations[-1]

    monkeypatch.setattr(gs, "cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(alloc=alloc),
                                                                  ndarray=_FakeArray))
    rows, size = 3, 5000
    p = gs.plan(rows, size, n, replace, 256, 132)
    lay = gs.layout(rows, size, n, p, replace, logits, 2, np.dtype(dtype))
    ws, indices, probs, memory = gs.allocate(lay, arrays=p.sort)
    assert allocations == [memory] and memory.size == lay.total
    pieces = [(indices.ptr, indices.nbytes), (probs.ptr, probs.nbytes), (ws.status.ptr, ws.status.nbytes)]
    assert probs.dtype == dtype and ws.status.shape == (rows + 1, 4) and indices.shape == (rows, n, 2)
    shapes = vars(gs.workspace(lambda shape, dtype: (shape, np.dtype(dtype)), rows, size, n, p, replace, logits))
    for name, value in vars(ws).items():
        assert (value is None) == (shapes[name] is None), name
        if value is None or name == "status":
            continue
        shape, item_dtype = shapes[name]
        if p.sort:
            assert isinstance(value, _FakeArray) and value.shape == tuple(shape), name
        else:
            assert type(value) is int, name  # a kernel argument as it is
        pieces.append((int(value.ptr if p.sort else value), int(np.prod(shape)) * item_dtype.itemsize))
    pieces.sort()
    for (start, length), (following, _) in zip(pieces, pieces[1:]):
        assert start + length <= following
    assert all(start % gs.ALIGNMENT == 0 for start, _ in pieces)
    assert pieces[0][0] >= memory.ptr and pieces[-1][0] + pieces[-1][1] <= memory.ptr + memory.size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("replace, logits", [(False, False), (True, False), (False, True)])
def test_cupy_path_end_to_end_on_the_host_build(monkeypatch, lib, dtype, replace, logits, finish):
    """``atskern.gpu.sampling.sample`` itself (one allocation, the memset, the launches through packed slots) and
    ``read_status`` on the emulated device: the draws, probabilities and status of the host harness's direct path
    and of the CPU kernel, including a bad row and a float64 row that the rescaling pass redoes."""
    from atskern.gpu import _launch, _sequence

    device = install(monkeypatch, lib, gs.SOURCE, (gs, _launch, _sequence))
    monkeypatch.setattr(gs, "_handle", lambda name, options, device_id: device.names.index(name))
    monkeypatch.setattr(gs, "_multiprocessors", lambda device_id: 1)
    rng = np.random.default_rng(31)
    attention = (rng.random((4, 9, 70)) + 0.05).astype(dtype)
    attention[1, 0, :5] = np.nan if not logits else np.inf  # refused by validation: in-range draws, probs 0
    if dtype == np.float64 and not logits:
        attention[2] *= 1e-200  # redone on rescaled weights
    if logits:
        attention = np.log(attention)
    n, seed = 7, 2**64 - 3
    weights = np.ascontiguousarray(attention).reshape(4, -1).view(DeviceArray)
    grid = np.array(attention.shape[1:], np.int64)
    indices, probs, status = gs.sample(weights, n, grid, seed, replace, logits=logits, threads=32, chunk=128)
    host_status = gs.read_status(status)
    suffix = "f32" if dtype == np.float32 else "f64"
    assert device.launched[0] == "memset" and device.launched.count("memset") == 1
    last = "replacement_draws" if replace else finish  # the kernel that finishes the rows
    assert device.launched[-1] == f"{last}_{suffix}"
    assert (f"chunk_topn_{suffix}" in device.launched) == (not replace and finish == "finish_rows")
    want_i, want_p, want_status, _ = host_sample(lib, attention, n, seed=seed, replace=replace, logits=logits,
                                                 probs_dtype=dtype)
    assert np.array_equal(np.asarray(indices), want_i)
    assert np.array_equal(np.asarray(probs).view(np.uint8), want_p.view(np.uint8))
    assert np.array_equal(host_status, want_status) and np.array_equal(np.asarray(status), want_status)
    cpu_i, _, cpu_status = cpu_sample(attention, n, seed, replace, logits=logits)
    good = np.ones(4, bool)
    good[1] = False
    assert np.array_equal(np.asarray(indices)[good], cpu_i[good])
    assert_same_status(host_status, cpu_status)
    # the seed read from device memory by the kernels (its own recorded sequence: one more slot)
    seed_array = np.array([seed], np.uint64).view(DeviceArray)
    by_device = gs.sample(weights, n, grid, 0, replace, logits=logits, seed_ptr=seed_array, threads=32, chunk=128)
    assert np.array_equal(np.asarray(by_device[0]), want_i)
    assert np.array_equal(np.asarray(by_device[1]).view(np.uint8), want_p.view(np.uint8))

    # the step runner that sample() and the tuning probe share: every step issued, the hook called after each
    p = gs.plan(4, weights.shape[1], n, replace, 32, 1, chunk=128)
    lay = gs.layout(4, weights.shape[1], n, p, replace, logits, 2, np.dtype(dtype))
    ws, again_i, again_p, memory = gs.allocate(lay, arrays=p.sort)
    steps = gs.launches(weights, n, grid, seed, replace, logits, ws, p, again_i, again_p)
    issued = []
    device.launched.clear()
    gs.run_steps(steps, ws, n, lay, memory, (), 0, after_step=lambda: issued.append(len(device.launched)))
    assert issued == list(range(1, len(steps) + 1))
    assert np.array_equal(np.asarray(again_i), want_i) and np.array_equal(gs.read_status(ws.status), want_status)


@pytest.mark.usefixtures("finish")
@pytest.mark.parametrize("rows", [1, 6])
def test_mapped_status_end_to_end_on_the_host_build(monkeypatch, lib, rows):
    """``MAPPED_STATUS``: on a validated call (``host_status=True``) the block that writes the summary row copies the
    whole status into this thread's mapped host buffer (filled with a byte pattern first): after ``read_status``'s
    one wait it is the status of the device-memory path, bad rows and summary row included, with the same draws, and
    no copy is issued; the buffer is reused by the next call. Every recorded path maps it (float64, logits, with
    replacement); the plan that sorts every key and calls without ``host_status`` keep the device status."""
    from atskern.gpu import _launch, _mapped, _sequence

    device = install(monkeypatch, lib, gs.SOURCE, (gs, _launch, _sequence, _mapped))
    monkeypatch.setattr(gs, "_handle", lambda name, options, device_id: device.names.index(name))
    monkeypatch.setattr(gs, "_multiprocessors", lambda device_id: 1)
    monkeypatch.setattr(_mapped, "_buffers", _mapped._Buffers())
    copies = []

    def memcpy(*args):
        copies.append(args)
        device.memcpy(*args)

    device.module.cuda.runtime.memcpyAsync = memcpy
    gs.recorded_call.cache_clear()
    rng = np.random.default_rng(7)
    attention = (rng.random((rows, 9, 70)) + 0.05).astype(np.float32)
    attention[-1, 3, :4] = -1.0  # a refused row: its status counts them
    grid = np.array(attention.shape[1:], np.int64)
    n, seed = 7, 12345

    def call(weights, host_status, **kwargs):
        return gs.sample(weights, n, grid, seed, kwargs.pop("replace", False), threads=32, chunk=128,
                         host_status=host_status, **kwargs)

    monkeypatch.setattr(gs, "MAPPED_STATUS", True)
    for dtype, kwargs in [(np.float32, {}), (np.float32, {"replace": True}), (np.float64, {}),
                          (np.float32, {"logits": True})]:
        weights = attention.astype(dtype).reshape(rows, -1).view(DeviceArray)
        if kwargs.get("logits"):
            weights = np.log(np.abs(weights)).view(DeviceArray)
        device_i, device_p, device_status = call(weights, False, **kwargs)
        want_status = gs.read_status(device_status)
        copied = len(copies)
        for _ in range(2):  # the second call reuses the thread's buffer
            indices, probs, status = call(weights, True, **kwargs)
            assert type(status) is np.ndarray and status.shape == (rows + 1, 4)
            (buffer,) = device.host_buffers.values()
            assert buffer.ctypes.data <= status.ctypes.data < buffer.ctypes.data + buffer.size
            waits = device.waits
            read = gs.read_status(status)
            assert device.waits == waits + 1 and len(copies) == copied, kwargs
            assert np.array_equal(read, want_status) and read.ctypes.data != status.ctypes.data, kwargs
            assert np.array_equal(np.asarray(indices), np.asarray(device_i)), kwargs
            assert np.array_equal(np.asarray(probs).view(np.uint8), np.asarray(device_p).view(np.uint8)), kwargs
            status[...] = -1  # the next call must write every entry again
    want_i, want_p, want_status, _ = host_sample(lib, attention, n, seed=seed, probs_dtype=np.float32)
    assert np.array_equal(want_status, gs.read_status(call(attention.reshape(rows, -1).view(DeviceArray), True)[2]))

    monkeypatch.setattr(gs, "MAX_SELECTION_N", n - 1)  # n now sorts every key: no recorded sequence, no copy
    assert isinstance(call(attention.reshape(rows, -1).view(DeviceArray), True)[2], DeviceArray)
    monkeypatch.undo()
    gs.recorded_call.cache_clear()


@pytest.fixture
def front_end(monkeypatch, lib):
    """``atskern.sample`` itself on the emulated CuPy (``tests/emulated_device.py``), running this host build."""
    from atskern import _backend
    from atskern.gpu import _alignment, _launch, _mapped, _module, _sequence

    device = install(monkeypatch, lib, gs.SOURCE, (_backend, gs, _launch, _sequence, _mapped, _alignment))
    monkeypatch.setattr(gs, "_handle", lambda name, options, device_id: device.names.index(name))
    monkeypatch.setattr(gs, "_multiprocessors", lambda device_id: 1)
    monkeypatch.setattr(_module, "THREADS_PER_BLOCK", 32)  # the harness's ATS_SELECT_THREADS
    monkeypatch.setattr(_mapped, "_buffers", _mapped._Buffers())
    gs.recorded_call.cache_clear()
    yield device
    gs.recorded_call.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_of_misaligned_device_attention(front_end, monkeypatch, dtype):
    """CuPy attention whose address or strides are not a multiple of its item size (a CUDA load of it would
    fault): ``atskern.sample`` hands the kernels an aligned copy, made byte by byte, and draws what the CPU draws
    from the same values, with the probabilities of an aligned device array."""
    from atskern.gpu import _alignment

    sample_of = gs.sample
    seen = []

    def checked(weights, *args, **kwargs):
        assert not _alignment.misaligned(weights)
        seen.append(weights.data.ptr)
        return sample_of(weights, *args, **kwargs)

    monkeypatch.setattr(gs, "sample", checked)
    rng = np.random.default_rng(12)
    attention = (rng.random((3, 9, 70)) + 0.05).astype(dtype)
    want_indices, _ = atskern.sample(attention, 7, seed=11)
    aligned = placed(attention)
    indices, probs = atskern.sample(aligned, 7, seed=11)
    assert seen == [aligned.data.ptr]  # an aligned array goes as it is
    assert np.array_equal(np.asarray(indices), want_indices)
    for shift, strides in [(1, None), (2, (1, -1, 2)), (4 if dtype == np.float64 else 0, (-1, 2, 1))]:
        got_indices, got_probs = atskern.sample(placed(attention, shift, strides), 7, seed=11)
        assert np.array_equal(np.asarray(got_indices), want_indices), (shift, strides)
        assert np.array_equal(np.asarray(got_probs).view(np.uint8), np.asarray(probs).view(np.uint8))


def test_misaligned_device_seed_is_refused(front_end):
    """A device seed the kernels would read as one misaligned 64-bit word: a TypeError before any launch; an aligned
    one draws what the same host seed draws."""
    attention = placed(np.random.default_rng(3).random((2, 40)).astype(np.float32) + 0.1)
    want = atskern.sample(attention, 5, seed=77)
    got = atskern.sample(attention, 5, seed=placed(np.array([77], np.uint64)))
    assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]))
    launched = len(front_end.launched)
    with pytest.raises(TypeError, match="multiple of 8"):
        atskern.sample(attention, 5, seed=placed(np.array([77], np.uint64), 4))
    assert len(front_end.launched) == launched


def _outcome(call):
    """``(indices, probs)`` of a sampling call as NumPy arrays, or its ValueError's message."""
    try:
        indices, probs = call()
    except ValueError as error:
        return str(error)
    return np.asarray(indices), np.asarray(probs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_front_end_fuzz_equals_the_cpu_path(front_end, monkeypatch, data):
    """``atskern.sample`` on the emulated device (its checks, plan, recorded launches, status read-back and the
    errors made of it) against ``atskern.sample`` on the CPU, for drawn maps (zeros, scales from 1e-300 to 1e300,
    logits, a bad row, fewer positive cells than n, strict mode), every finish, chunking and device address: the
    same error message word for word, or the same draws and the probabilities within rounding."""
    from .conftest import FINISHES, use_finish

    finish = data.draw(st.sampled_from(FINISHES), label="finish")
    use_finish(monkeypatch, finish)
    monkeypatch.setattr(gs, "MIN_CHUNK", 128)  # one tile of the 32-thread harness: rows of several chunks
    multiprocessors = data.draw(st.sampled_from([1, 3, 16]), label="multiprocessors")
    monkeypatch.setattr(gs, "_multiprocessors", lambda device_id: multiprocessors)
    gs.recorded_call.cache_clear()

    rows = data.draw(st.integers(1, 4), label="rows")
    grid = tuple(data.draw(st.lists(st.integers(1, 24), min_size=1, max_size=3), label="grid"))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    logits, replace = (data.draw(st.booleans(), label=name) for name in ("logits", "replace"))
    strict = data.draw(st.sampled_from([False, False, True]), label="strict")
    size = int(np.prod(grid))
    n = data.draw(st.integers(1, min(size, 40) if not replace else 40), label="n")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    weights = rng.random((rows,) + grid) * (rng.random((rows,) + grid) < data.draw(st.sampled_from([1.0, 0.5, 0.05])))
    if dtype == np.float64:
        weights *= 10.0 ** data.draw(st.sampled_from([-300, -30, 0, 30, 300]), label="scale")
    with np.errstate(divide="ignore"):
        attention = (np.log(weights) if logits else weights).astype(dtype)
    bad = data.draw(st.sampled_from(["none"] * 6 + ["nan", "negative", "zero", "inf"]), label="bad")
    if bad != "none":
        row = int(rng.integers(rows))
        flat = attention.reshape(rows, -1)
        flat[row, int(rng.integers(size))] = {"nan": np.nan, "negative": -1.0, "inf": np.inf, "zero": 0.0}[bad]
        if bad == "zero":
            flat[row] = -np.inf if logits else 0.0
    seed = data.draw(st.integers(0, 2**64 - 1), label="sample_seed")
    shift = data.draw(st.sampled_from([0, 0, 1, 8]), label="shift")

    def call(given):
        with np.errstate(all="ignore"):
            return atskern.sample(given, n, replace=replace, logits=logits, seed=seed, strict=strict)

    launched = len(front_end.launched)
    want = _outcome(lambda: call(attention))
    got = _outcome(lambda: call(placed(attention, shift)))
    event(f"{finish}: " + ("refused" if isinstance(want, str) else "drawn"))
    if isinstance(want, str) or isinstance(got, str):
        assert got == want
        return
    assert len(front_end.launched) > launched  # the kernels ran
    assert np.array_equal(got[0], want[0])
    assert got[1].dtype == want[1].dtype
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6 if dtype == np.float32 else 1e-12,
                               atol=float(np.finfo(dtype).tiny))


@pytest.mark.usefixtures("finish")
def test_gpu_smoke_sampling_workout_on_the_host_build(front_end):
    """``bench.gpu_smoke``'s sampling part (what compute-sanitizer runs on a GPU) on the emulated device, with its
    small cases, the misaligned attention and the unvalidated bad rows (n up to 600): the CPU's draws and status (a
    mistake in the script would cost a GPU session)."""
    from bench import gpu_smoke

    launched = len(front_end.launched)
    gpu_smoke.sampling(front_end.module, atskern, np.random.default_rng(0), cases=gpu_smoke.SAMPLE_CASES[:4])
    gpu_smoke.unvalidated_bad_rows(front_end.module, atskern, np.random.default_rng(1),
                                   cases=gpu_smoke.BAD_ROW_CASES[:3])
    assert len(front_end.launched) > launched
