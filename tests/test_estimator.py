"""The ATS estimator: equal to the reference, linear, and exactly unbiased by enumeration of all draws."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import atskern
from atskern import reference

from .enumeration import all_draws, expect_at
from .conftest import to_backend, to_numpy


def _inputs(rows, n, feature_shape, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    raw = rng.random((rows, n + 3)) + 0.05
    probs = (raw / raw.sum(axis=1, keepdims=True))[:, :n]
    features = rng.normal(size=(rows, n, *feature_shape))
    grad = rng.normal(size=(rows, *feature_shape))
    return features.astype(dtype), probs.astype(dtype), grad.astype(dtype)


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("feature_shape", [(), (5,), (2, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_reference(backend, replace, feature_shape, dtype):
    features, probs, grad = _inputs(4, 6, feature_shape, dtype=dtype)
    on = lambda x: to_backend(x, backend)  # noqa: E731
    got = to_numpy(atskern.expectation(on(features), on(probs), replace=replace))
    got_gp, got_gf = map(to_numpy, atskern.expectation_grad(on(grad), on(features), on(probs), replace=replace))
    want = reference.expectation(features, probs, replace=replace)
    want_gp, want_gf = reference.expectation_grad(grad, features, probs, replace=replace)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert got.dtype == dtype and got.shape == (4, *feature_shape)
    assert got_gp.dtype == dtype and got_gf.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(got_gp, want_gp, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(got_gf, want_gf, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("replace", [False, True])
def test_feature_gradient_is_the_derivative(replace):
    """F is linear in the features, so grad_features must be exactly J^T g."""
    features, probs, grad = _inputs(2, 4, (3,), seed=5)
    _, grad_features = atskern.expectation_grad(grad, features, probs, replace=replace)
    base = atskern.expectation(features, probs, replace=replace)
    numeric = np.zeros_like(features)
    for index in np.ndindex(features.shape):
        bumped = features.copy()
        bumped[index] += 1.0
        numeric[index] = np.sum((atskern.expectation(bumped, probs, replace=replace) - base) * grad)
    np.testing.assert_allclose(grad_features, numeric, rtol=1e-12, atol=1e-12)


def _check_unbiased(K, n, replace, seed):
    rng = np.random.default_rng(seed)
    a = rng.random(K) + 0.1
    a /= a.sum()
    f = rng.normal(size=(K, 3))
    g = rng.normal(size=3)
    seqs, weight = all_draws(a, n, replace)
    assert abs(weight.sum() - 1.0) < 1e-12
    rows = len(seqs)
    features, probs = f[seqs], a[seqs]
    estimate = atskern.expectation(features, probs, replace=replace)
    grad_probs, grad_features = atskern.expectation_grad(np.tile(g, (rows, 1)), features, probs, replace=replace)

    expected_attention_grad = expect_at(seqs, weight[:, None] * grad_probs, K)
    expected_feature_grad = expect_at(seqs, weight[:, None, None] * grad_features, K)
    expected_estimate = [math.fsum(weight * estimate[:, c]) for c in range(3)]

    np.testing.assert_allclose(expected_estimate, a @ f, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected_attention_grad, f @ g, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected_feature_grad, a[:, None] * g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 7])
def test_unbiased_without_replacement_by_enumeration(K):
    for n in range(1, K + 1):
        _check_unbiased(K, n, replace=False, seed=100 * K + n)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 7])
def test_unbiased_with_replacement_by_enumeration(K):
    for n in range(1, K + 1):
        if K**n > 200_000:
            continue
        _check_unbiased(K, n, replace=True, seed=100 * K + n)


def test_unbiased_with_replacement_largest_case():
    _check_unbiased(7, 7, replace=True, seed=77)


def test_enumeration_detects_a_biased_gradient():
    """A plausible wrong gradient (the with-replacement weighting on draws without replacement) fails the check."""
    rng = np.random.default_rng(0)
    a = rng.random(6) + 0.1
    a /= a.sum()
    f = rng.normal(size=(6, 3))
    g = rng.normal(size=3)
    seqs, weight = all_draws(a, 3, replace=False)
    features, probs = f[seqs], a[seqs]
    inner = features @ g
    naive = inner / probs / 3  # the with-replacement weighting applied to draws without replacement
    expected = np.zeros(6)
    np.add.at(expected, seqs, weight[:, None] * naive)
    assert np.abs(expected - f @ g).max() > 0.05


# --- validation ------------------------------------------------------------------------


def test_rejects_bad_inputs():
    features, probs, grad = _inputs(2, 3, (4,))
    with pytest.raises(ValueError, match=r"features must have shape \(batch, n, \.\.\.\)"):
        atskern.expectation(features[:, :2], probs)
    with pytest.raises(ValueError, match="probs must be 2-dimensional"):
        atskern.expectation(features, probs[0])
    with pytest.raises(TypeError, match="probs must be float32 or float64"):
        atskern.expectation(features, probs.astype(np.int32))
    with pytest.raises(TypeError, match="features must be a NumPy or CuPy array"):
        atskern.expectation([[1.0]], probs)
    bad = probs.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="probs row 1 contains NaN or inf"):
        atskern.expectation_grad(grad, features, bad)
    with pytest.raises(ValueError, match=r"grad must have the estimate's shape \(2, 4\)"):
        atskern.expectation_grad(grad[:, :3], features, probs)
    with pytest.raises(TypeError, match="replace must be True or False"):
        atskern.expectation(features, probs, replace="yes")


def test_impossible_probs_are_refused():
    """Issue 11 item 5, verbatim: [[.9, .9, .9]] without replacement is not a draw's probabilities."""
    features = np.ones((1, 3, 2))
    probs = np.array([[0.9, 0.9, 0.9]])
    with pytest.raises(ValueError, match=r"probs row 0 sums to 2\.7.* > 1"):
        atskern.expectation(features, probs)
    with pytest.raises(ValueError, match=r"probs row 0 sums to 2\.7"):
        atskern.expectation_grad(np.ones((1, 2)), features, probs)
    atskern.expectation(features, probs, replace=True)  # independent draws: each in [0, 1] is fine
    for value in (-0.1, 1.5, np.inf):
        bad = np.full((2, 3), 0.2)
        bad[1, 1] = value
        with pytest.raises(ValueError, match="probs row 1 "):
            atskern.expectation(features.repeat(2, axis=0), bad, replace=True)


def test_probs_sum_tolerance_follows_the_dtype():
    features = np.ones((1, 4, 2))
    rounding32 = np.array([[0.25, 0.25, 0.25, 0.25 + 3e-6]], np.float32)  # within 4 * 2**-20
    atskern.expectation(features.astype(np.float32), rounding32)
    with pytest.raises(ValueError, match="probs row 0 sums to"):
        atskern.expectation(features, np.array([[0.25, 0.25, 0.25, 0.25 + 3e-6]]))
    atskern.expectation(features, np.array([[0.25, 0.25, 0.25, 0.25 + 5e-7]]))


@pytest.mark.parametrize("replace", [False, True])
def test_fillers_get_zero_weight_and_finite_gradients(backend, replace):
    """R3: a probs == 0 entry has feature coefficient 0 and both gradients 0, without warnings."""
    features, probs, grad = _inputs(3, 5, (4,), seed=3)
    probs[0, 3:] = 0.0
    probs[2, 1] = 0.0
    on = lambda x: to_backend(x, backend)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate = to_numpy(atskern.expectation(on(features), on(probs), replace=replace))
        gp, gf = map(to_numpy, atskern.expectation_grad(on(grad), on(features), on(probs), replace=replace))
    assert np.isfinite(gp).all() and np.isfinite(gf).all()
    assert (gp[0, 3:] == 0).all() and (gf[0, 3:] == 0).all() and gp[2, 1] == 0 and (gf[2, 1] == 0).all()
    changed = features.copy()
    changed[0, 3:] = 1e9
    changed[2, 1] = -1e9
    np.testing.assert_array_equal(to_numpy(atskern.expectation(on(changed), on(probs), replace=replace)), estimate)
    np.testing.assert_allclose(estimate, reference.expectation(features, probs, replace=replace), rtol=1e-12)
    want_gp, want_gf = reference.expectation_grad(grad, features, probs, replace=replace)
    np.testing.assert_allclose(gp, want_gp, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(gf, want_gf, rtol=1e-12, atol=1e-15)


def _check_unbiased_with_zeros(K, zeros, n, seed):
    """Exact enumeration over a row with zero weights, the draws continuing with fillers (R1):
    the estimate and the feature gradient are exact, and so is the attention gradient at
    every positive cell (a zero-weight cell only ever appears as a filler, so it gets none)."""
    rng = np.random.default_rng(seed)
    a = rng.random(K) + 0.1
    a[rng.permutation(K)[:zeros]] = 0.0
    a /= a.sum()
    f = rng.normal(size=(K, 3))
    g = rng.normal(size=3)
    seqs, weight = all_draws(a, n, replace=False)
    assert abs(math.fsum(weight) - 1.0) < 1e-12
    features, probs = f[seqs], a[seqs]
    estimate = atskern.expectation(features, probs)
    grad_probs, grad_features = atskern.expectation_grad(np.tile(g, (len(seqs), 1)), features, probs)
    expected_estimate = [math.fsum(weight * estimate[:, c]) for c in range(3)]
    np.testing.assert_allclose(expected_estimate, a @ f, rtol=0, atol=1e-12)
    attention_grad = expect_at(seqs, weight[:, None] * grad_probs, K)
    np.testing.assert_allclose(attention_grad, np.where(a > 0, f @ g, 0.0), rtol=0, atol=1e-12)
    feature_grad = expect_at(seqs, weight[:, None, None] * grad_features, K)
    np.testing.assert_allclose(feature_grad, a[:, None] * g, rtol=0, atol=1e-12)
    np.testing.assert_allclose(estimate, reference.expectation(features, probs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [2, 3, 5, 7])
def test_unbiased_with_zero_weights_by_enumeration(K):
    for zeros in range(1, K):
        for n in range(1, K + 1):
            _check_unbiased_with_zeros(K, zeros, n, seed=1000 * K + 10 * zeros + n)


def test_enumeration_with_zeros_matches_the_sampler():
    """The enumeration's filler continuation is the sampler's: frequencies of whole draws agree."""
    a = np.array([0.0, 0.5, 0.0, 0.3, 0.2])
    seqs, weight = all_draws(a, 4, replace=False)
    rows = 20_000
    indices, probs = atskern.sample(np.tile(a, (rows, 1)), 4, seed=21)
    ids = {tuple(s): i for i, s in enumerate(seqs.tolist())}
    observed = np.bincount([ids[tuple(r)] for r in indices[:, :, 0].tolist()], minlength=len(seqs))
    z = (observed - weight * rows) / np.sqrt(rows * weight * (1 - weight))
    assert np.abs(z).max() < 4.5, np.round(z, 2)
    np.testing.assert_array_equal(probs[:, 3], 0.0)
