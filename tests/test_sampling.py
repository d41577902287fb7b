"""atskern.sample: equal to the reference draw for draw, right distribution, deterministic, validated."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import atskern
from atskern import reference
from atskern.cpu import sampling as cpu_sampling

from .conftest import BACKENDS, to_backend, to_numpy

ROOT = Path(__file__).resolve().parents[1]


def _attention(shape, dtype, seed=0, zeros=0.0):
    rng = np.random.default_rng(seed)
    a = rng.gamma(0.5, size=shape)
    if zeros:
        a[rng.random(shape) < zeros] = 0.0
        a.reshape(shape[0], -1)[:, 0] = 1.0  # keep rows valid
    return a.astype(dtype)


def _sample(backend, attention, n, **kwargs):
    indices, probs = atskern.sample(to_backend(attention, backend), n, **kwargs)
    return to_numpy(indices), to_numpy(probs)


# --- equal to the reference -----------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 40), (2, 9, 11), (2, 4, 5, 6), (1, 3000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("replace", [False, True])
def test_equals_reference(backend, shape, dtype, replace):
    attention = _attention(shape, dtype, seed=len(shape), zeros=0.3)
    positives = int((attention.reshape(shape[0], -1) > 0).sum(axis=1).min())
    for n in sorted({1, 3, min(17, positives), positives if not replace else 25}):
        got_i, got_p = _sample(backend, attention, n, replace=replace, seed=1234 + n)
        want_i, want_p = reference.sample(attention, n, replace=replace, seed=1234 + n)
        assert got_i.dtype == np.int32 and got_i.shape == (shape[0], n, len(shape) - 1)
        assert got_p.dtype == dtype and got_p.shape == (shape[0], n)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_p, want_p, rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("replace", [False, True])
def test_logits_equal_reference(backend, replace):
    logits = np.random.default_rng(3).normal(scale=3.0, size=(4, 12, 12))
    logits[0, :6] = -np.inf
    got_i, got_p = _sample(backend, logits, 9, replace=replace, logits=True, seed=77)
    want_i, want_p = reference.sample(logits, 9, replace=replace, logits=True, seed=77)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_p, want_p, rtol=1e-12)
    assert (got_i[0, :, 0] >= 6).all(), "a -inf logit was drawn"


def test_chunking_does_not_change_draws():
    """Rows split into many chunks (and merged) give exactly the whole-row draws, probs and status."""
    weights = _attention((3, 10_000), np.float64, zeros=0.5).reshape(3, -1)
    grid = np.array([10_000], np.int64)
    whole = cpu_sampling.sample(weights, 40, grid, 99, False, chunk=16 * cpu_sampling.BLOCK)
    split = cpu_sampling.sample(weights, 40, grid, 99, False, chunk=cpu_sampling.BLOCK)
    for a, b in zip(whole, split):
        np.testing.assert_array_equal(a, b)
    want, _ = reference.sample(weights, 40, seed=99)
    np.testing.assert_array_equal(whole[0], want)
    np.testing.assert_array_equal(whole[2][:-1, 2], (weights > 0).sum(axis=1))


def test_large_row_equals_reference():
    attention = _attention((1, 300_000), np.float32)
    got, _ = atskern.sample(attention, 50, seed=5)
    want, _ = reference.sample(attention, 50, seed=5)
    np.testing.assert_array_equal(got, want)


# --- properties ------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(30,), (6, 7), (3, 4, 5)])
def test_properties(backend, grid):
    attention = _attention((16, *grid), np.float64, seed=4, zeros=0.5)
    weights = attention.reshape(16, -1)
    n = int((weights > 0).sum(axis=1).min())
    indices, probs = _sample(backend, attention, n, seed=8)
    assert (indices >= 0).all() and (indices < np.array(grid)).all()
    flat = np.ravel_multi_index(tuple(np.moveaxis(indices, -1, 0)), grid)
    for row in range(16):
        assert len(set(flat[row])) == n, "a position was drawn twice without replacement"
    expected = np.take_along_axis(weights, flat, axis=1) / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert (np.take_along_axis(weights, flat, axis=1) > 0).all(), "a zero-weight position was drawn"


def test_seeds(backend):
    attention = _attention((8, 50, 50), np.float32)
    first, _ = _sample(backend, attention, 10, seed=1)
    again, _ = _sample(backend, attention, 10, seed=1)
    other, _ = _sample(backend, attention, 10, seed=2)
    fresh_a, _ = _sample(backend, attention, 10)
    fresh_b, _ = _sample(backend, attention, 10)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert (fresh_a != fresh_b).any(), "seed=None gave the same draws twice"


# --- distribution ------------------------------------------------------------------------

ROWS = 40_000


def _successive_probabilities(a, n):
    """Exact probability of every ordered draw of n distinct positions under successive sampling."""
    probs = {}
    for seq in itertools.permutations(range(a.size), n):
        p, left = 1.0, 1.0
        for i in seq:
            p *= a[i] / left
            left -= a[i]
        probs[seq] = p
    return probs


def _z_scores(counts, expected_probs, trials):
    expected = expected_probs * trials
    return (counts - expected) / np.sqrt(expected * (1 - expected_probs))


def _assert_fits(counts, expected_probs, trials):
    """Every cell within 4.5 standard errors and the chi-square test not rejected at 1e-4."""
    z = _z_scores(counts, expected_probs, trials)
    assert np.abs(z).max() < 4.5, f"z-scores {np.round(z, 2)}"
    chi2 = ((counts - expected_probs * trials) ** 2 / (expected_probs * trials)).sum()
    assert stats.chi2.sf(chi2, counts.size - 1) > 1e-4


def test_ordered_pairs_follow_successive_sampling(backend):
    a = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    indices, _ = _sample(backend, np.tile(a, (ROWS, 1)), 2, seed=2024)
    exact = _successive_probabilities(a, 2)
    cells = list(exact)
    pair_ids = {pair: k for k, pair in enumerate(cells)}
    observed = np.bincount([pair_ids[(i, j)] for i, j in indices[:, :, 0]], minlength=len(cells))
    _assert_fits(observed, np.array([exact[c] for c in cells]), ROWS)


def test_inclusion_probabilities(backend):
    a = np.array([0.35, 0.3, 0.15, 0.1, 0.06, 0.04])
    n = 3
    indices, _ = _sample(backend, np.tile(a, (ROWS, 1)).astype(np.float32), n, seed=7)
    exact = np.zeros(a.size)
    for seq, p in _successive_probabilities(a, n).items():
        exact[list(seq)] += p
    counts = np.bincount(indices[:, :, 0].ravel(), minlength=a.size)
    z = (counts - exact * ROWS) / np.sqrt(ROWS * exact * (1 - exact))
    assert np.abs(z).max() < 4.5, f"z-scores {np.round(z, 2)}"
    # The test has power: the with-replacement inclusion rates n * a are far off.
    z_wrong = (counts - n * a * ROWS) / np.sqrt(ROWS * exact * (1 - exact))
    assert np.abs(z_wrong).max() > 20


def test_first_draw_follows_weights_in_a_large_grid(backend):
    a = np.random.default_rng(0).random(64)
    a /= a.sum()
    indices, _ = _sample(backend, np.tile(a, (ROWS, 1)), 5, seed=31)
    counts = np.bincount(indices[:, 0, 0], minlength=a.size)
    _assert_fits(counts, a, ROWS)


def test_with_replacement_follows_weights(backend):
    a = np.array([0.5, 0.0, 0.2, 0.2, 0.1])
    indices, _ = _sample(backend, np.tile(a, (ROWS // 4, 1)), 4, replace=True, seed=3)
    counts = np.bincount(indices.ravel(), minlength=a.size)
    assert counts[1] == 0
    keep = a > 0
    _assert_fits(counts[keep], a[keep], ROWS)


def test_logits_and_weights_agree(backend):
    a = np.random.default_rng(1).random((2000, 40)) + 0.01
    with_weights, _ = _sample(backend, a, 6, seed=11)
    with_logits, _ = _sample(backend, np.log(a) + 5.0, 6, seed=11, logits=True)
    same_rows = (with_weights == with_logits).all(axis=(1, 2)).mean()
    assert same_rows > 0.999, "logits and weights drew differently beyond rounding ties"


# --- determinism across thread counts ---------------------------------------------------

_THREAD_SCRIPT = """
import hashlib, json, sys
import numpy as np, numba, atskern
rng = np.random.default_rng(0)
digest = hashlib.sha256()
probs = {"float32": [], "float64": []}
for shape, n, replace in [((1, 400_000), 30, False), ((8, 60, 70), 25, False), ((8, 60, 70), 25, True)]:
    a = rng.random(shape).astype(np.float32)
    i, p = atskern.sample(a, n, replace=replace, seed=42)
    digest.update(i.tobytes()); probs["float32"] += p.ravel().tolist()
short = rng.random((3, 70_000)) * (rng.random((3, 70_000)) < 1e-4)  # fewer positives than n: fillers
short[:, 5] = 1.0
extreme = np.ldexp(rng.random((4, 50_000)) + 0.1, [[-1000], [-70], [0], [1020]])  # rescaled rows
for a, n, replace in [(short, 40, False), (extreme, 20, False), (extreme, 20, True)]:
    i, p = atskern.sample(a, n, replace=replace, seed=7)
    digest.update(i.tobytes()); probs["float64"] += p.ravel().tolist()
print(json.dumps({"threads": numba.get_num_threads(), "digest": digest.hexdigest(), "probs": probs}))
"""


def test_same_draws_for_any_thread_count():
    """The same draws with one thread and two, each in a fresh process (which may compile the kernels or load
    them from the disk cache). Probabilities agree to rounding: a row's float64 total is a sum in the order the
    compiler vectorizes it (fast-math reassociation), which can differ between a kernel compiled in the process
    and one loaded from the cache (the last bits of a float64 total)."""
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [r["threads"] for r in results] == [1, 2]
    assert results[0]["digest"] == results[1]["digest"]
    np.testing.assert_allclose(results[0]["probs"]["float32"], results[1]["probs"]["float32"], rtol=2.5e-7, atol=0)
    np.testing.assert_allclose(results[0]["probs"]["float64"], results[1]["probs"]["float64"], rtol=1e-14, atol=0)


# --- GPU against CPU ----------------------------------------------------------------------

gpu_only = pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "gpu"])


@gpu_only
@pytest.mark.parametrize("replace", [False, True])
def test_gpu_draws_equal_cpu_draws(backend, replace):
    attention = _attention((3000, 32, 32), np.float32, seed=12, zeros=0.2)
    cpu_i, cpu_p = atskern.sample(attention, 20, replace=replace, seed=2019)
    gpu_i, gpu_p = _sample(backend, attention, 20, replace=replace, seed=2019)
    same_rows = (cpu_i == gpu_i).all(axis=(1, 2)).mean()
    assert same_rows >= 0.999
    np.testing.assert_allclose(gpu_p, cpu_p, rtol=1e-6)


@gpu_only
def test_gpu_small_blocks_many_chunks_and_large_n(backend, small_gpu_blocks, monkeypatch):
    from atskern.gpu import sampling as gpu_sampling

    monkeypatch.setattr(gpu_sampling, "MIN_CHUNK", 128)
    attention = _attention((5, 5000), np.float64, seed=3)
    for n in (1, 37, gpu_sampling.max_selection_n() + 1):
        got, _ = _sample(backend, attention, n, seed=n)
        want, _ = reference.sample(attention, n, seed=n)
        np.testing.assert_array_equal(got, want)


@gpu_only
def test_gpu_more_rows_than_one_grid_dimension(backend):
    attention = _attention((70_000, 12), np.float32, seed=5)
    got, _ = _sample(backend, attention, 3, seed=17)
    want, _ = atskern.sample(attention, 3, seed=17)
    assert (got == want).all(axis=(1, 2)).mean() >= 0.999
