"""atskern.sample refuses bad input with a clear error before any kernel runs; fuzzed with hypothesis."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import atskern
from atskern import _validation as v


def _valid(shape=(2, 5, 5)):
    return np.random.default_rng(0).random(shape) + 0.1


@pytest.mark.parametrize(
    "attention, n, kwargs, error, message",
    [
        (np.ones(5), 1, {}, ValueError, r"attention must be 2 or 3 or 4-dimensional .* got shape \(5,\)"),
        (np.ones((1, 2, 2, 2, 2)), 1, {}, ValueError, r"got shape \(1, 2, 2, 2, 2\)"),
        (np.ones((2, 3), np.int32), 1, {}, TypeError, "attention must be float32 or float64, got int32"),
        (np.ones((2, 3), np.float16), 1, {}, TypeError, "attention must be float32 or float64, got float16"),
        (np.ones((0, 3)), 1, {}, ValueError, r"attention must not be empty, got shape \(0, 3\)"),
        ([[1.0, 2.0]], 1, {}, TypeError, "attention must be a NumPy or CuPy array, got list"),
        (_valid(), 0, {}, ValueError, "n must be >= 1, got 0"),
        (_valid(), -3, {}, ValueError, "n must be >= 1, got -3"),
        (_valid(), 2.0, {}, TypeError, "n must be an integer, got 2.0"),
        (_valid(), True, {}, TypeError, "n must be an integer, got True"),
        (_valid(), 26, {}, ValueError, r"n=26 is larger than the 25 positions of attention's grid \(5, 5\)"),
        (_valid(), 2, {"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        (_valid(), 2, {"seed": 2**64}, ValueError, "seed must be <= 18446744073709551615"),
        (_valid(), 2, {"seed": 1.5}, TypeError, "seed must be an integer"),
        (_valid(), 2, {"replace": 1}, TypeError, "replace must be True or False"),
        (_valid(), 2, {"logits": None}, TypeError, "logits must be True or False"),
    ],
)
def test_static_errors(attention, n, kwargs, error, message):
    with pytest.raises(error, match=message):
        atskern.sample(attention, n, **kwargs)


def _with(row, value, where=(1, 2, 3)):
    a = _valid()
    a[where[0], where[1], where[2]] = value
    return a


@pytest.mark.parametrize(
    "attention, n, kwargs, message",
    [
        (_with(1, np.nan), 2, {}, r"attention row 1 contains NaN or inf \(1 entries\)"),
        (_with(1, np.inf), 2, {}, r"attention row 1 contains NaN or inf"),
        (_with(1, -np.inf), 2, {}, r"attention row 1 contains NaN or inf"),
        (_with(1, -0.5), 2, {}, "attention row 1 has 1 negative weights"),
        (_with(1, np.nan), 2, {"logits": True}, "attention row 1 contains NaN or \\+inf logits"),
        (_with(1, np.inf), 2, {"logits": True}, "attention row 1 contains NaN or \\+inf logits"),
    ],
)
def test_value_errors_name_the_row(attention, n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        atskern.sample(attention, n, **kwargs)


def test_all_zero_row():
    a = _valid()
    a[1] = 0.0
    with pytest.raises(ValueError, match="attention row 1 has no positive weight: all weights are zero"):
        atskern.sample(a, 1)
    with np.errstate(divide="ignore"):
        logits = np.log(a)
    with pytest.raises(ValueError, match="attention row 1 has no positive weight: every logit is -inf"):
        atskern.sample(logits, 1, logits=True)


def test_too_few_positive_entries():
    a = _valid()
    a[1].ravel()[3:] = 0.0
    with pytest.raises(ValueError, match="attention row 1 has only 3 positive weights, fewer than n=4"):
        atskern.sample(a, 4, strict=True)
    indices, probs = atskern.sample(a, 4, seed=0)  # the default pads with fillers (R1)
    assert indices.shape == (2, 4, 2) and probs[1, 3] == 0
    indices, _ = atskern.sample(a, 4, replace=True, seed=0)
    assert indices.shape == (2, 4, 2)


def test_float64_sum_overflow_is_sampled_exactly():
    """Formerly an error: rows whose float64 sum overflows are rescaled by a power of two."""
    a = np.full((1, 4), 1e308)
    indices, probs = atskern.sample(a, 4, seed=0)
    assert sorted(indices[0, :, 0]) == [0, 1, 2, 3]
    np.testing.assert_allclose(probs, 0.25, rtol=1e-15)


def test_validate_false_skips_the_checks_but_stays_in_range():
    a = _valid((3, 4, 4))
    a[0, 1, 1] = np.nan
    a[1] = 0.0
    a[2, 0, 0] = -1.0
    for replace in (False, True):
        indices, probs = atskern.sample(a, 5, replace=replace, seed=0, validate=False)
        assert indices.shape == (3, 5, 2)
        assert (indices >= 0).all() and (indices < 4).all()
    with pytest.raises(TypeError, match="validate must be True or False"):
        atskern.sample(a, 1, validate=1)


def test_non_contiguous_input_is_accepted():
    a = np.asfortranarray(_valid((3, 6, 7)))[:, ::2]
    indices, probs = atskern.sample(a, 3, seed=1)
    want, _ = atskern.sample(np.ascontiguousarray(a), 3, seed=1)
    np.testing.assert_array_equal(indices, want)


_special = st.sampled_from([0.0, -0.0, 1.0, 1e-300, 1e300, -1.0, np.nan, np.inf, -np.inf, 3.4e38, 1e-45])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=hnp.arrays(
        dtype=np.float64,
        shape=hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=6),
        elements=st.one_of(st.floats(0, 10), _special),
    ),
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64]),
    n=st.integers(-2, 40),
    replace=st.booleans(),
    logits=st.booleans(),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzz_never_crashes(values, dtype, n, replace, logits, seed):
    with np.errstate(all="ignore"):
        attention = values.astype(dtype) if dtype != np.int64 else np.nan_to_num(values).astype(dtype)
    try:
        indices, probs = atskern.sample(attention, n, replace=replace, logits=logits, seed=seed)
    except (ValueError, TypeError) as error:
        assert "attention" in str(error) or "n" in str(error)
        return
    rows, grid = attention.shape[0], attention.shape[1:]
    assert indices.shape == (rows, n, len(grid)) and probs.shape == (rows, n)
    assert (indices >= 0).all() and (indices < np.array(grid)).all()
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    assert (probs[:, 0] > 0).all(), "a row's first draw is always a positive cell"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("row", [[1.0, -1.0], [0.5, -0.5, 0.0]])
def test_negative_weights_summing_to_zero_are_refused_not_divided_by(dtype, replace, row):
    """A row whose negative weights cancel its positive ones (total exactly 0) gets the negative-weights error,
    and with validate=False in-range draws of probability 0 (the kernel divided by the zero total)."""
    attention = np.array([row, [1.0] * len(row)], dtype)
    with pytest.raises(ValueError, match="attention row 0 has 1 negative weights"):
        atskern.sample(attention, 1, seed=1, replace=replace)
    indices, probs = atskern.sample(attention, 1, seed=1, replace=replace, validate=False)
    assert 0 <= indices[0, 0, 0] < len(row) and probs[0, 0] == 0.0 and probs[1, 0] > 0.0


def test_strict_counts_the_weights_as_given_and_logits_after_exp():
    """strict counts a row's positive weights as given: a float64 row spanning more than the format's range has
    2 of them although its 1e-300 underflows after the rescaling by the largest weight's exponent; that cell is
    drawn second as a filler (probability 0 in float64: the underflow rule), as for float32 weights whose
    probability underflows. Logits count after exp(l - max): the strict error says so."""
    for attention in (np.array([[1e300, 1e-300, 0.0]]), np.array([[1e30, 1e-30, 0.0]], np.float32)):
        indices, probs, status = atskern.sample(attention, 2, strict=True, seed=5, return_status=True)
        assert status[0, v.STATUS_POSITIVE] == 2 and indices[0, :, 0].tolist() == [0, 1]
        assert probs[0, 0] == 1.0 and probs[0, 1] == 0.0
        with pytest.raises(ValueError, match=r"only 2 positive weights, fewer than n=3; "):
            atskern.sample(attention, 3, strict=True)
    with pytest.raises(ValueError, match=r"only 1 positive weights, fewer than n=2 \(a logit whose weight underflows"):
        atskern.sample(np.array([[0.0, -800.0, -np.inf]]), 2, strict=True, logits=True)


@pytest.mark.parametrize("replace", [False, True])
def test_a_rescaled_row_keeps_the_status_of_its_weights_as_given(replace):
    """A float64 row outside the scale-free exponents with negative weights (its largest weight 1e-320): the
    rescaling by 2**1064 turns -1 into -inf, but the status and the message are the row's as given (negative
    weights, no NaN or inf), as on the GPU; a row of 1e300 next to 1e-30 keeps its two positive weights."""
    attention = np.array([[0.0, -1.0, 1e-320, 1e-320], [1e300, 1e300, 1e-30, 0.0], [1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match="attention row 0 has 1 negative weights"):
        atskern.sample(attention, 2, seed=1, replace=replace)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rescaling's overflow of the refused row's -1 stays silent
        _, probs, status = atskern.sample(attention, 2, seed=1, replace=replace, validate=False, return_status=True)
    assert status[:-1, :3].tolist() == [[0, 1, 2], [0, 0, 3], [0, 0, 4]]
    assert status[-1, v.STATUS_EXPONENT] == 2  # rows 0 and 1 lie outside the scale-free exponents
    assert (probs[0] == 0).all() and (probs[1:, 0] > 0).all()
