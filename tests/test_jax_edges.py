"""ats.jax at the edges: empty batches on both paths, a NaN fill, rows its XLA normalization cannot hold."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import atskern  # noqa: E402
from ats import jax as aj  # noqa: E402
from ats.jax import functional  # noqa: E402


def test_the_estimator_and_its_gradients_take_an_empty_batch():
    features, probs = jnp.ones((0, 3, 4)), jnp.full((0, 3), 0.1)
    assert aj.expectation(features, probs).shape == (0, 4)
    assert jax.grad(lambda p: aj.expectation(features, p).sum())(probs).shape == (0, 3)
    assert jax.jit(jax.grad(lambda p: aj.expectation(features, p).sum()))(probs).shape == (0, 3)
    grad_probs, grad_features = aj.expectation_grad(jnp.ones((0, 4)), features, probs)
    assert grad_probs.shape == (0, 3) and grad_features.shape == (0, 3, 4)
    empty = jnp.ones((2, 3, 0))  # no feature entries: the attention gradient is 0
    np.testing.assert_array_equal(jax.grad(lambda p: aj.expectation(empty, p).sum())(jnp.full((2, 3), 0.1)), 0)


@pytest.mark.parametrize("path", ["kernel", "xla"])
@pytest.mark.parametrize("jit", [False, True])
def test_patches_of_an_empty_batch_or_none_per_image_on_both_paths(path, jit):
    """Both paths give empty patches and a zero image gradient (the kernel path called atskern, which refuses
    empty arrays: eagerly for B=0, inside the gradient's callback for K=0)."""
    run = jax.jit if jit else (lambda f: f)
    x0, o0 = jnp.ones((0, 8, 8, 2)), jnp.zeros((0, 3, 2), jnp.int32)
    assert run(lambda x, o: aj.extract_patches(x, o, 3, path=path))(x0, o0).shape == (0, 3, 3, 3, 2)
    x, none = jnp.ones((2, 8, 8, 2)), jnp.zeros((2, 0, 2), jnp.int32)
    assert run(lambda x, o: aj.extract_patches(x, o, 3, path=path))(x, none).shape == (2, 0, 3, 3, 2)
    grad = run(jax.grad(lambda x: aj.extract_patches(x, none, 3, path=path).sum()))(x)
    assert grad.shape == x.shape and not np.asarray(grad).any()


def test_a_nan_fill_compiles_once():
    """fill is a static argument of the compiled gather, and NaN != NaN: every eager call compiled anew."""
    x, offsets = jnp.ones((1, 6, 6, 1)), jnp.array([[[-2, 4]]], jnp.int32)
    before = functional._extract._cache_size()
    for _ in range(4):
        patch = aj.extract_patches(x, offsets, 3, fill=float("nan"), path="xla")
    assert functional._extract._cache_size() - before <= 1
    assert np.isnan(np.asarray(patch)[0, 0, :2]).all() and np.isnan(np.asarray(patch)[0, 0, :, 2]).all()
    np.testing.assert_array_equal(np.asarray(patch)[0, 0, 2:, :2], 1)


@pytest.mark.parametrize("path", ["kernel", "xla"])
def test_sample_refuses_a_row_its_normalization_cannot_hold(path):
    """A row whose largest weight is subnormal: the kernel path draws it exactly, but sample()'s sampled attention
    is XLA's weight / sum, which read it as 0 / 0 and returned NaN with validation on."""
    rows = np.array([[0.3, 0.2, 0.4, 0.1], [1e-39, 2e-39, 4e-39, 3e-39]], np.float32)
    with pytest.raises(ValueError, match="attention row 1: its largest weight 4e-39 is subnormal in float32"):
        aj.sample(rows, 2, key=0, path=path)
    indices, _ = aj.sample_indices(rows, 2, 0, path="kernel")  # the draw itself is exact
    assert np.asarray(indices).shape == (2, 2, 1)
    _, sampled = aj.sample(rows[:1], 2, key=0, path=path)
    assert np.isfinite(np.asarray(sampled)).all()


def test_x64_refuses_a_float32_row_xla_reads_as_empty():
    """With x64 on, the XLA path computes in float64, where float32 subnormals are normal numbers, so such a row
    passed the check; XLA's float32-to-float64 cast reads them as 0: cells in position order, NaN probabilities,
    and with replacement only the last cell (weight 0)."""
    rows = np.array([[1, 2, 3, 4, 0]], np.float32) * np.float32(2.0**-149)
    with jax.enable_x64():
        for call in (lambda: aj.sample_indices(jnp.asarray(rows), 3, 0, path="xla"),
                     lambda: aj.sample_indices(jnp.asarray(rows), 4, 0, replace=True, path="xla"),
                     lambda: aj.sample(jnp.asarray(rows), 3, key=0, path="xla")):
            with pytest.raises(ValueError, match="attention row 0: its largest weight .* is subnormal in float32"):
                call()
        wide = np.array([[1e-39, 3e-39]], np.float64)  # normal in float64: drawn as atskern draws it
        indices, probs = aj.sample_indices(jnp.asarray(wide), 1, 4, path="xla")
        np.testing.assert_allclose(np.asarray(probs), atskern.sample(wide, 1, seed=4)[1], rtol=1e-12)


def test_export_with_a_symbolic_batch_size():
    """jax.export (and Keras' model.export on JAX) leaves the batch symbolic: the XLA path's shape checks called
    int() on it, and the patch gradient built its offsets' float0 zeros from the shape."""
    from jax import export

    def patches(a, x, key):
        cells, probs = aj.sample(a, 3, key=key, path="xla")
        return aj.extract_patches(x, aj.patch_offsets(cells, (8, 8), (32, 32), 4), 4, path="xla"), probs

    def image_gradient(a, x, key):
        return jax.grad(lambda x: (patches(a, x, key)[0] ** 2).sum())(x)

    def with_replacement(a, x, key):  # the double-float sum tree over rows of a symbolic count
        return aj.sample(a, 5, key=key, replace=True, path="xla")

    (batch,) = export.symbolic_shape("batch")
    shapes = (jax.ShapeDtypeStruct((batch, 8, 8), jnp.float32), jax.ShapeDtypeStruct((batch, 32, 32, 1), jnp.float32),
              jax.ShapeDtypeStruct((2,), jnp.uint32))
    rng = np.random.default_rng(5)
    args = (rng.random((5, 8, 8), np.float32), rng.random((5, 32, 32, 1), np.float32), np.array([1, 2], np.uint32))
    for function in (patches, image_gradient, with_replacement):
        exported = export.export(jax.jit(function))(*shapes)
        for got, want in zip(jax.tree.leaves(exported.call(*args)), jax.tree.leaves(jax.jit(function)(*args))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_small_cells_of_a_long_row_are_drawn_at_their_rate_without_x64():
    """With replacement, the XLA path without x64 inverted a float32 running sum: over 2**20 cells (one of weight 1,
    the others 2**-26, an eighth of the sum's ulp) its small cells were drawn only at indices 3 and 4 modulo 8
    (1504 and 1543 of 200,000 draws, none elsewhere). The double-float running sum draws each residue class at
    its rate (about 385; 361 to 395 drawn) and every draw as atskern does."""
    row = np.full((1, 1 << 20), 2.0**-26, np.float32)
    row[0, 0] = 1
    n = 200_000
    flat = np.asarray(aj.sample_indices(row, n, 3, replace=True, path="xla")[0])[0, :, 0]
    share = float(np.sum(row[0, 1:], dtype=np.float64) / np.sum(row, dtype=np.float64)) / 8
    counts = np.bincount(flat[flat > 0] % 8, minlength=8)
    z = (counts - n * share) / np.sqrt(n * share * (1 - share))
    assert np.abs(z).max() < 4, counts
    np.testing.assert_array_equal(flat, atskern.sample(row, n, replace=True, seed=3)[0][0, :, 0])


def test_float32_draws_with_replacement_equal_atskern():
    """x64 off: the double-float running sums and targets differ from atskern's float64 ones by about 2**-46 of
    the row's sum, so a draw can differ only where its target lies that close to a step (measured: none of
    648,000 draws at 2**12 to 2**20 cells). Allowed here: 1 in 100,000."""
    rng = np.random.default_rng(11)
    for rows, size in ((64, 1 << 12), (8, 1 << 16)):
        logits = rng.standard_normal((rows, size)) * 2
        attention = np.exp(logits - logits.max(axis=1, keepdims=True)).astype(np.float32)
        attention[:, rng.random(size) < 0.1] = 0  # zero cells are never drawn
        got = np.asarray(aj.sample_indices(attention, 1000, 5, replace=True, path="xla")[0])
        want = atskern.sample(attention, 1000, replace=True, seed=5)[0]
        assert np.count_nonzero(got != want) <= rows * 1000 // 100_000, (size, np.count_nonzero(got != want))


def test_estimator_without_x64_keeps_the_mass_left_of_late_draws():
    """x64 off: ``pm_k = 1 - sum_{j<k} a_j`` was a float32 difference, so the last draw of a peaked row (probability
    1.1e-8, about 6e-7 of mass left) got an attention gradient of 0.125 for atskern's 6.585 (ats.torch, ats.tf.xla
    and the other Keras backends agree with atskern). The double-float running sums give atskern's gradients to
    float32 precision, on late draws of random peaked rows too."""
    probs = np.array([[0.1788238286972046, 0.441189706325531, 0.08380994945764542, 0.04159441590309143,
                       0.084211565554142, 0.03532977029681206, 0.13504016399383545, 1.1385423270837691e-08]], np.float32)
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((64, 40)) * 6
    weights = np.exp(logits - logits.max(axis=1, keepdims=True)).astype(np.float32)
    drawn = atskern.sample(weights, 30, seed=9)[1].astype(np.float32)  # down to the rows' smallest cells
    for p in (probs, drawn):
        features = (rng.random(p.shape + (3,)) + 0.5).astype(np.float32)  # positive: no cancellation in <g, f>
        grad = (rng.random((p.shape[0], 3)) + 0.5).astype(np.float32)
        want_p, want_f = atskern.expectation_grad(grad, features, p)
        got_p, got_f = aj.expectation_grad(jnp.asarray(grad), jnp.asarray(features), jnp.asarray(p))
        np.testing.assert_allclose(np.asarray(got_p), want_p, rtol=2e-5, atol=1e-30)
        np.testing.assert_allclose(np.asarray(got_f), want_f, rtol=2e-5, atol=1e-6)
        value = aj.expectation(jnp.asarray(features), jnp.asarray(p))
        np.testing.assert_allclose(np.asarray(value), atskern.expectation(features, p), rtol=2e-5, atol=1e-6)
