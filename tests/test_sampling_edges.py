"""Edge semantics of atskern.sample (issue 11): many rows, fillers (R1), underflowing probs (R2),
scale-free weights, coordinates by division (R4), and the messages for inputs it refuses."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

import atskern
from atskern import reference
from atskern._validation import SCALE_FREE_EXPONENTS

from .conftest import to_backend, to_numpy


def _sample(backend, attention, n, **kwargs):
    indices, probs = atskern.sample(to_backend(attention, backend), n, **kwargs)
    return to_numpy(indices), to_numpy(probs)


def _flat(indices, grid):
    """Row-major flat positions from coordinates, computed independently of atskern."""
    flat = np.zeros(indices.shape[:-1], np.int64)
    for d, size in enumerate(grid):
        flat = flat * size + indices[..., d]
    return flat


def _fits(counts, expected_probs):
    """Every cell within 4.5 standard errors and the chi-square test not rejected at 1e-4."""
    trials = counts.sum()
    expected = expected_probs * trials
    z = (counts - expected) / np.sqrt(expected * (1 - expected_probs))
    assert np.abs(z).max() < 4.5, f"z-scores {np.round(z, 2)}"
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, counts.size - 1) > 1e-4


# --- item 1: many rows, n = 1, every path ------------------------------------------------

MANY = 20_000
PATHS = [
    pytest.param({"replace": False}, id="without"),
    pytest.param({"replace": True}, id="with"),
    pytest.param({"replace": False, "logits": True}, id="logits-without"),
    pytest.param({"replace": True, "logits": True}, id="logits-with"),
]


def test_issue_reproduction_many_rows(backend):
    a = np.tile([1.0, 2.0, 3.0], (20000, 1))
    idx, probs = _sample(backend, a, 1, seed=123)
    disagree = probs[:, 0] != np.array([1.0, 2.0, 3.0])[idx[:, 0, 0]] / 6.0
    assert disagree.sum() == 0, f"{disagree.sum()} of 20000 rows disagree with their own probs"


@pytest.mark.parametrize("kwargs", PATHS)
@pytest.mark.parametrize("grid", [(3,), (2, 3)])
def test_many_rows_n1_every_path(backend, kwargs, grid):
    """Each drawn cell's prob equals its weight / row sum, and the draws of the rows past 8192
    follow the weights (chi-square in standard-error units); the reference agrees."""
    w = np.arange(1.0, 1.0 + np.prod(grid)).reshape(grid)
    attention = np.tile(np.log(w) if kwargs.get("logits") else w, (MANY,) + (1,) * len(grid))
    indices, probs = _sample(backend, attention, 1, seed=9, **kwargs)
    assert (indices >= 0).all() and (indices < np.array(grid)).all()
    flat = _flat(indices, grid)[:, 0]
    expected = w.ravel() / w.sum()
    np.testing.assert_allclose(probs[:, 0], expected[flat], rtol=1e-12)
    _fits(np.bincount(flat[8192:], minlength=w.size), expected)
    want_i, want_p = reference.sample(attention, 1, seed=9, **kwargs)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(probs, want_p, rtol=1e-12)


def test_reference_many_rows_against_direct_computation():
    """The oracle itself: coordinates by division, checked against a direct flat-index formula."""
    attention = np.tile(np.arange(1.0, 7.0).reshape(2, 3), (MANY, 1, 1))
    indices, probs = reference.sample(attention, 1, seed=4)
    flat = _flat(indices, (2, 3))[:, 0]
    np.testing.assert_allclose(probs[:, 0], (flat + 1.0) / 21.0, rtol=1e-12)
    _fits(np.bincount(flat[8192:], minlength=6), np.arange(1.0, 7.0) / 21.0)


# --- R1: fillers for short rows ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_draw_positives_then_fillers(backend, dtype):
    a = np.array([[0.0, 0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype)
    for seed in range(20):
        indices, probs = _sample(backend, a, 4, seed=seed)
        assert set(indices[0, :2, 0]) == {2, 4}
        np.testing.assert_array_equal(indices[0, 2:, 0], [0, 1])
        np.testing.assert_array_equal(indices[1, :, 0], [0, 1, 2, 3])
        assert len(set(indices[2, :, 0])) == 4
        np.testing.assert_allclose(probs[0, :2], a[0, indices[0, :2, 0]] / 3.0, rtol=1e-6)
        np.testing.assert_array_equal(probs[0, 2:], 0.0)
        np.testing.assert_array_equal(probs[1], [1.0, 0.0, 0.0, 0.0])
        want_i, want_p = reference.sample(a, 4, seed=seed)
        np.testing.assert_array_equal(indices, want_i)
        np.testing.assert_allclose(probs, want_p, rtol=1e-6)


def test_short_rows_positive_order_follows_successive_sampling(backend):
    """The positive cells of a short row come in successive-sampling order (first draw ~ weights)."""
    a = np.tile([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], (20_000, 1))
    indices, probs = _sample(backend, a, 5, seed=1)
    _fits(np.bincount(indices[:, 0, 0], minlength=6)[[1, 3, 4]], np.array([0.2, 0.5, 0.3]))
    np.testing.assert_array_equal(indices[:, 3:, 0], np.tile([0, 2], (20_000, 1)))
    assert (probs[:, 3:] == 0).all() and (probs[:, :3] > 0).all()


def test_short_rows_in_a_large_chunked_row(backend):
    a = np.zeros((2, 70_000))
    a[0, [65_000, 5, 40_000]] = [1.0, 2.0, 3.0]
    a[1, ::7] = 1.0
    indices, probs = _sample(backend, a, 6, seed=3)
    assert sorted(indices[0, :3, 0]) == [5, 40_000, 65_000]
    np.testing.assert_array_equal(indices[0, 3:, 0], [0, 1, 2])
    want, _ = reference.sample(a, 6, seed=3)
    np.testing.assert_array_equal(indices, want)


def test_strict_keeps_the_error(backend):
    a = np.random.default_rng(0).random((2, 5, 5)) + 0.1
    a[1].ravel()[3:] = 0.0
    with pytest.raises(ValueError, match="attention row 1 has only 3 positive weights, fewer than n=4"):
        atskern.sample(to_backend(a, backend), 4, strict=True)
    indices, _ = _sample(backend, a, 4, strict=True, replace=True, seed=0)
    assert indices.shape == (2, 4, 2)
    with pytest.raises(TypeError, match="strict must be True or False"):
        atskern.sample(a, 1, strict="yes")


def test_no_positive_weight_is_still_an_error(backend):
    a = np.ones((2, 4))
    a[1] = 0
    with pytest.raises(ValueError, match="attention row 1 has no positive weight"):
        atskern.sample(to_backend(a, backend), 2)


# --- R2: probabilities that the dtype cannot hold ---------------------------------------


def test_issue_reproduction_float32_logits_underflow(backend):
    attention = np.array([[0, -200, 0]], np.float32)
    indices, probs = _sample(backend, attention, 3, logits=True, seed=0)
    assert probs.dtype == np.float32
    np.testing.assert_array_equal(indices[0, 2], [1])
    np.testing.assert_array_equal(probs, [[0.5, 0.5, 0.0]])
    features = np.array([[[1.0], [2.0], [1e6]]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate = atskern.expectation(features, probs)
        grad_probs, grad_features = atskern.expectation_grad(np.ones((1, 1), np.float32), features, probs)
    # the filler (probability 0 in float32) contributes nothing: the estimate of the two 0.5 cells
    want = reference.expectation(features.astype(np.float64), probs.astype(np.float64))
    np.testing.assert_allclose(estimate, want, rtol=1e-6)
    other = features.copy()
    other[0, 2] = -7.0
    np.testing.assert_array_equal(atskern.expectation(other, probs), estimate)
    assert np.isfinite(grad_probs).all() and np.isfinite(grad_features).all()
    assert grad_probs[0, 2] == 0 and grad_features[0, 2, 0] == 0


# --- item 3: scale-free weights ------------------------------------------------------------


def test_issue_reproduction_tiny_float64_weights(backend):
    a = np.tile(np.array([1.0, 2.0, 3.0]) * 1e-320, (20_000, 1))
    indices, probs = _sample(backend, a, 1, seed=5)
    counts = np.bincount(indices[:, 0, 0], minlength=3)
    _fits(counts, np.array([1.0, 2.0, 3.0]) / 6.0)
    np.testing.assert_allclose(probs[:, 0], (indices[:, 0, 0] + 1.0) / 6.0, rtol=1e-12)


@pytest.mark.parametrize("replace", [False, True])
def test_draws_do_not_depend_on_the_scale(backend, replace):
    """Rows times any power of two, subnormal to past float64's sum overflow, draw exactly the same."""
    base = np.random.default_rng(2).uniform(0.1, 1.0, size=(1, 50))
    exponents = [-1018, -600, -100, SCALE_FREE_EXPONENTS[0] - 2, SCALE_FREE_EXPONENTS[0] - 1, 0,
                 SCALE_FREE_EXPONENTS[1], SCALE_FREE_EXPONENTS[1] + 1, 500, 1000, 1020]
    rows = np.concatenate([np.ldexp(base, e) for e in exponents])
    with np.errstate(over="ignore"):
        assert not np.isfinite(rows[-1].sum()), "the last row's float64 sum overflows"
    batch = np.tile(base, (len(exponents), 1))
    want_i, want_p = _sample(backend, batch, 7, replace=replace, seed=11)
    got_i, got_p = _sample(backend, rows, 7, replace=replace, seed=11)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_p, want_p, rtol=1e-15)
    ref_i, ref_p = reference.sample(rows, 7, replace=replace, seed=11)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_p, ref_p, rtol=1e-12)


def test_float32_subnormal_and_huge_weights(backend):
    tiny = (np.array([1.0, 2.0, 3.0]) * 2.0**-149).astype(np.float32)
    huge = (np.array([1.0, 2.0, 3.0]) * 2.0**126).astype(np.float32)
    for row in (tiny, huge):
        indices, probs = _sample(backend, np.tile(row, (20_000, 1)), 2, seed=6)
        _fits(np.bincount(indices[:, 0, 0], minlength=3), np.array([1.0, 2.0, 3.0]) / 6.0)
        np.testing.assert_allclose(probs[:, 0], (indices[:, 0, 0] + 1.0) / 6.0, rtol=1e-6)


def test_mixed_scales_in_one_row():
    """Cells far below the largest keep their exact probability; none is lost or duplicated."""
    a = np.array([[1e300, 1e-300, 1.0, 1e-320, 0.0]])
    indices, probs = atskern.sample(a, 5, seed=1)
    assert sorted(indices[0, :, 0]) == [0, 1, 2, 3, 4]
    assert indices[0, 0, 0] == 0 and probs[0, 0] == 1.0
    want_i, want_p = reference.sample(a, 5, seed=1)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_array_equal(probs, want_p)


# --- item 5 and 10: inputs refused or converted ---------------------------------------------


def test_masked_array_is_refused():
    a = np.ma.masked_array(np.ones((2, 4)), mask=[[0, 1, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(TypeError, match=r"masked array.*attention\.filled\(0\)"):
        atskern.sample(a, 2)


def test_big_endian_attention_is_accepted(backend):
    native = np.random.default_rng(0).random((3, 6, 7)).astype(np.float32)
    swapped = native.astype(">f4")
    if backend == "gpu":
        pytest.skip("CuPy has no non-native byte order")
    got_i, got_p = atskern.sample(swapped, 5, seed=2)
    want_i, want_p = atskern.sample(native, 5, seed=2)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_p, want_p)
    assert got_p.dtype == np.float32 and got_p.dtype.isnative
    with pytest.raises(TypeError, match="attention must be float32 or float64, got >i4"):
        atskern.sample(native.astype(">i4"), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("replace", [False, True])
def test_misaligned_attention_draws_as_an_aligned_copy(dtype, replace):
    """Attention one byte past an aligned address (a byte buffer viewed as floats: no element at a multiple of its
    size), contiguous or strided: the draws and probabilities of an aligned copy."""
    attention = np.random.default_rng(8).random((3, 17, 19)).astype(dtype) + 0.01
    raw = np.zeros(attention.nbytes + 1, np.uint8)
    raw[1:] = attention.view(np.uint8).reshape(-1)
    shifted = raw[1:].view(dtype).reshape(attention.shape)
    assert not shifted.flags.aligned
    for view, same in [(shifted, attention), (shifted[:, ::-2], attention[:, ::-2])]:
        want = atskern.sample(np.ascontiguousarray(same), 6, replace=replace, seed=21)
        got = atskern.sample(view, 6, replace=replace, seed=21)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_torch_tensors_get_a_clear_type_error():
    torch = pytest.importorskip("torch")
    t = torch.rand(2, 5)
    with pytest.raises(TypeError, match=r"attention must be a NumPy or CuPy array, got a torch\.Tensor; convert it"):
        atskern.sample(t, 2)
    with pytest.raises(TypeError, match=r"probs must be a NumPy or CuPy array, got a torch\.Tensor"):
        atskern.expectation(np.ones((2, 1, 3)), torch.ones(2, 1))
    with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array, got a torch\.Tensor"):
        atskern.extract_patches(torch.ones(1, 4, 4, 1), np.zeros((1, 1, 2), np.int32), 2)


def test_array_like_objects_get_a_clear_type_error():
    class ArrayLike:
        shape = (2, 3)
        dtype = "float32"

        def __array__(self, dtype=None, copy=None):
            return np.ones((2, 3), np.float32)

    with pytest.raises(TypeError, match=r"attention must be a NumPy or CuPy array, got a .*ArrayLike; convert it"):
        atskern.sample(ArrayLike(), 1)


def test_huge_n_with_replacement_is_a_value_error():
    with pytest.raises(ValueError, match=r"n=1000000000000 draws per row need .* GiB"):
        atskern.sample(np.ones((2, 3)), 10**12, replace=True)
    with pytest.raises(ValueError, match=r"n=\d+ draws per row need"):
        atskern.sample(np.ones((1, 3)), 2**62, replace=True)
