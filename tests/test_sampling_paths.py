"""The CPU sampling paths that only change speed give bitwise the same results: the serial path for small
work, the first bound of whole-row items (and the reselection when it is too tight), and the piecewise
prefix sums with replacement."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atskern
from atskern import reference
from atskern.cpu import sampling as cpu_sampling
from atskern.cpu._block_scan import ordered_sum_squares


def _rows(kind, dtype, rows=4, size=5000, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.gamma(0.5, size=(rows, size))
    if kind == "zeros":  # fillers (rule R1): row 1 has fewer positive cells than n; whole pieces of zeros
        a[rng.random(a.shape) < 0.6] = 0.0
        a[1, 7:] = 0.0
        a[2, : 3 * cpu_sampling.PIECE] = 0.0
        a[:, -cpu_sampling.PIECE - 5 :] = 0.0
    elif kind == "extreme":  # float64 rows sampled from rescaled weights, and a peaked row
        a = np.ldexp(a + 0.1, np.array([[-1000], [-70], [0], [1000]])[:rows])
        a[2, 17] = a[2].sum() * 1e6
    return a.astype(dtype)


def _all_results(attention, n, replace, monkeypatch, serial_work, **kwargs):
    monkeypatch.setattr(cpu_sampling, "SERIAL_WORK", serial_work)
    return atskern.sample(attention, n, replace=replace, seed=123, return_status=True, **kwargs)


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["dense", "zeros", "extreme"])
def test_serial_path_equals_parallel_path(kind, dtype, replace, monkeypatch):
    if kind == "extreme" and dtype == np.float32:
        pytest.skip("float32 cannot hold the extreme rows")
    attention = _rows(kind, dtype).reshape(4, 50, 100)
    for n in (1, 9, 40):
        serial = _all_results(attention, n, replace, monkeypatch, 1 << 62)
        parallel = _all_results(attention, n, replace, monkeypatch, 0)
        for got, want in zip(serial, parallel):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        want_i, want_p = reference.sample(attention, n, replace=replace, seed=123)
        np.testing.assert_array_equal(serial[0], want_i)
        np.testing.assert_allclose(serial[1], want_p, rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("replace", [False, True])
def test_serial_path_equals_parallel_path_on_refused_rows(replace, monkeypatch):
    """validate=False: NaN, negative and all-zero rows get the same documented result and status on both paths."""
    attention = _rows("dense", np.float64, rows=5, size=3000)
    attention[1, 10] = np.nan
    attention[2, 99] = -1.0
    attention[3] = 0.0
    results = [_all_results(attention, 6, replace, monkeypatch, work, validate=False) for work in (1 << 62, 0)]
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)
    indices, probs, status = results[0]
    assert (probs[1:4] == 0).all() and (indices >= 0).all() and (indices < 3000).all()
    np.testing.assert_array_equal(status[:-1, 2], (attention > 0).sum(axis=1))


@pytest.mark.parametrize("spare", [None, 1e9, "tiny"])
def test_first_bound_and_reselection_give_the_same_draws(spare):
    """A bound that expects fewer than n keys makes whole-row items select again without it; any bound gives
    the reference's draws, probabilities and status."""
    weights = _rows("zeros", np.float64, rows=3, size=20_000, seed=4)
    weights[0] = np.random.default_rng(5).random(20_000) + 0.5  # uniform enough for a finite bound
    grid = np.array([20_000], np.int64)
    for n in (2, 25, 300):
        chosen = 0.5 - n if spare == "tiny" else spare  # expects half a key: fewer than n almost surely
        for serial in (True, False):
            got = cpu_sampling.sample(weights, n, grid, 77, False, serial=serial, spare=chosen,
                                      chunk=cpu_sampling.BLOCK * 32)
            default = cpu_sampling.sample(weights, n, grid, 77, False, serial=serial)
            for a, b in zip(got, default):
                np.testing.assert_array_equal(a, b)
        want, _ = reference.sample(weights, n, seed=77)
        np.testing.assert_array_equal(got[0], want)


@pytest.mark.parametrize("want", [1.0, 15.0, 300.0])
def test_first_bound_expects_at_least_the_wanted_keys(want):
    """Independently: the expected count of keys below the bound, sum(1 - exp(-a t)), reaches ``want``."""
    rng = np.random.default_rng(int(want))
    for a in (rng.random(10_000), rng.gamma(0.3, size=4000), np.r_[rng.random(3000), 40.0]):
        bound = cpu_sampling._first_bound.py_func(want, a.sum(), (a * a).sum())
        if np.isinf(bound):
            continue
        assert -np.expm1(-a * bound).sum() >= want * (1 - 1e-12)
    peaked = np.r_[1.0, np.full(50, 1e-9)]  # one cell holds everything: no bound can expect 300 keys
    assert np.isinf(cpu_sampling._first_bound.py_func(300.0, peaked.sum(), (peaked * peaked).sum()))


def test_replacement_pieces_equal_the_reference_on_every_piece_boundary():
    """Targets landing in every piece, rows whose size is not a multiple of the piece, zero pieces."""
    piece = cpu_sampling.PIECE
    rng = np.random.default_rng(9)
    for size in (1, piece - 1, piece, piece + 1, 7 * piece + 3):
        a = rng.random((3, size)) * (rng.random((3, size)) < 0.5)
        a[:, size // 2] = 1.0
        a[2, : size // 2] = 0.0
        got_i, got_p = atskern.sample(a, 200, replace=True, seed=size)
        want_i, want_p = reference.sample(a, 200, replace=True, seed=size)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_p, want_p, rtol=1e-12)
        flat = got_i[..., 0]
        assert (np.take_along_axis(a, flat, axis=1) > 0).all(), "a zero-weight cell was drawn"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 3),
    size=st.integers(1, 2500),
    zero_rate=st.sampled_from([0.0, 0.5, 0.95]),
    n=st.integers(1, 30),
    replace=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**64 - 1),
)
def test_paths_agree_fuzzed(rows, size, zero_rate, n, replace, dtype, seed):
    rng = np.random.default_rng(seed % 2**32)
    a = rng.random((rows, size)) * (rng.random((rows, size)) >= zero_rate)
    a[:, rng.integers(size)] += 0.25  # every row valid
    a = a.astype(dtype)
    if not replace:
        n = min(n, size)
    grid = np.array([size], np.int64)
    results = [cpu_sampling.sample(a, n, grid, seed, replace, serial=serial, spare=spare)
               for serial in (True, False) for spare in (None, 0.5 - n)]
    for spare in (None, 0.5 - n):  # rows split into chunks, each with its own first bound
        results.append(cpu_sampling.sample(a, n, grid, seed, replace, chunk=cpu_sampling.BLOCK, spare=spare))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            np.testing.assert_array_equal(x, y)
    want, _ = reference.sample(a, n, replace=replace, seed=seed)
    np.testing.assert_array_equal(results[0][0], want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_segments_of_long_rows(dtype):
    """Rows of several segments: the first bound holds in the first segment only, whatever the chunking."""
    size = 2 * cpu_sampling.SEGMENT + 1234
    rng = np.random.default_rng(8)
    weights = rng.random((2, size)) + 0.01
    weights[1, : cpu_sampling.SEGMENT // 2] = 0.0  # the first segment holds half the row's positions
    weights[1, 5] = 1e3  # and one heavy cell
    weights = weights.astype(dtype)
    grid = np.array([size], np.int64)
    for n in (3, 150):
        runs = [cpu_sampling.sample(weights, n, grid, 31, False, serial=serial, spare=spare, chunk=chunk)
                for serial in (True, False) for spare in (None, 0.5 - n)
                for chunk in (None, cpu_sampling.SEGMENT + cpu_sampling.BLOCK)]
        for other in runs[1:]:
            for x, y in zip(runs[0], other):
                np.testing.assert_array_equal(x, y)
        want, _ = reference.sample(weights, n, seed=31)
        np.testing.assert_array_equal(runs[0][0], want)


@pytest.mark.parametrize("kind", ["uniform", "zeros", "signed", "wide", "nan"])
def test_block_scans_give_the_statistics_bit_for_bit(kind):
    """The block sums and counts do not depend on which scan took them (the head's statistics or the rest's
    sum-and-flags pass), the pass's flags are the flag loop's, and every flag passes where the exact test
    ``1 - (hi + 1) 2**-32 < a t`` does, so no key below the bound is ruled out."""
    rng = np.random.default_rng(["uniform", "zeros", "signed", "wide", "nan"].index(kind))
    block = cpu_sampling.BLOCK
    for trial in range(40):
        size = block if trial % 2 == 0 else int(rng.integers(1, block))
        values = {"uniform": rng.random(size), "signed": rng.normal(size=size),
                  "wide": np.ldexp(rng.random(size), rng.integers(-1074, 1000, size))}.get(kind, rng.random(size))
        if kind == "zeros":
            values[rng.random(size) < 0.5] = 0.0
        if kind == "nan":
            values[rng.integers(size)] = np.nan
        hi = rng.integers(0, 2**32, block, dtype=np.uint64).astype(np.uint32)
        hi[:64] = 2**32 - 1 - rng.integers(0, 4, 64)  # uniforms next to 1: flagged at the smallest products
        hi[64:128] = 2**32 - 2048 - rng.integers(-1024, 1024, 64)  # around the float32 test's edge
        bound = [np.inf, float(np.ldexp(rng.random() + 0.5, -24))][trial % 5] if trial % 5 < 2 else \
            float(np.ldexp(1.0, int(rng.integers(-1100, 40))))  # the second: products a t 2**32 near the edge
        for dtype in (np.float32, np.float64):
            v = values.astype(dtype) if dtype == np.float64 else values.clip(-1e30, 1e30).astype(dtype)
            total, positive, negative, _ = cpu_sampling._block_stats(v)
            assert (positive, negative) == ((v > 0).sum(), (v < 0).sum())
            flags = np.zeros(block, np.bool_)
            cpu_sampling._flag_block(v, hi[:size], bound, flags)
            with np.errstate(over="ignore", invalid="ignore"):
                exact = (2.0**32 - 1 - hi[:size].astype(np.float64)) * 2.0**-32 < v.astype(np.float64) * bound
            assert not np.any(exact & ~flags[:size])
            fused = np.zeros(block, np.bool_)
            scan = cpu_sampling._scan_block(v, hi[:size], bound, fused)
            assert scan[1:] == (positive, negative)
            assert np.float64(scan[0]).tobytes() == np.float64(total).tobytes()
            np.testing.assert_array_equal(fused[:size], flags[:size])
            assert not fused[size:].any()  # nothing written past the block


def _sum_in_written_order(values):
    """``atskern.cpu._block_scan``'s order in Python floats: 4 accumulators of 8 lanes over whole groups of 32
    values, lane-wise ``(acc0 + acc1) + (acc2 + acc3)``, a pairwise tree over the lanes, the rest in turn."""
    values = [float(v) for v in values]
    groups = len(values) // 32
    acc = [[0.0] * 8 for _ in range(4)]
    for g in range(groups):
        for k in range(4):
            for j in range(8):
                acc[k][j] += values[32 * g + 8 * k + j]
    lane = [(acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]) for j in range(8)]
    total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))
    for v in values[32 * groups:]:
        total += v
    return total


def _same_float(x, y):
    return np.float64(x).tobytes() == np.float64(y).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_piece_sums_add_in_their_written_order(dtype):
    """Each piece's sum is taken in the order written in ``atskern.cpu._block_scan``, computed here independently
    in Python floats, bit for bit: no compiled copy may reorder it (with fast-math reassociation the serial and
    the parallel path once differed by an ulp)."""
    rng = np.random.default_rng(5)
    piece = cpu_sampling.PIECE
    size = 3 * piece + 37
    row = rng.gamma(0.5, size=size) * rng.choice([0.0, 1.0, -1.0], size=size, p=[0.2, 0.7, 0.1])
    weights = row.astype(dtype)[None, :]
    sums = np.empty(4)
    positive, negative = cpu_sampling._piece_sums(weights, 0, sums)
    for s in range(4):
        assert _same_float(sums[s], _sum_in_written_order(weights[0, s * piece:(s + 1) * piece])), s
    assert (positive, negative) == (int((weights > 0).sum()), int((weights < 0).sum()))


@numba.njit(fastmath=True)
def _fast_math_caller(values):
    total, positive, squares = ordered_sum_squares(values, 0, values.size)
    return total + 0.0, positive, squares


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 95, 1000, cpu_sampling.BLOCK])
def test_block_sums_add_in_their_written_order(dtype, size):
    """The block scans without replacement take their sums in the written order too, from any offset of a row,
    and so does the scan inlined into a fast-math caller (whose flags Numba gives to every float operation that
    has none); a NaN anywhere gives NaN."""
    rng = np.random.default_rng(size)
    row = (rng.gamma(0.5, size=size + 3) * rng.choice([1.0, -1.0], size=size + 3)).astype(dtype)
    values = row[3:]
    want = _sum_in_written_order(values)
    assert _same_float(cpu_sampling._block_stats(values)[0], want)
    assert _same_float(_fast_math_caller(values)[0], want)
    flags = np.zeros(size, np.bool_)
    assert _same_float(cpu_sampling._scan_block(values, np.zeros(size, np.uint32), 1.0, flags)[0], want)
    if size:
        values = values.copy()
        values[size // 2] = np.nan
        assert np.isnan(cpu_sampling._scan_block(values, np.zeros(size, np.uint32), 1.0, flags)[0])
        assert np.isnan(cpu_sampling._block_stats(values)[0])


_SPECIAL = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e-310, 1.0, -1.0, 1e300, -1e300, np.inf, -np.inf, np.nan])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), _SPECIAL), max_size=140),
    start=st.integers(0, 9),
    dtype=st.sampled_from([np.float32, np.float64]),
    bound=st.sampled_from([0.0, 2.0**-40, 2.0**-24, 1.0, np.inf]),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_scans_fuzzed(values, start, dtype, bound, seed):
    """Any run of weights (signed zeros, subnormals, huge, inf, NaN; any length, any offset of the row): the
    three block scans give the written-order sum bit for bit (NaN where it is NaN), the counts NumPy gives, and
    the flag loop's flags, writing nothing past the run."""
    with np.errstate(over="ignore", invalid="ignore"):
        row = np.array([0.0] * start + values, np.float64).astype(dtype)
    run = row[start:]
    size = run.size
    hi = np.random.default_rng(seed).integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = _sum_in_written_order(run)
    counts = (int((run > 0).sum()), int((run < 0).sum()))
    flags = np.zeros(size + 8, np.bool_)
    cpu_sampling._flag_block(run, hi, bound, flags)
    fused = np.zeros(size + 8, np.bool_)
    with np.errstate(over="ignore", invalid="ignore"):
        results = [cpu_sampling._block_stats(run)[:3], cpu_sampling._scan_block(run, hi, bound, fused)]
    for total, positive, negative in results:
        assert _same_float(total, want) or (np.isnan(total) and np.isnan(want))
        assert (positive, negative) == counts
    np.testing.assert_array_equal(fused, flags)
    assert not fused[size:].any()


def test_block_scans_refuse_strided_runs():
    """The scans read runs of unit stride only: any other view is refused, not summed from the wrong places."""
    values = np.arange(1.0, 65.0)
    hi = np.zeros(64, np.uint32)
    flags = np.zeros(64, np.bool_)
    with pytest.raises(ValueError, match="unit-stride"):
        cpu_sampling._block_stats(values[::2])
    with pytest.raises(ValueError, match="unit-stride"):
        cpu_sampling._scan_block(values[::-1], hi, 1.0, flags)
    with pytest.raises(ValueError, match="unit-stride"):
        cpu_sampling._scan_block(values[:32], hi[::2], 1.0, flags)
    with pytest.raises(ValueError, match="as long as"):
        cpu_sampling._scan_block(values, hi[:10], 1.0, flags)
    assert cpu_sampling._block_stats(values[::1])[0] == 2080.0


@pytest.mark.parametrize("rows, serial", [(1, True), (2, False)])
def test_one_row_with_replacement_runs_on_the_calling_thread(rows, serial, monkeypatch):
    """With replacement the parallel path splits rows, so a single row of any size takes the serial one."""
    seen = []
    run = cpu_sampling._with_replacement
    monkeypatch.setattr(cpu_sampling, "SERIAL_WORK", 0)
    monkeypatch.setattr(cpu_sampling, "_with_replacement", lambda *args: seen.append(args[3]) or run(*args))
    atskern.sample(np.ones((rows, 300, 300), np.float32), 5, replace=True, seed=1)
    assert seen == [serial]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 80),
    counts=st.lists(st.integers(0, 80), min_size=1, max_size=4),
    distinct=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_row_smallest_in_key_then_position_order(n, counts, distinct, seed):
    """The finish's selection of a row's n smallest candidates (chunk lists of up to n keys, a full list's
    largest first as in a max-heap), in increasing (key, position) order, against Python's sort: keys drawn from
    a few values (``-0.0`` and ``inf`` among them), so ties are everywhere, by insertion and by argsort."""
    rng = np.random.default_rng(seed)
    values = np.array([-0.0, 0.0, 0.5, 1.0, 2.0, np.inf])[:distinct]
    nchunks = len(counts)
    cand_keys = np.zeros((1, nchunks, n))
    cand_idx = np.zeros((1, nchunks, n), np.int64)
    cand_count = np.zeros((1, nchunks), np.int64)
    pairs = []
    positions = rng.permutation(10_000)
    for c, count in enumerate(counts):
        count = min(count, n)
        keys = rng.choice(values, count)
        idx = positions[c * 100:c * 100 + count]
        if count:
            top = max(range(count), key=lambda j: (keys[j], idx[j]))
            order = [top] + [j for j in range(count) if j != top]
            cand_keys[0, c, :count], cand_idx[0, c, :count] = keys[order], idx[order]
        cand_count[0, c] = count
        pairs += list(zip(keys.tolist(), idx.tolist()))
    want = [p for _, p in sorted(pairs)[:n]]
    size = nchunks * n
    got = np.full(n, -1, np.int64)
    count = cpu_sampling._row_smallest(cand_keys, cand_idx, cand_count, 0, np.empty(size), np.empty(size, np.int64), got)
    assert count == len(want)
    assert got[:count].tolist() == want


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 7, 64, 300])
def test_many_tiny_rows_share_scratch_and_give_the_reference_draws(size, dtype, replace, monkeypatch):
    """Many tiny rows per parallel task, one set of scratch arrays for them all (rows with zeros, with fewer
    positive cells than n, one peaked): the reference's draws whatever the task size, on both paths, and the
    same probabilities and status bit for bit."""
    rng = np.random.default_rng(size)
    rows = 700
    a = rng.gamma(0.5, size=(rows, size)) * (rng.random((rows, size)) < 0.7)
    a[::5, 1:] = 0.0  # at most one positive cell
    a[3, -1] = 1e9
    a[:, 0] += 1e-3
    a = a.astype(dtype)
    grid = np.array([size], np.int64)
    for n in (1, 4, 10):
        if not replace and n > size:
            continue
        runs = []
        for work in (0, 1 << 30):  # one row per task, every row in one task
            monkeypatch.setattr(cpu_sampling, "GROUP_WORK", work)
            runs += [cpu_sampling.sample(a, n, grid, 5 + n, replace, serial=serial) for serial in (False, True)]
        for other in runs[1:]:
            for x, y in zip(runs[0], other):
                np.testing.assert_array_equal(x, y)
        want_i, want_p = reference.sample(a, n, replace=replace, seed=5 + n)
        np.testing.assert_array_equal(runs[0][0], want_i)
        np.testing.assert_allclose(runs[0][1], want_p, rtol=1e-6 if dtype == np.float32 else 1e-12)
