"""ats.core and ats.utils: Keras layers, gradients, serialization, errors."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ats import core  # noqa: E402
from ats.core import Expectation, SamplePatches, attention_sampling  # noqa: E402
from ats.utils.layers import ActivityRegularizer, L2Normalize, SampleSoftmax, TotalReshape  # noqa: E402
from ats.utils.regularizers import MultinomialEntropy, multinomial_entropy  # noqa: E402

L = keras.layers
CONV = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}
POOL = {1: L.AveragePooling1D, 2: L.AveragePooling2D, 3: L.AveragePooling3D}
GLOBAL_MAX = {1: L.GlobalMaxPooling1D, 2: L.GlobalMaxPooling2D, 3: L.GlobalMaxPooling3D}


def ats_model(spatial=(32, 32), pool=4, n_patches=3, patch=6, channels=1, outputs=2, **kwargs):
    """A tiny ATS classifier on ``x_high`` of ``spatial``; x_low is its average pooling."""
    dims = len(spatial)
    x_high = L.Input(shape=(*spatial, channels))
    x_low = POOL[dims](pool)(x_high)
    attention = keras.Sequential(
        [CONV[dims](4, 3, padding="same", activation="relu"), CONV[dims](1, 3, padding="same"), SampleSoftmax(squeeze_channels=True)]
    )
    feature = keras.Sequential([CONV[dims](5, 3, activation="relu"), GLOBAL_MAX[dims]()])
    features, att, patches = attention_sampling(attention, feature, patch_size=patch, n_patches=n_patches, **kwargs)(
        [x_low, x_high]
    )
    y = L.Dense(outputs)(features)
    return keras.Model(x_high, [y, att, patches])


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


# --- utils --------------------------------------------------------------------


def test_sample_softmax_normalizes_whole_sample_and_smooths():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 1)).astype("float32")
    p = SampleSoftmax(squeeze_channels=True)(x).numpy()
    assert p.shape == (2, 3, 4)
    np.testing.assert_allclose(p.sum(axis=(1, 2)), 1, rtol=1e-6)
    want = np.exp(x[0, ..., 0]) / np.exp(x[0]).sum()
    np.testing.assert_allclose(p[0], want, rtol=1e-5)
    smooth = SampleSoftmax(smooth=0.5)(x).numpy()
    np.testing.assert_allclose(smooth[..., 0], 0.5 * p + 0.5 / 12, rtol=1e-5)
    with pytest.raises(ValueError, match="1 channel"):
        SampleSoftmax(squeeze_channels=True)(np.ones((1, 3, 3, 2), "float32"))


def test_l2_normalize_and_total_reshape():
    x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(np.linalg.norm(L2Normalize()(x).numpy(), axis=-1), 1, rtol=1e-6)
    assert TotalReshape((-1, 2))(x).shape == (6, 2)


def test_multinomial_entropy_value_and_activity_loss():
    p = np.array([[0.5, 0.5], [0.9, 0.1]], "float32")
    reg = multinomial_entropy(0.1)
    assert isinstance(reg, MultinomialEntropy)
    want = 0.1 * np.sum(p * np.log(p + 1e-6)) / 2
    assert float(reg(p)) == pytest.approx(want, rel=1e-5)
    layer = ActivityRegularizer(reg)
    np.testing.assert_array_equal(layer(p).numpy(), p)
    assert float(layer.losses[0]) == pytest.approx(want, rel=1e-5)


# --- pipeline -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial,pool,patch", [((96,), 4, 8), ((32, 32), 4, 6), ((12, 12, 12), 2, 4)], ids=["1d", "2d", "3d"]
)
def test_pipeline_shapes_for_signals_images_volumes(spatial, pool, patch):
    model = ats_model(spatial, pool=pool, patch=patch, channels=2)
    y, att, patches = model(images((2, *spatial, 2)), training=True)
    dims = len(spatial)
    assert y.shape == (2, 2)
    assert att.shape == (2, *(s // pool for s in spatial))
    assert patches.shape == (2, 3, *(patch,) * dims, 2)
    assert model.outputs[2].shape == (None, 3, *(patch,) * dims, 2)


def test_gradients_reach_attention_and_feature_networks():
    model = ats_model(seed=4)
    attention_net, feature_net = (layer for layer in model.layers if isinstance(layer, keras.Sequential))
    x = images((4, 32, 32, 1))
    with tf.GradientTape() as tape:
        y, _, _ = model(x, training=True)
        loss = tf.reduce_sum(y**2) + sum(model.losses)
    # (the bias of the conv before SampleSoftmax is skipped: softmax ignores a constant shift,
    # so its exact gradient is 0)
    weights = [w for w in attention_net.trainable_weights if len(w.shape) > 1] + feature_net.trainable_weights
    grads = tape.gradient(loss, weights)
    for w, g in zip(weights, grads):
        assert g is not None, w.path
        assert float(tf.reduce_max(tf.abs(g))) > 0, w.path


def test_patches_come_from_the_sampled_positions():
    # attention concentrated on one cell: every patch is centred there
    x_high = np.zeros((1, 40, 40, 1), "float32")
    x_high[0, 20:24, 8:12, 0] = np.arange(16).reshape(4, 4)
    x_low = x_high[:, ::4, ::4]
    attention = np.full((1, 10, 10), 1e-9, "float32")
    attention[0, 5, 2] = 1
    attention /= attention.sum()
    patches, sampled = SamplePatches(2, 4, replace=True, seed=1)([x_low, x_high, attention])
    np.testing.assert_array_equal(patches[0, 0, ..., 0].numpy(), np.arange(16).reshape(4, 4))
    np.testing.assert_allclose(sampled.numpy(), 1, rtol=1e-6)


def test_seeded_and_topk_modes_are_reproducible_and_sampling_varies():
    x = images((3, 32, 32, 1), seed=2)
    seeded = ats_model(seed=7, n_patches=4)
    a, b = seeded(x, training=True)[2].numpy(), seeded(x, training=True)[2].numpy()
    np.testing.assert_array_equal(a, b)
    topk = ats_model(deterministic=True, n_patches=4)
    np.testing.assert_array_equal(topk(x)[2].numpy(), topk(x)[2].numpy())
    free = ats_model(n_patches=4)
    draws = {free(x)[2].numpy().tobytes() for _ in range(4)}
    assert len(draws) > 1


def test_auto_mode_samples_in_training_and_takes_topk_in_inference():
    layer = SamplePatches(3, 2, mode="auto")
    x = images((2, 16, 16, 1))
    att = tf.reshape(tf.nn.softmax(tf.random.normal((2, 64))), (2, 8, 8))
    inference = [layer([x[:, ::2, ::2], x, att], training=False)[0].numpy().tobytes() for _ in range(3)]
    assert len(set(inference)) == 1
    _, top = SamplePatches(3, 2, mode="topk")([x[:, ::2, ::2], x, att])
    np.testing.assert_array_equal(layer([x[:, ::2, ::2], x, att], training=False)[1].numpy(), top.numpy())


def test_eager_and_tf_function_agree():
    model = ats_model(seed=3)
    x = images((2, 32, 32, 1), seed=5)
    eager = model(x, training=True)
    graph = tf.function(lambda v: model(v, training=True))(x)
    for e, g in zip(eager, graph):
        np.testing.assert_allclose(e.numpy(), g.numpy(), rtol=1e-6)


def test_expectation_layer_matches_op_and_config():
    features = tf.random.normal((2, 3, 4))
    probs = tf.fill((2, 3), 0.2)
    layer = Expectation(replace=True)
    np.testing.assert_allclose(layer([features, probs]).numpy(), tf.reduce_mean(features, axis=1).numpy(), rtol=1e-6, atol=1e-6)
    assert Expectation.from_config(layer.get_config()).replace is True


def test_layers_support_xla():
    model = ats_model(seed=0)
    assert all(getattr(layer, "supports_jit", True) for layer in model._flatten_layers())
    model.compile("sgd", [keras.losses.MeanSquaredError(), None, None], jit_compile=True)
    assert model.jit_compile is True


def test_save_and_load_round_trip(tmp_path):
    x = images((2, 32, 32, 1), seed=9)
    configs = (
        {"deterministic": True, "attention_regularizer": multinomial_entropy(0.01)},
        {"seed": 12},
        {"mode": "auto", "replace": True},
    )
    for kwargs in configs:
        model = ats_model(**kwargs)
        path = tmp_path / "m.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        for before, after in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
            np.testing.assert_array_equal(before, after)
        layer = next(la for la in loaded.layers if isinstance(la, SamplePatches))
        assert layer.get_config()["seed"] == kwargs.get("seed")
        regularizers = [la.regularizer for la in loaded.layers if isinstance(la, ActivityRegularizer)]
        if "attention_regularizer" in kwargs:
            assert isinstance(regularizers[0], MultinomialEntropy) and regularizers[0].strength == 0.01


# --- errors -------------------------------------------------------------------


def test_wrong_rank_inputs_are_refused_at_build():
    with pytest.raises(ValueError, match="rank 3 to 5"):
        SamplePatches(2, 2)([L.Input((4, 4, 4, 4, 1)), L.Input((8, 8, 8, 8, 1)), L.Input((4, 4, 4, 4))])
    with pytest.raises(ValueError, match="attention must be"):
        SamplePatches(2, 2)([L.Input((4, 4, 1)), L.Input((8, 8, 1)), L.Input((4, 4, 1))])
    with pytest.raises(ValueError, match="x_low must have x_high's rank"):
        SamplePatches(2, 2)([L.Input((4, 1)), L.Input((8, 8, 1)), L.Input((4, 4))])
    with pytest.raises(ValueError, match="patch_size must have 2 entries"):
        SamplePatches(2, (2, 2, 2))([L.Input((4, 4, 1)), L.Input((8, 8, 1)), L.Input((4, 4))])


def test_patch_larger_than_image_is_refused():
    with pytest.raises(ValueError, match=r"patch_size \(10, 10\) is larger than x_high's spatial shape \(8, 8\)"):
        SamplePatches(2, 10)([L.Input((4, 4, 1)), L.Input((8, 8, 1)), L.Input((4, 4))])
    # unknown spatial shape: checked when the data arrives
    layer = SamplePatches(1, 10, seed=0)
    call = tf.function(lambda a, b, c: layer([a, b, c]), input_signature=[tf.TensorSpec((None, None, None, 1))] * 2 + [tf.TensorSpec((None, None, None))])
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the spatial shape of x_high"):
        call(tf.ones((1, 4, 4, 1)), tf.ones((1, 8, 8, 1)), tf.ones((1, 4, 4)) / 16)


def test_too_many_patches_without_replacement_is_refused():
    inputs = [L.Input((4, 4, 1)), L.Input((16, 16, 1)), L.Input((4, 4))]
    with pytest.raises(ValueError, match="n_patches=17 is larger than the 16 positions"):
        SamplePatches(17, 2)(inputs)
    with pytest.raises(ValueError, match="n_patches=17 is larger than the 16 positions"):
        SamplePatches(17, 2, replace=True, mode="topk")(inputs)
    SamplePatches(17, 2, replace=True)(inputs)  # with replacement it is fine


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_patches must be a positive integer"):
        SamplePatches(0, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        SamplePatches(2, 2, mode="best")
    with pytest.raises(ValueError, match="seed must be None or an int"):
        SamplePatches(2, 2, seed=-1)
    for bad in (-1, float("nan"), float("inf")):  # nan once passed and failed at the call, unnamed
        with pytest.raises(ValueError, match="receptive_field must be a finite number >= 0"):
            SamplePatches(2, 2, receptive_field=bad)
    with pytest.raises(ValueError, match="static"):
        attention_sampling(lambda x: x, lambda x: x)([L.Input((None, None, 1)), L.Input((None, None, 1))])


def test_receptive_field_maps_valid_attention_grid_to_centres():
    # attention from a 'valid' 5x5 conv: grid 12 on a 16 low view; receptive_field 4
    x_high = np.zeros((1, 64, 64, 1), "float32")
    layer = SamplePatches(1, 3, receptive_field=4, mode="topk")
    att = np.zeros((1, 12, 12), "float32")
    att[0, 0, 11] = 1
    x_high[0, 8 + 1, 4 * (2 + 11) + 1, 0] = 5  # the centre of cell (0, 11) is low (2.5, 13.5) -> high (10, 54)
    patches, _ = layer([x_high[:, ::4, ::4], x_high, att])
    assert patches.numpy()[0, 0, ..., 0].max() == 5
    assert core.SamplePatches.from_config(layer.get_config()).receptive_field == 4


def test_use_logits_samples_the_softmax_and_returns_the_logits_as_2019():
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(2, 6, 6)).astype("float32")
    probs = tf.reshape(tf.nn.softmax(logits.reshape(2, -1)), (2, 6, 6))
    x_high = images((2, 24, 24, 1))
    x_low = x_high[:, ::4, ::4]
    patches_l, sampled_l = SamplePatches(3, 4, use_logits=True, mode="topk")([x_low, x_high, logits])
    patches_p, sampled_p = SamplePatches(3, 4, mode="topk")([x_low, x_high, probs])
    np.testing.assert_array_equal(patches_l.numpy(), patches_p.numpy())
    # 2019's code gathered the attention input itself: the logits of the drawn cells
    top = np.sort(logits.reshape(2, -1), axis=1)[:, ::-1][:, :3]
    np.testing.assert_array_equal(sampled_l.numpy(), top)
    log_norm = np.log(np.exp(logits.reshape(2, -1).astype(np.float64)).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(np.exp(top - log_norm), sampled_p.numpy(), rtol=1e-5)


def test_jit_compile_true_trains_and_predicts_as_without():
    """model.compile(jit_compile=True): the sampling and gather run as ats.tf.xla ops inside XLA; a top-k
    model predicts what the kernel path predicts, a seeded one repeats itself, and training changes the
    weights. (A seeded draw is a function of the attention map's bits, which XLA's convolutions round
    differently, so seeded predictions with and without XLA need not match.)"""
    x = images((4, 32, 32, 1), seed=6)
    y = np.zeros((4, 2), "float32")
    topk = ats_model(deterministic=True)
    plain = topk.predict(x, verbose=0)
    topk.compile("sgd", [keras.losses.MeanSquaredError(), None, None], jit_compile=True)
    for want, got in zip(plain, topk.predict(x, verbose=0)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    model = ats_model(seed=5)
    model.compile("sgd", [keras.losses.MeanSquaredError(), None, None], jit_compile=True)
    assert model.jit_compile is True
    for first, again in zip(model.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_array_equal(first, again)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, [y, np.zeros((4, 8, 8)), np.zeros((4, 3, 6, 6, 1))], batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def test_multinomial_entropy_of_half_precision_attention_is_float32():
    """Under mixed precision the attention is float16: the penalty comes back in float32 (Keras adds losses in
    float32; a float16 penalty failed the step), computed from the float32 values."""
    attention = np.random.default_rng(0).dirichlet(np.ones(12), size=3).astype(np.float16)
    penalty = multinomial_entropy(0.1)(attention)
    assert keras.backend.standardize_dtype(penalty.dtype) == "float32"
    x = attention.astype(np.float32)
    np.testing.assert_allclose(float(penalty), 0.1 * np.sum(x * np.log(x + 1e-6)) / 3, rtol=1e-5)


@pytest.mark.parametrize("make, error, message", [
    (lambda: SamplePatches(3, 8.0), TypeError, r"patch_size must be a positive integer or a tuple of them.*8\.0"),
    (lambda: SamplePatches(3, "8"), TypeError, r"patch_size must be a positive integer or a tuple of them.*'8'"),
    (lambda: SamplePatches(3, (8, 0)), TypeError, r"patch_size must be a positive integer or a tuple"),
    (lambda: SamplePatches(3, 0), ValueError, r"patch_size must be a positive integer"),
    (lambda: SamplePatches(3, 8, replace="no"), TypeError, "replace must be True or False, got 'no'"),
    (lambda: SamplePatches(3, 8, use_logits=1), TypeError, "use_logits must be True or False, got 1"),
    (lambda: Expectation(replace="False"), TypeError, "replace must be True or False"),
])
def test_layer_arguments_are_checked_by_name(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_receptive_field_is_checked_against_a_dynamic_x_low():
    """In a graph where x_low's size is only known at run time, a receptive_field not below it fails the step
    (the eager call raises a ValueError); it gave mirrored patch positions without a word before."""
    import tensorflow as tf

    spec = [tf.TensorSpec((None, None, None, 1))] * 2 + [tf.TensorSpec((None, None, None))]
    x_low = np.zeros((1, 16, 16, 1), "float32")
    x_high = np.arange(4096, dtype="float32").reshape(1, 64, 64, 1)
    attention = np.zeros((1, 16, 16), "float32")
    attention[0, 0, 0] = 1
    bad = SamplePatches(1, 4, receptive_field=20, mode="topk")
    with pytest.raises(ValueError, match="receptive_field=20 must be smaller than x_low's spatial sizes"):
        bad([x_low, x_high, attention])
    with pytest.raises(tf.errors.InvalidArgumentError, match="receptive_field=20 must be smaller"):
        tf.function(lambda a, b, c: bad([a, b, c]), input_signature=spec)(x_low, x_high, attention)
    good = SamplePatches(1, 4, receptive_field=3, mode="topk")
    traced = tf.function(lambda a, b, c: good([a, b, c]), input_signature=spec)(x_low, x_high, attention)
    np.testing.assert_array_equal(traced[0].numpy(), good([x_low, x_high, attention])[0].numpy())
