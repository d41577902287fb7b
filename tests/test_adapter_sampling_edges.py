"""Sampling at the edges of floating point on the XLA-native front ends (``ats.tf.xla``, ``ats.ops`` under
``jit_compile``, ``ats.jax``) and in the Keras TensorFlow backend's key: rows near the float64 limits draw what
atskern draws, -0.0 ties +0.0 in top-k, a logit whose weight underflows counts as zero under ``strict``, and a
float64 map's fingerprint rounds to float32 subnormals as NumPy does."""

from __future__ import annotations

import numpy as np
import pytest

import atskern

tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
pytest.importorskip("keras")

import jax.numpy as jnp  # noqa: E402

from ats import jax as ajax  # noqa: E402
from ats import ops  # noqa: E402
from ats.keras import _keys  # noqa: E402
from ats.tf import xla  # noqa: E402

EXTREME_ROWS = np.array([
    [1e308, 1.5e308, 5e307, 1e307, 0.0, 1.7e308],  # the row's sum overflows float64
    [3e-308, 2.3e-308, 2.5e-308, 5e-308, 4e-308, 0.0],  # normal (TF flushes subnormals), keys overflow
    [1e-300, 1e300, 0.0, 1e-300, 1.0, 1e290],
])


@pytest.mark.parametrize("replace", [False, True])
def test_tf_xla_draws_rows_near_the_float64_limits_as_atskern(replace):
    attention = np.repeat(EXTREME_ROWS, 40, axis=0)  # 40 draws of each row under one key
    for seed in (12345, 777):
        want_idx, want_probs = atskern.sample(attention, 3, replace=replace, seed=seed)
        got_idx, got_probs = xla.sample_indices(tf.constant(attention), 3, seed, replace=replace)
        np.testing.assert_array_equal(got_idx.numpy(), want_idx)
        np.testing.assert_allclose(got_probs.numpy(), want_probs, rtol=1e-14)
        jitted = tf.function(lambda a: ops.sample(a, 3, replace=replace, seed=seed), jit_compile=True)
        got_idx, sampled = jitted(tf.constant(attention))
        np.testing.assert_array_equal(got_idx.numpy(), want_idx)
        np.testing.assert_allclose(sampled.numpy(), want_probs, rtol=1e-14)
        _, sampled = xla.sample(tf.constant(attention), 3, seed, replace=replace)
        np.testing.assert_allclose(sampled.numpy(), want_probs, rtol=1e-14)


@pytest.mark.parametrize("row", [[3e-310, 1e-310, 2e-310], [0.0, 4e-320, 0.0]])
def test_tf_xla_refuses_rows_whose_largest_weight_is_subnormal(row):
    with pytest.raises(ValueError, match="attention row 0: its largest weight .* is subnormal in float64"):
        xla.sample_indices(tf.constant(np.array([row])), 1, 3)  # from NumPy: a Python list's floats are flushed
    float32 = np.array([[3.0, 1.0, 2.0]], np.float32) * np.float32(2.0**-140)
    with pytest.raises(ValueError, match="is subnormal in float32"):
        xla.sample_indices(tf.constant(float32), 1, 3)


def test_top_k_ties_negative_zero_with_zero_on_every_path():
    row = np.array([[1.0, -0.0, 0.0, 0.0, 2.0]], np.float32)
    want = [[4, 0, 1]]  # ties to the lower position, -0.0 == 0.0
    grid = lambda idx: np.asarray(idx)[..., 0].tolist()  # noqa: E731
    got = {
        "ats.ops eager": ops.sample(tf.constant(row), 3, deterministic=True)[0],
        "ats.ops jit_compile": tf.function(lambda a: ops.sample(a, 3, deterministic=True)[0], jit_compile=True)(
            tf.constant(row)),
        "ats.tf.xla jit_compile": tf.function(lambda a: xla.sample(a, 3, deterministic=True)[0], jit_compile=True)(
            tf.constant(row)),
        "ats.jax eager": ajax.sample(jnp.asarray(row), 3, deterministic=True)[0],
        "ats.jax jit": jax.jit(lambda a: ajax.sample(a, 3, deterministic=True)[0])(jnp.asarray(row)),
    }
    for name, indices in got.items():
        assert grid(indices) == want, name


def test_strict_counts_a_logit_whose_weight_underflows_as_zero_on_the_xla_paths():
    logits = np.array([[0.0, -800.0, -np.inf, -900.0]])  # exp(l - max) > 0 for one cell only
    with pytest.raises(ValueError, match="has only 1 positive weights, fewer than n"):
        atskern.sample(logits, 2, logits=True, strict=True, seed=1)
    calls = {
        "ats.tf.xla": lambda: xla.sample_indices(tf.constant(logits), 2, 1, logits=True, strict=True),
        "ats.jax xla": lambda: ajax.sample_indices(jnp.asarray(logits), 2, logits=True, strict=True, key=1, path="xla"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="has only 1 positive weights"):
            call()
            pytest.fail(name)


def test_the_tensorflow_fingerprint_of_float64_maps_rounds_subnormals_as_numpy():
    from ats.keras.backends import tensorflow as backend

    rng = np.random.default_rng(0)
    attention = rng.random((2, 6, 6))
    attention[:, :3] *= 1e-40  # float32 subnormals once rounded, the smallest 2**-149 and below
    attention[0, 0, :2] = [2.0**-150, 3 * 2.0**-150]  # half-way cases: to even (0 and 2 * 2**-149)
    attention[1, 0, 0] = 2.0**-126 * (1 - 2.0**-30)  # rounds up to float32's smallest normal number
    want = _keys.fingerprint(attention)
    eager = backend.fingerprint(tf.constant(attention)).numpy()
    jitted = tf.function(backend.fingerprint, jit_compile=True)(tf.constant(attention)).numpy()
    assert tuple(int(w) for w in eager) == want
    assert tuple(int(w) for w in jitted) == want


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tf_xla_draws_sixteen_bit_maps_whose_cells_are_subnormal_in_their_dtype(dtype):
    """A float16 softmax over 65536 cells is 1.5e-5 everywhere, subnormal in float16 but normal once cast to
    float64 (which TensorFlow does not flush): drawn as atskern draws it, not refused."""
    attention = np.full((2, 256, 256), 1.0 / 65536, np.float32)
    attention[1, 3, :] *= 2
    tensor = tf.cast(tf.constant(attention), getattr(tf, dtype))
    want, _ = atskern.sample(tensor.numpy().astype(np.float32), 4, seed=7)
    got, _ = xla.sample_indices(tensor, 4, 7)
    np.testing.assert_array_equal(got.numpy(), want)
    got, _ = xla.sample(tensor, 4, 7)
    np.testing.assert_array_equal(got.numpy(), want)


def test_keras_tensorflow_top_indices_ties_negative_zero_under_jit():
    from ats.keras.backends import tensorflow as backend

    row = tf.constant([[1.0, -0.0, 0.0, 0.0, 2.0]])
    jitted = tf.function(lambda r: backend.top_indices(r, 3), jit_compile=True)
    assert jitted(row).numpy().tolist() == [[4, 0, 1]]


@pytest.mark.parametrize("replace", [False, True])
def test_rows_near_the_float64_limit_in_a_plain_tf_function(replace):
    """Not compiled by XLA, a tf.function is rewritten by Grappler, which regrouped the row scaling
    ``rows * 2**-h * 2**(h-e)`` as ``rows * 2**-e``: for a largest weight of 2**1023 and more that factor is
    subnormal and TF flushed it, so the rows drew in position order with NaN probabilities."""
    rows = np.array([[1.7e308, 1.0e308, 0.5e308, 1.2e308, 0.9e308, 0.1e308],
                     [9e307, 3e307, 1e300, 0.0, 8e307, 2e307]])
    want_i, want_p = atskern.sample(rows, 3, seed=7, replace=replace)
    got_i, got_p = tf.function(lambda t: xla.sample_indices(t, 3, 7, replace=replace))(tf.constant(rows))
    np.testing.assert_array_equal(got_i.numpy(), want_i)
    np.testing.assert_allclose(got_p.numpy(), want_p, rtol=1e-12)
    _, sampled = tf.function(lambda t: ops.sample(t, 3, seed=7, replace=replace))(tf.constant(rows))
    np.testing.assert_allclose(sampled.numpy(), want_p, rtol=1e-12)
