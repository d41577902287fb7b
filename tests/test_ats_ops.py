"""ats.ops: sampling, patch gather/scatter, offsets and the estimator as TensorFlow ops."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import atskern  # noqa: E402
from ats import _kernels, ops  # noqa: E402


def softmax_map(rng, shape, dtype=np.float64):
    logits = rng.normal(size=(shape[0], int(np.prod(shape[1:]))))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).reshape(shape).astype(dtype)


def run_both(fn):
    """``fn`` eagerly and inside ``tf.function``: both results."""
    return fn(), tf.function(fn)()


# --- sample -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 40), (2, 7, 9), (2, 4, 5, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("replace", [False, True])
def test_sample_matches_kernel_draws(shape, replace):
    rng = np.random.default_rng(0)
    attention = softmax_map(rng, shape)
    eager, graph = run_both(lambda: ops.sample(tf.constant(attention), 5, replace=replace, seed=11))
    want_idx, want_probs = atskern.sample(attention, 5, replace=replace, seed=11)
    for indices, sampled in (eager, graph):
        assert indices.dtype == tf.int32 and indices.shape == (shape[0], 5, len(shape) - 1)
        np.testing.assert_array_equal(indices.numpy(), want_idx)
        np.testing.assert_allclose(sampled.numpy(), want_probs, rtol=1e-12)


def test_sample_static_shapes_in_graph():
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec((None, None, None), tf.float32)])
    def f(a):
        indices, sampled = ops.sample(a, 4, seed=1)
        seen["shapes"] = (indices.shape.as_list(), sampled.shape.as_list())
        return indices

    f(tf.ones((2, 5, 5)) / 25)
    assert seen["shapes"] == ([None, 4, 2], [None, 4])


def test_sample_seed_reproducible_and_unseeded_varies():
    attention = tf.constant(softmax_map(np.random.default_rng(1), (2, 30, 30)))
    a = ops.sample(attention, 8, seed=5)[0].numpy()
    b = ops.sample(attention, 8, seed=5)[0].numpy()
    np.testing.assert_array_equal(a, b)
    draws = {ops.sample(attention, 8)[0].numpy().tobytes() for _ in range(4)}
    assert len(draws) > 1


def test_sample_topk_is_sorted_top_positions():
    attention = softmax_map(np.random.default_rng(2), (3, 6, 7))
    indices, sampled = ops.sample(tf.constant(attention), 4, deterministic=True)
    flat = attention.reshape(3, -1)
    order = np.argsort(-flat, axis=1)[:, :4]
    want = np.stack(np.unravel_index(order, (6, 7)), axis=-1)
    np.testing.assert_array_equal(indices.numpy(), want)
    np.testing.assert_allclose(sampled.numpy(), np.take_along_axis(flat, order, 1), rtol=1e-12)


def test_sample_topk_runs_under_xla():
    attention = tf.constant(softmax_map(np.random.default_rng(3), (2, 5, 5), np.float32))
    jit = tf.function(lambda a: ops.sample(a, 3, deterministic=True)[0], jit_compile=True)
    np.testing.assert_array_equal(jit(attention).numpy(), ops.sample(attention, 3, deterministic=True)[0].numpy())


def test_sample_unnormalized_weights_give_probabilities():
    weights = np.random.default_rng(4).uniform(0.5, 2.0, size=(2, 10))
    _, sampled = ops.sample(tf.constant(weights), 3, seed=0)
    _, want = atskern.sample(weights, 3, seed=0)
    np.testing.assert_allclose(sampled.numpy(), want, rtol=1e-12)


def test_sample_errors():
    with pytest.raises(ValueError, match="rank 2 to 4"):
        ops.sample(tf.ones((2, 2, 2, 2, 2)), 1)
    with pytest.raises(ValueError, match="larger than the 9 positions"):
        ops.sample(tf.ones((1, 3, 3)), 10)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        ops.sample(tf.ones((1, 3, 3)), 0)
    with pytest.raises(TypeError, match="floating"):
        ops.sample(tf.ones((1, 3, 3), tf.int32), 1)
    ops.sample(tf.ones((1, 3, 3)) / 9, 10, replace=True)  # with replacement it is fine
    # value errors of the kernel: the ValueError itself eagerly, InvalidArgumentError in a graph
    with pytest.raises(ValueError, match="row 0 contains NaN"):
        ops.sample(tf.constant([[0.5, np.nan]]), 1, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="row 0 contains NaN"):
        tf.function(lambda: ops.sample(tf.constant([[0.5, np.nan]]), 1, seed=0))()


def test_sample_dynamic_grid_too_small_is_a_clear_error():
    f = tf.function(lambda a: ops.sample(a, 10, seed=0)[0], input_signature=[tf.TensorSpec((None, None), tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the number of attention positions"):
        f(tf.ones((1, 4)) / 4)


@pytest.mark.parametrize("replace", [False, True])
def test_kernel_ops_under_xla_use_the_tf_ops_with_the_same_draws(replace):
    """Inside jit_compile=True ats.ops dispatches to ats.tf.xla: the draws equal the kernel's and atskern's
    for the same seed (an int, an int64 tensor or uint32 key words), and the patches and their gradient
    equal the kernel path's."""
    attention = softmax_map(np.random.default_rng(21), (3, 6, 7), np.float32)
    seed = 2**40 + 12345
    want, want_probs = atskern.sample(attention, 4, replace=replace, seed=seed)
    words = tf.constant([seed % 2**32, seed >> 32], tf.uint32)
    for key in (seed, tf.constant(np.uint64(seed).view(np.int64)), words):
        jit = tf.function(lambda a, key=key: ops.sample(a, 4, replace=replace, seed=key), jit_compile=True)
        indices, sampled = jit(tf.constant(attention))
        np.testing.assert_array_equal(indices.numpy(), want)
        np.testing.assert_allclose(sampled.numpy(), want_probs, rtol=1e-6)
        np.testing.assert_array_equal(ops.sample(tf.constant(attention), 4, replace=replace, seed=key)[0].numpy(), want)
    x = tf.constant(np.random.default_rng(22).normal(size=(3, 9, 8, 2)).astype(np.float32))
    offsets = tf.constant(np.random.default_rng(23).integers(-3, 9, size=(3, 5, 2)), tf.int32)

    def patches_and_grad(image):
        with tf.GradientTape() as tape:
            tape.watch(image)
            patches = ops.extract_patches(image, offsets, (3, 4), fill=-1)
            loss = tf.reduce_sum(patches * tf.cast(tf.range(patches.shape[-1]) + 1, patches.dtype))
        return patches, tape.gradient(loss, image)

    eager = patches_and_grad(x)
    compiled = tf.function(patches_and_grad, jit_compile=True)(x)
    for e, c in zip(eager, compiled):
        np.testing.assert_array_equal(c.numpy(), e.numpy())


def test_unseeded_sampling_under_xla_draws_afresh_and_the_error_type_stays_importable():
    attention = tf.ones((2, 8, 8)) / 64
    jit = tf.function(lambda a: ops.sample(a, 5)[0], jit_compile=True)
    draws = {jit(attention).numpy().tobytes() for _ in range(4)}
    assert len(draws) > 1
    assert issubclass(ops.XLAUnsupportedError, NotImplementedError)  # old code may still catch it


# --- offsets ------------------------------------------------------------------


def test_patch_offsets_design_examples():
    samples = tf.constant([[[12], [0]]])
    np.testing.assert_array_equal(ops.patch_offsets(samples, [25], [1000], 50).numpy().ravel(), [475, -5])
    np.testing.assert_array_equal(ops.patch_offsets(tf.constant([[[0]]]), [100], [1000], 50).numpy().ravel(), [-20])


def test_patch_offsets_margin_maps_valid_convolution_grid():
    # a grid of G = low - rf cells; cell s is centred at rf/2 + s + 0.5 low pixels.
    low, rf, scale = 20, 4, 5
    grid = low - rf
    s = np.arange(grid).reshape(1, -1, 1)
    # an odd patch keeps every start away from a rounding tie
    got = ops.patch_offsets(tf.constant(s), [grid], [low * scale], 9, margin=rf / 2 / low).numpy().ravel()
    want = np.rint((rf / 2 + s.ravel() + 0.5) * scale - 4.5)
    np.testing.assert_array_equal(got, want)


def test_patch_offsets_compute_the_contract_formula_in_float64():
    # a Python float margin must not pass through float32 (that moves rounding ties)
    rng = np.random.default_rng(12)
    samples = rng.integers(0, 24, size=(2, 200, 2))
    grid, level, size, m = np.array([24.0, 17.0]), np.array([1000.0, 68.0]), np.array([50.0, 8.0]), 0.05
    want = np.rint(level * (m + (samples + 0.5) / grid * (1 - 2 * m)) - size / 2)
    got = ops.patch_offsets(tf.constant(samples), (24, 17), (1000, 68), (50, 8), margin=m)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.skipif(not hasattr(atskern, "patch_offsets"), reason="atskern without patch kernels")
@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_patch_offsets_match_kernel(margin):
    rng = np.random.default_rng(5)
    samples = rng.integers(0, 24, size=(3, 50, 2)).astype(np.int32)
    for grid, level, size in [((24, 24), (1000, 1000), (50, 50)), ((24, 17), (96, 68), (7, 8)), ((24, 24), (48, 48), (3, 4))]:
        want = atskern.patch_offsets(samples, grid, level, size, margin=margin)
        got = ops.patch_offsets(tf.constant(samples), grid, level, size, margin=margin)
        np.testing.assert_array_equal(got.numpy(), want)


# --- patches ------------------------------------------------------------------


def reference_patches(x, offsets, size, fill=0):
    """Patches by padding and slicing (an independent oracle)."""
    pad = max(size) + int(np.abs(offsets).max())
    widths = [(0, 0)] + [(pad, pad)] * (x.ndim - 2) + [(0, 0)]
    padded = np.pad(x, widths, constant_values=fill)
    out = []
    for b in range(offsets.shape[0]):
        out.append([padded[(b,) + tuple(slice(o + pad, o + pad + p) for o, p in zip(off, size))] for off in offsets[b]])
    return np.array(out)


@pytest.mark.parametrize(
    "spatial,size", [((30,), (7,)), ((12, 15), (5, 4)), ((6, 7, 8), (3, 4, 2))], ids=["1d", "2d", "3d"]
)
def test_extract_patches_forward_and_adjoint(spatial, size):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, *spatial, 3))
    offsets = np.stack([rng.integers(-p, s, size=(2, 5)) for s, p in zip(spatial, size)], axis=-1).astype(np.int32)
    xt = tf.constant(x)
    (eager, graph) = run_both(lambda: ops.extract_patches(xt, offsets, size, fill=0))
    want = reference_patches(x, offsets, size)
    np.testing.assert_array_equal(eager.numpy(), want)
    np.testing.assert_array_equal(graph.numpy(), want)
    g = rng.normal(size=want.shape)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        patches = ops.extract_patches(xt, offsets, size)
    grad = tape.gradient(patches, xt, output_gradients=tf.constant(g)).numpy()
    # dot test: <extract(x), g> == <x, scatter(g)>
    np.testing.assert_allclose(np.vdot(want, g), np.vdot(x, grad), rtol=1e-12)


def test_extract_patches_fill_and_dtypes():
    x = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    patches = ops.extract_patches(tf.constant(x), [[[-1, -1]]], 3, fill=7).numpy()
    assert patches.dtype == np.uint8
    np.testing.assert_array_equal(patches[0, 0, :, :, 0], [[7, 7, 7], [7, 0, 1], [7, 4, 5]])
    half = ops.extract_patches(tf.constant(x.astype(np.float16)), [[[1, 1]]], 2)
    assert half.dtype == tf.float16


def test_extract_patches_gradient_only_when_needed(monkeypatch):
    calls = []
    real = _kernels.scatter_patches
    monkeypatch.setattr(_kernels, "scatter_patches", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = tf.random.normal((1, 10, 10, 1))
    w = tf.Variable(2.0)

    @tf.function
    def step(image):
        with tf.GradientTape() as tape:
            patches = ops.extract_patches(image, tf.zeros((1, 2, 2), tf.int32), 4)
            loss = tf.reduce_sum(w * patches)
        return tape.gradient(loss, w)

    assert float(step(x)) == pytest.approx(float(tf.reduce_sum(ops.extract_patches(x, tf.zeros((1, 2, 2), tf.int32), 4))))
    assert calls == []
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(ops.extract_patches(x, tf.zeros((1, 2, 2), tf.int32), 4))
    grad = tape.gradient(loss, x).numpy()
    assert calls == [1]
    assert grad[0, :4, :4, 0].tolist() == [[2.0] * 4] * 4 and grad.sum() == 32


def test_extract_patches_errors():
    with pytest.raises(ValueError, match="2 spatial dimensions"):
        ops.extract_patches(tf.ones((1, 5, 5)), tf.zeros((1, 1, 2), tf.int32), 2)
    with pytest.raises(ValueError, match="patch_size must have 2 entries"):
        ops.extract_patches(tf.ones((1, 5, 5, 1)), tf.zeros((1, 1, 2), tf.int32), (2, 2, 2))
    with pytest.raises(TypeError, match="integer"):
        ops.extract_patches(tf.ones((1, 5, 5, 1)), tf.zeros((1, 1, 2)), 2)


def test_extract_multiscale_maps_one_sample_into_every_level():
    rng = np.random.default_rng(7)
    levels = [rng.normal(size=(1, 40, 40, 2)), rng.normal(size=(1, 80, 80, 2))]
    samples = tf.constant([[[3, 7], [9, 0]]], tf.int32)
    tensors = [tf.constant(level) for level in levels]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        patches = ops.extract_multiscale(tensors, samples, (10, 10), [(6, 6), (12, 12)])
        loss = sum(tf.reduce_sum(p) for p in patches)
    for level, tensor, p, size in zip(levels, tensors, patches, [6, 12]):
        offsets = ops.patch_offsets(samples, (10, 10), level.shape[1:3], size).numpy()
        np.testing.assert_array_equal(p.numpy(), reference_patches(level, offsets, (size, size)))
    grads = tape.gradient(loss, tensors)
    for level, grad, size in zip(levels, grads, [6, 12]):
        # each pixel's gradient counts the patches covering it
        offsets = ops.patch_offsets(samples, (10, 10), level.shape[1:3], size).numpy()
        covered = reference_patches(np.ones_like(level), offsets, (size, size)).sum()
        assert 0 < float(tf.reduce_sum(grad)) == covered


# --- expectation --------------------------------------------------------------


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("feature_shape", [(5,), (2, 3)])
def test_expectation_value_and_gradients_match_atskern(replace, feature_shape):
    rng = np.random.default_rng(8)
    attention = softmax_map(rng, (3, 6, 6))
    _, probs = atskern.sample(attention, 4, replace=replace, seed=3)
    features = rng.normal(size=(3, 4, *feature_shape))
    upstream = rng.normal(size=(3, *feature_shape))
    f, p = tf.constant(features), tf.constant(probs)

    def run():
        with tf.GradientTape() as tape:
            tape.watch([f, p])
            value = ops.expectation(f, p, replace=replace)
        return (value, *tape.gradient(value, [f, p], output_gradients=tf.constant(upstream)))

    want_probs, want_features = atskern.expectation_grad(upstream, features, probs, replace=replace)
    for value, grad_features, grad_probs in run_both(run):
        np.testing.assert_allclose(value.numpy(), atskern.expectation(features, probs, replace=replace), rtol=1e-12)
        np.testing.assert_allclose(grad_features.numpy(), want_features, rtol=1e-12)
        np.testing.assert_allclose(grad_probs.numpy(), want_probs, rtol=1e-12, atol=1e-14)


def test_attention_gradient_through_sampling_is_scatter_of_estimator_gradient():
    rng = np.random.default_rng(9)
    attention = softmax_map(rng, (2, 5, 5))
    features = rng.normal(size=(2, 3, 4))
    a = tf.constant(attention)
    with tf.GradientTape() as tape:
        tape.watch(a)
        indices, sampled = ops.sample(a, 3, seed=21)
        value = ops.expectation(tf.constant(features), sampled)
    grad = tape.gradient(value, a).numpy()
    idx, probs = atskern.sample(attention, 3, seed=21)
    grad_probs, _ = atskern.expectation_grad(np.ones((2, 4)), features, probs)
    want = np.zeros_like(attention)
    for b in range(2):
        for k in range(3):
            want[(b, *idx[b, k])] += grad_probs[b, k]
    # sampled = gather / sum(attention): the sum adds -<grad_probs, probs> to every position
    want -= (grad_probs * probs).sum(axis=1)[:, None, None]
    np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)


def test_expectation_static_shape_and_errors():
    value = ops.expectation(tf.ones((2, 3, 4)), tf.fill((2, 3), 0.1))
    assert value.shape == (2, 4)
    with pytest.raises(ValueError, match="must start with probs' shape"):
        ops.expectation(tf.ones((2, 4, 4)), tf.fill((2, 3), 0.1))
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        ops.expectation(tf.ones((2, 3, 4)), tf.fill((2, 3, 1), 0.1))


def test_expectation_of_bfloat16_equals_the_estimate_by_hand():
    """bfloat16 features and probs (a mixed_bfloat16 model): the estimate ``sum_k c_k f_k`` with
    ``c_k = (1 - sum_{j<k} a_j + (n - 1 - k) a_k) / n``, computed here in float64 from the same bfloat16 values,
    within bfloat16's rounding (the probs check once asked NumPy's finfo of bfloat16 and raised)."""
    import keras

    from ats.core import Expectation

    rng = np.random.default_rng(12)
    features = tf.cast(tf.constant(rng.normal(size=(2, 3, 4))), tf.bfloat16)
    probs = tf.cast(tf.constant([[0.25, 0.125, 0.5], [0.0625, 0.375, 0.25]]), tf.bfloat16)
    f, a = features.numpy().astype(np.float64), probs.numpy().astype(np.float64)
    before = np.cumsum(a, axis=1) - a
    c = (1 - before + np.arange(2, -1, -1) * a) / 3
    want = (c[:, :, None] * f).sum(axis=1)
    got = ops.expectation(features, probs)
    assert got.dtype == tf.bfloat16
    np.testing.assert_allclose(got.numpy().astype(np.float64), want, rtol=2**-7, atol=2**-7)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer_value = Expectation()([features, probs])
    finally:
        keras.mixed_precision.set_global_policy(policy)
    np.testing.assert_allclose(np.asarray(layer_value, np.float64), want, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_batch_mismatch_known_only_at_run_time_fails(jit_compile):
    """Traced with a None batch, features of 4 images and probs of 1 once broadcast, and offsets of 3 images
    against 2 images once read image 1 twice under XLA (its gather clips the batch index): both now fail,
    with the argument named where assertions run (XLA drops them: a reshape to the other batch fails there)."""
    estimate = tf.function(lambda f, p: ops.expectation(f, p), jit_compile=jit_compile,
                           input_signature=[tf.TensorSpec((None, 3, 2)), tf.TensorSpec((None, 3))])
    with pytest.raises(tf.errors.InvalidArgumentError, match="reshape" if jit_compile else "features must be"):
        estimate(tf.ones((4, 3, 2)), tf.fill((1, 3), 0.2))
    assert estimate(tf.ones((4, 3, 2)), tf.fill((4, 3), 0.2)).shape == (4, 2)
    gather = tf.function(lambda x, o: ops.extract_patches(x, o, 2), jit_compile=jit_compile,
                         input_signature=[tf.TensorSpec((None, 8, 8, 1)), tf.TensorSpec((None, 1, 2), tf.int32)])
    images = tf.constant(np.stack([np.full((8, 8, 1), v, np.float32) for v in (10, 20)]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="reshape" if jit_compile else "batch size"):
        gather(images, tf.zeros((3, 1, 2), tf.int32))
    np.testing.assert_array_equal(gather(images, tf.zeros((2, 1, 2), tf.int32)).numpy()[:, 0, 0, 0, 0], [10, 20])


def test_xla_ops_refuse_a_static_batch_mismatch():
    from ats.tf import xla

    with pytest.raises(ValueError, match=r"offsets has batch size 3 .* x has batch size 2"):
        xla.extract_patches(tf.ones((2, 8, 8, 1)), tf.zeros((3, 1, 2), tf.int32), 2)
    with pytest.raises(ValueError, match=r"offsets has batch size 3 .* grad has batch size 2"):
        xla.scatter_patches(tf.ones((2, 1, 2, 2, 1)), tf.zeros((3, 1, 2), tf.int32), (8, 8))
    with pytest.raises(ValueError, match=r"features must be \(batch, n, ...\) with probs' \(batch, n\) = \(1, 3\)"):
        xla.expectation(tf.ones((4, 3, 2)), tf.fill((1, 3), 0.2))


def test_extract_patches_channels_first_layout():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 9, 10, 3))
    offsets = rng.integers(-2, 8, size=(2, 4, 2)).astype(np.int32)
    last = ops.extract_patches(tf.constant(x), offsets, (3, 4)).numpy()
    xt = tf.constant(np.moveaxis(x, -1, 1))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        first = ops.extract_patches(xt, offsets, (3, 4), channels_first=True)
    assert first.shape == (2, 4, 3, 3, 4)
    np.testing.assert_array_equal(first.numpy(), np.moveaxis(last, -1, 2))
    grad = tape.gradient(first, xt)
    assert grad.shape == xt.shape and float(tf.reduce_sum(grad)) == np.count_nonzero(
        ops.extract_patches(tf.ones_like(xt), offsets, (3, 4), channels_first=True).numpy()
    )


@pytest.mark.parametrize("row, message", [([1.0, np.nan, 0.5], "contains NaN or inf"),
                                          ([1.0, -3.0, 0.5], "has 1 negative weights"),
                                          ([0.0, 0.0, 0.0], "has no positive weight")])
def test_sample_topk_refuses_the_rows_sampling_refuses(row, message):
    attention = tf.constant([[0.2, 0.3, 0.5], row], tf.float32)
    with pytest.raises(ValueError, match=f"attention row 1 {message}"):
        ops.sample(attention, 2, deterministic=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="attention rows must be finite and >= 0"):
        tf.function(lambda a: ops.sample(a, 2, deterministic=True))(attention)
    good = tf.constant([[0.2, 0.3, 0.5], [0.1, 0.0, 0.9]], tf.float32)
    eager = ops.sample(good, 2, deterministic=True)
    traced = tf.function(lambda a: ops.sample(a, 2, deterministic=True))(good)
    assert np.array_equal(eager[0].numpy(), traced[0].numpy())
    with pytest.raises(ValueError, match="only 1 positive weights, fewer than n_samples=2"):
        ops.sample(tf.constant([[0.0, 0.0, 0.9]]), 2, deterministic=True, strict=True)


@pytest.mark.parametrize("deterministic", [False, True])
def test_sampled_attention_when_the_row_sum_overflows_float16(deterministic):
    """Unnormalized float16 weights whose row sum overflows float16: each draw's share of its row (it was 0)."""
    attention = tf.fill((1, 64, 64), tf.constant(20.0, tf.float16))
    _, sampled = ops.sample(attention, 3, seed=1, deterministic=deterministic)
    assert sampled.dtype == tf.float16
    np.testing.assert_allclose(sampled.numpy().astype(np.float64), np.full((1, 3), 1 / 4096), rtol=1e-3)
    big = tf.constant([[1e308, 1e308, 1.0]], tf.float64)
    _, shares = tf.function(lambda a: ops.sample(a, 2, seed=1, deterministic=deterministic), jit_compile=True)(big)
    np.testing.assert_allclose(shares.numpy(), [[0.5, 0.5]], rtol=1e-12)


@pytest.mark.parametrize("graph", [False, True])
def test_an_empty_batch_gets_empty_draws_and_patches(graph):
    """tf.distribute hands a replica an empty batch when the last global batch has fewer examples than replicas:
    atskern refuses empty arrays, and every such model.fit failed on its last step."""
    run = tf.function if graph else (lambda f: f)
    attention = tf.zeros((0, 6, 6))
    for deterministic in (False, True):
        indices, sampled = run(lambda a: ops.sample(a, 3, seed=1, deterministic=deterministic))(attention)
        assert indices.shape == (0, 3, 2) and sampled.shape == (0, 3)
    x = tf.ones((0, 8, 8, 2))
    offsets = tf.zeros((0, 4, 2), tf.int32)

    def patches_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            patches = ops.extract_patches(x, offsets, (3, 3))
        return patches, tape.gradient(patches, x, output_gradients=tf.ones_like(patches))

    patches, grad = run(patches_and_grad)(x)
    assert patches.shape == (0, 4, 3, 3, 2) and grad.shape == (0, 8, 8, 2)
    none = tf.zeros((2, 0, 2), tf.int32)  # no patches of a non-empty batch: a zero gradient
    x = tf.ones((2, 8, 8, 2))
    with tf.GradientTape() as tape:
        tape.watch(x)
        patches = ops.extract_patches(x, none, (3, 3))
    assert patches.shape == (2, 0, 3, 3, 2)
    np.testing.assert_array_equal(tape.gradient(patches, x, output_gradients=tf.ones_like(patches)).numpy(), 0)


def test_unseeded_keys_under_xla_are_salted_with_the_rank(monkeypatch):
    """Under jit_compile an unseeded draw's key comes from TF's stateful generator, which workers that call
    tf.random.set_seed(0), as multi-worker scripts do, run identically: every rank drew the same patches."""
    from ats import _distributed

    words = np.array([123456789, 2**31 + 5], np.int64)
    monkeypatch.setattr(tf.random, "uniform", lambda *args, **kwargs: tf.constant(words.astype(np.int32)))

    def key_words(rank):
        monkeypatch.setattr(_distributed, "process_index", lambda: rank)
        return ops._xla_seed(None).numpy().astype(np.int64)

    np.testing.assert_array_equal(key_words(0), words)
    salt = _distributed.salted_seed(0, 1)
    np.testing.assert_array_equal(key_words(1), words ^ np.array([salt & 0xFFFFFFFF, salt >> 32]))
    attention = tf.constant(np.full((1, 40, 40), 1 / 1600, np.float32))

    def draws(rank):
        monkeypatch.setattr(_distributed, "process_index", lambda: rank)
        return tf.function(lambda a: ops.sample(a, 6)[0], jit_compile=True)(attention).numpy()

    assert np.array_equal(draws(0), draws(0)) and not np.array_equal(draws(0), draws(1))


@pytest.mark.parametrize("graph", [False, True])
def test_second_derivatives_of_the_patch_gather(graph):
    """A Hessian-vector product of 0.5 |extract(x)|^2 is scatter(extract(v)) (the gather is linear): the kernel
    gradient was not differentiable, and the outer gradient came back None without an error."""
    rng = np.random.default_rng(6)
    x, v = (tf.constant(rng.standard_normal((2, 5, 6, 2))) for _ in range(2))
    offsets = tf.constant([[[-1, 1], [2, 2]], [[3, -2], [0, 0]]], tf.int32)

    def hvp(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = 0.5 * tf.reduce_sum(ops.extract_patches(x, offsets, (3, 3)) ** 2)
            directional = tf.reduce_sum(inner.gradient(loss, x) * v)
        return outer.gradient(directional, x)

    got = (tf.function(hvp) if graph else hvp)(x)
    start = offsets.numpy()
    want = atskern.scatter_patches(atskern.extract_patches(v.numpy(), start, (3, 3)), start, (5, 6))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # independently: the HVP of a linear map's squared norm is its Gram operator, here the patch-coverage count
    # times v (every pixel read k times gets k v)
    cover = atskern.scatter_patches(np.ones((2, 2, 3, 3, 2)), start, (5, 6))
    np.testing.assert_allclose(got.numpy(), cover * v.numpy(), rtol=1e-12, atol=1e-12)
