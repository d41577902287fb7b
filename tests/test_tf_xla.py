"""ats.tf.xla: atskern's draws, patches and estimator in plain TensorFlow ops, eager and under jit_compile=True."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import atskern  # noqa: E402
from ats import _xla_philox as px  # noqa: E402
from ats.tf import xla  # noqa: E402
from atskern import _rng as np_rng  # noqa: E402
from atskern import reference  # noqa: E402

from .test_rng import KAT  # noqa: E402

MODES = ["eager", "function", "jit"]


def _run(mode, fn, *args):
    """``fn(*args)`` eagerly, in a ``tf.function`` or in one compiled with XLA (TF Addons' habit)."""
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=mode == "jit", autograph=False)(*args)


def _flat(indices, grid):
    flat = np.zeros(indices.shape[:-1], np.int64)
    for d, size in enumerate(grid):
        flat = flat * size + indices[..., d]
    return flat


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    const = [tf.constant(c, tf.uint32) for c in (*counter, *key)]
    assert tuple(int(w) for w in px.philox4x32(xla.OPS, *const)) == expected


def test_uniforms_are_atskerns():
    seed = 0xDEADBEEF12345678
    k0, k1 = xla.seed_words(seed)
    u = _run("jit", lambda: xla.position_uniforms(3, 37, k0, k1)).numpy()
    r = xla.replacement_uniforms(3, 9, k0, k1).numpy()
    for row in range(3):
        np.testing.assert_array_equal(u[row], np_rng.position_uniforms(37, row, seed))
        np.testing.assert_array_equal(r[row], np_rng.replacement_uniforms(9, row, seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("replace", [False, True])
def test_draws_equal_atskern(mode, replace):
    rng = np.random.default_rng(0)
    for shape, seed in [((3, 40), 1), ((2, 6, 7), 2**40 + 5), ((2, 3, 4, 5), 7)]:
        attention = (rng.random(shape) ** 3).astype(np.float32)
        indices, probs = _run(mode, lambda a: xla.sample_indices(a, 6, seed, replace=replace), tf.constant(attention))
        want_indices, want_probs = atskern.sample(attention, 6, seed=seed, replace=replace)
        np.testing.assert_array_equal(indices.numpy(), want_indices)
        np.testing.assert_allclose(probs.numpy(), want_probs, rtol=1e-6)


def test_logits_and_a_seed_variable_under_jit():
    logits = np.random.default_rng(1).normal(size=(4, 5, 6)) * 4
    seed = tf.Variable(np.array([21, 0], np.uint32))
    draw = tf.function(lambda a: xla.sample_indices(a, 5, seed, logits=True), jit_compile=True, autograph=False)
    indices, probs = draw(tf.constant(logits))
    want_indices, want_probs = atskern.sample(logits, 5, seed=21, logits=True)
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_allclose(probs.numpy(), want_probs, rtol=1e-12)
    seed.assign(np.array([22, 0], np.uint32))
    np.testing.assert_array_equal(draw(tf.constant(logits))[0].numpy(), atskern.sample(logits, 5, seed=22, logits=True)[0])


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_short_rows_get_lowest_index_fillers(mode):
    attention = np.zeros((2, 12), np.float32)
    attention[0, [4, 9]] = [0.25, 0.75]
    attention[1] = np.linspace(0.1, 1, 12)
    indices, probs = _run(mode, lambda a: xla.sample_indices(a, 5, 3), tf.constant(attention))
    u = np_rng.position_uniforms(12, 0, 3)
    order = sorted([4, 9], key=lambda p: (-np.log(u[p]) / attention[0, p], p))
    assert indices.numpy()[0, :, 0].tolist() == order + [0, 1, 2]
    np.testing.assert_array_equal(probs.numpy()[0, 2:], 0)
    np.testing.assert_array_equal(indices.numpy(), reference.sample(attention, 5, seed=3)[0])
    if mode == "eager":
        with pytest.raises(ValueError, match="attention row 0 has only 2 positive weights"):
            xla.sample_indices(attention, 5, 3, strict=True)


def test_with_replacement_never_draws_zero_cells():
    attention = np.zeros((1, 300), np.float32)
    attention[0, 2::5] = 1
    indices, _ = _run("jit", lambda a: xla.sample_indices(a, 5000, 9, replace=True), tf.constant(attention))
    assert np.all(attention[0, indices.numpy()[0, :, 0]] > 0)


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("shape, patch", [((2, 20, 3), (5,)), ((2, 11, 9, 2), (4, 6)), ((1, 6, 5, 4, 2), (3, 2, 4))])
def test_patches_and_their_gradient_under_jit(shape, patch, channels_first):
    rng = np.random.default_rng(3)
    x = rng.integers(-8, 8, shape).astype(np.float32)
    if channels_first:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    spatial = shape[1:-1]
    offsets = rng.integers(-7, 14, (shape[0], 5, len(patch))).astype(np.int32)
    want = atskern.extract_patches(x, offsets, patch, fill=2, channels_first=channels_first)
    g = rng.integers(-8, 8, want.shape).astype(np.float32)

    def forward_and_grad(image, offs):
        with tf.GradientTape() as tape:
            tape.watch(image)
            patches = xla.extract_patches(image, offs, patch, fill=2, channels_first=channels_first)
            loss = tf.reduce_sum(patches * g)
        return patches, tape.gradient(loss, image)

    patches, grad = _run("jit", forward_and_grad, tf.constant(x), tf.constant(offsets))
    np.testing.assert_array_equal(patches.numpy(), want)
    scattered = atskern.scatter_patches(g, offsets, spatial, channels_first=channels_first)
    np.testing.assert_array_equal(grad.numpy(), scattered)
    np.testing.assert_array_equal(xla.scatter_patches(g, offsets, spatial, channels_first=channels_first).numpy(), scattered)
    zero_fill = xla.extract_patches(x, offsets, patch, channels_first=channels_first).numpy()
    assert np.sum(zero_fill.astype(np.float64) * g) == np.sum(x.astype(np.float64) * scattered)  # integers: exact


def test_patches_of_uint8_and_multiscale():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (2, 16, 16, 3)).astype(np.uint8)
    offsets = rng.integers(-4, 16, (2, 3, 2)).astype(np.int32)
    np.testing.assert_array_equal(xla.extract_patches(image, offsets, (5, 5), fill=9).numpy(), atskern.extract_patches(image, offsets, (5, 5), fill=9))
    levels = [rng.random((2, 32, 32, 1)).astype(np.float32), rng.random((2, 64, 64, 1)).astype(np.float32)]
    samples = rng.integers(0, 8, (2, 4, 2)).astype(np.int32)
    got = _run("jit", lambda a, b, s: xla.extract_multiscale([a, b], s, (8, 8), [(6, 6), (10, 10)]), *levels, samples)
    for a, b in zip(got, atskern.extract_multiscale(levels, samples, (8, 8), [(6, 6), (10, 10)])):
        np.testing.assert_array_equal(a.numpy(), b)
    np.testing.assert_array_equal(xla.patch_offsets(tf.constant([[[12, 0]]]), (25, 100), (1000, 1000), 50).numpy(), [[[475, -20]]])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("replace", [False, True])
def test_estimator_gradients_equal_atskern(mode, replace):
    rng = np.random.default_rng(5)
    attention = rng.random((3, 20)) + 0.05
    _, probs = atskern.sample(attention, 4, seed=1, replace=replace)
    probs = np.concatenate([probs, np.zeros((3, 1))], axis=1)  # a filler: weight and gradients 0 (R3)
    features = rng.standard_normal((3, 5, 2, 2))
    g = rng.standard_normal((3, 2, 2))

    def value_and_grads(f, a):
        with tf.GradientTape() as tape:
            tape.watch([f, a])
            value = xla.expectation(f, a, replace=replace)
        return (value, *tape.gradient(value, [f, a], output_gradients=tf.constant(g)))

    value, grad_features, grad_probs = _run(mode, value_and_grads, tf.constant(features), tf.constant(probs))
    # independent: DESIGN.md's formulas written out for n = 5 (the filler adds nothing to pm)
    positive = probs[:, :4]
    inner = np.einsum("bij,bkij->bk", g, features[:, :4])
    if replace:
        c = np.full((3, 4), 1 / 5)
        scale = 1 / (5 * positive)
    else:
        pm = 1 - (np.cumsum(positive, 1) - positive)
        c = (pm + np.arange(4, 0, -1) * positive) / 5
        scale = (pm / positive + np.arange(4, 0, -1)) / 5
    np.testing.assert_allclose(value.numpy(), np.einsum("bk,bkij->bij", c, features[:, :4]), rtol=1e-12)
    np.testing.assert_allclose(grad_probs.numpy()[:, :4], scale * inner, rtol=1e-12)
    np.testing.assert_allclose(grad_features.numpy()[:, :4], c[:, :, None, None] * g[:, None], rtol=1e-12)
    np.testing.assert_array_equal(grad_probs.numpy()[:, 4], 0)
    np.testing.assert_array_equal(grad_features.numpy()[:, 4], 0)
    if mode == "eager":  # and atskern itself, on the rows without the filler
        _, grad_features, grad_probs = value_and_grads(tf.constant(features[:, :4]), tf.constant(positive))
        want_probs, want_features = atskern.expectation_grad(g, features[:, :4], positive, replace=replace)
        np.testing.assert_allclose(grad_probs.numpy(), want_probs, rtol=1e-12)
        np.testing.assert_allclose(grad_features.numpy(), want_features, rtol=1e-12)


def test_a_jit_compiled_training_step():
    rng = np.random.default_rng(6)
    low = tf.Variable(rng.random((2, 8, 8)).astype(np.float32) + 0.1)
    image = tf.constant(rng.random((2, 64, 64, 3)).astype(np.float32))
    seed = tf.Variable(np.array([5, 0], np.uint32))

    @tf.function(jit_compile=True, autograph=False)
    def step():
        with tf.GradientTape() as tape:
            indices, sampled = xla.sample(low, 4, seed)
            (patches,) = xla.extract_multiscale([image], indices, (8, 8), [(8, 8)])
            loss = tf.reduce_sum(xla.expectation(tf.reduce_mean(patches, axis=(2, 3)), sampled))
        return loss, tape.gradient(loss, low)

    loss, grad = step()
    assert np.isfinite(loss.numpy()) and np.isfinite(grad.numpy()).all() and np.count_nonzero(grad.numpy()) > 0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_samples=6 is larger"):
        xla.sample_indices(np.ones((1, 5), np.float32), 6, 1)
    with pytest.raises(ValueError, match="attention row 0 contains NaN"):
        xla.sample_indices(np.array([[1, np.nan]], np.float32), 1, 1)
    with pytest.raises(TypeError, match="seed must be"):
        xla.sample_indices(np.ones((1, 5), np.float32), 2, -1.5)
    with pytest.raises(ValueError, match="probs of row 0 sum to"):
        xla.expectation(np.ones((1, 2, 3), np.float32), np.array([[0.9, 0.9]], np.float32))
    with pytest.raises(TypeError, match="offsets must be an integer"):
        xla.extract_patches(np.ones((1, 5, 5, 1), np.float32), np.zeros((1, 2, 2), np.float32), 3)



@pytest.mark.parametrize("row, message", [([0.5, np.nan, 0.5], "row 1 contains NaN or inf"),
                                          ([np.inf, 1, 1], "row 1 contains NaN or inf"),
                                          ([0.5, -0.1, 0.5], "row 1 has 1 negative weights"),
                                          ([0, 0, 0], "row 1 has no positive weight")])
def test_eager_top_k_checks_the_rows_as_sampling_does(row, message):
    """``sample(deterministic=True)`` called eagerly took the top-k of any row: a NaN row gave indices [0, 1] and NaN
    sampled attention, a negative weight shares of 0.56 each (ats.ops, ats.torch, ats.jax and its own sampling
    refuse them, naming the row)."""
    attention = np.array([[1, 2, 3], row], np.float32)
    with pytest.raises(ValueError, match=message):
        xla.sample(tf.constant(attention), 2, deterministic=True)
    with pytest.raises(ValueError, match=message):
        xla.sample(tf.constant(attention), 2, 0)
    indices, sampled = xla.sample(tf.constant(attention[:1]), 2, deterministic=True)
    assert indices.numpy()[0, :, 0].tolist() == [2, 1]
    np.testing.assert_allclose(sampled.numpy(), [[0.5, 1 / 3]], rtol=1e-6)

def test_float64_selection_is_exact_through_the_float32_prefilter():
    rng = np.random.default_rng(0)
    cases = [rng.exponential(size=(4, 300)), 1 + rng.integers(0, 3, (4, 300)) * 1e-12]
    pick = tf.function(lambda k: xla._smallest(k, 10), jit_compile=True, autograph=False)
    for keys in cases:
        want = np.lexsort((np.broadcast_to(np.arange(300), keys.shape), keys))[:, :10]
        np.testing.assert_array_equal(pick(tf.constant(keys)).numpy(), want)
        np.testing.assert_array_equal(xla._smallest(tf.constant(keys), 10).numpy(), want)


def test_fillers_equal_atskerns():
    attention = np.random.default_rng(8).random((3, 30)).astype(np.float32)
    attention[0, 3:] = 0
    attention[1, ::2] = 0
    indices, probs = _run("jit", lambda a: xla.sample_indices(a, 16, 4), tf.constant(attention))
    want_indices, want_probs = atskern.sample(attention, 16, seed=4)
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_allclose(probs.numpy(), want_probs, rtol=1e-6)
    assert (want_probs[0, 3:] == 0).all()


@pytest.mark.parametrize("replace", [False, True])
def test_unknown_batch_under_xla_draws_as_atskern(replace):
    """A compiled function traced with a None batch (Keras retraces so for a last, smaller batch): the rows'
    length stays static and the draws are atskern's (``int()`` of the batch once failed)."""
    attention = np.random.default_rng(4).random((3, 6, 5)).astype(np.float32)
    spec = [tf.TensorSpec((None, 6, 5), tf.float32)]
    compiled = tf.function(lambda a: xla.sample_indices(a, 4, 9, replace=replace), input_signature=spec,
                           jit_compile=True)
    indices, probs = compiled(tf.constant(attention))
    want_i, want_p = atskern.sample(attention, 4, seed=9, replace=replace)
    assert np.array_equal(indices.numpy(), want_i)
    np.testing.assert_allclose(probs.numpy(), want_p, rtol=1e-6)
    sampled = tf.function(lambda a: xla.sample(a, 4, 9, replace=replace)[1], input_signature=spec,
                          jit_compile=True)(tf.constant(attention))
    np.testing.assert_allclose(sampled.numpy(), want_p, rtol=1e-6)
