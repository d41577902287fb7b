"""``sample(..., validate=False)``'s documented result and the status it can return (``return_status=True``,
``atskern.check_status``), on the CPU (the GPU twin is tests/test_gpu_sampling.py)."""

from __future__ import annotations

import numpy as np
import pytest

import atskern


def _bad_rows():
    a = np.random.default_rng(0).random((5, 6, 7)) + 0.01
    a[1, 2, 3] = np.nan
    a[2] = 0.0
    a[3, 0, 0] = -1.0
    return a


@pytest.mark.parametrize("replace", [False, True])
def test_validate_false_gives_probs_zero_on_bad_rows(replace):
    a = _bad_rows()
    indices, probs, status = atskern.sample(a, 4, replace=replace, seed=1, validate=False, return_status=True)
    assert ((indices >= 0) & (indices < np.array([6, 7]))).all()
    assert (probs[1:4] == 0).all() and (probs[[0, 4]] > 0).all()
    good, good_probs = atskern.sample(a[[0, 4]], 4, replace=replace, seed=1)
    # rows are drawn independently of each other's contents, but keyed by their row number
    assert np.array_equal(indices[0], good[0])
    np.testing.assert_allclose(probs[0], good_probs[0], rtol=1e-15)
    # the status counts each row's non-finite, negative and positive cells (checked independently)
    flat = a.reshape(5, -1)
    assert np.array_equal(status[:-1, 0], (~np.isfinite(flat)).sum(1))
    assert np.array_equal(status[:-1, 1], (flat < 0).sum(1))
    assert np.array_equal(status[:-1, 2], (flat > 0).sum(1))


def test_check_status_raises_what_sample_raises():
    a = _bad_rows()
    with pytest.raises(ValueError) as direct:
        atskern.sample(a, 4, seed=1)
    _, _, status = atskern.sample(a, 4, seed=1, validate=False, return_status=True)
    with pytest.raises(ValueError) as later:
        atskern.check_status(status, 4)
    assert str(later.value) == str(direct.value) and "row 1" in str(direct.value)
    ok = atskern.sample(a[[0, 4]], 4, seed=1, return_status=True)[2]
    atskern.check_status(ok, 4)


def test_return_status_and_device_seed_arguments_are_checked():
    a = _bad_rows()[[0]]
    with pytest.raises(TypeError, match="return_status must be True or False"):
        atskern.sample(a, 1, return_status=1)
    indices, probs = atskern.sample(a, 2, seed=3)
    assert indices.shape == (1, 2, 2) and probs.shape == (1, 2)


@pytest.mark.parametrize("status, n, error, message", [
    ([[0, 0, 4, 0], [0, 0, 4, 0]], 4, TypeError, "status must be a NumPy or CuPy array, got list"),
    (np.zeros((2, 3), np.int64), 4, ValueError, r"status must be the integer \(B \+ 1, 4\) status .* int64 \(2, 3\)"),
    (np.zeros((1, 4), np.int64), 4, ValueError, r"status must be the integer \(B \+ 1, 4\) status"),
    (np.zeros((2, 4)), 4, ValueError, r"status must be the integer \(B \+ 1, 4\) status .* float64"),
    (np.zeros((2, 4), np.int64), 3.7, TypeError, "n must be an integer, got 3.7"),
    (np.zeros((2, 4), np.int64), 0, ValueError, "n must be >= 1, got 0"),
])
def test_check_status_refuses_what_is_not_a_status(status, n, error, message):
    with pytest.raises(error, match=message):
        atskern.check_status(status, n)


def test_expectation_grad_names_a_missing_gradient():
    features, probs = np.ones((2, 3, 4)), np.full((2, 3), 0.25)
    with pytest.raises(TypeError, match="grad must be a NumPy or CuPy array, got NoneType"):
        atskern.expectation_grad(None, features, probs)
