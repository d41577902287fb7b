"""Checks of the ``ats.keras`` layers on one Keras backend, run in a fresh process by tests/test_keras_backends.py.

``python -m tests.keras_backend_checks COMMAND DIR`` with ``KERAS_BACKEND`` set (Keras fixes its backend
at import). Each command prints one JSON line ``RESULT {...}``: check name -> "ok" or the failure's text,
so the calling test can report every failed check by name. Commands:

- ``main DIR``: draws against atskern, fresh unseeded draws, Expectation gradients against
  ``atskern.expectation_grad``, argument errors, the 2019 quick-start (fit, predict), jitted training
  (TF ``jit_compile=True``, JAX's jitted steps), and a small model saved to ``DIR/<backend>.keras``
  with its predictions in ``DIR/<backend>.npy``;
- ``load DIR``: loads every other backend's file from ``DIR`` and compares its predictions;
- ``toy DIR``: the toy task that can only be learned by attending to the right place.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras import layers as L  # noqa: E402
from keras import ops  # noqa: E402

import atskern  # noqa: E402
from ats.keras import Expectation, SamplePatches, attention_sampling  # noqa: E402
from ats.keras import _keys  # noqa: E402
from ats.keras.functions import Expected, expected  # noqa: E402
from ats.keras.layers import SampleSoftmax  # noqa: E402
from ats.keras.regularizers import multinomial_entropy  # noqa: E402
from ats.keras.backends import ops as backend_ops  # noqa: E402

from tests.keras_toy import learn_toy_task  # noqa: E402

BACKEND = keras.backend.backend()
BACKENDS = ("tensorflow", "torch", "jax")




def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def random_attention(rng, shape):
    logits = rng.normal(size=shape)
    p = np.exp(logits - logits.max())
    return (p / p.reshape(shape[0], -1).sum(axis=1).reshape((-1,) + (1,) * (len(shape) - 1))).astype("float32")


# --- checks ----------------------------------------------------------------------------------------------

def check_draws_equal_atskern():
    rng = np.random.default_rng(0)
    att = random_attention(rng, (3, 6, 7))
    x_high = rng.uniform(size=(3, 24, 28, 2)).astype("float32")
    x_low = x_high[:, ::4, ::4]
    for replace in (False, True):
        layer = SamplePatches(5, (3, 4), seed=2**40 + 7, replace=replace, fill=-1)
        patches, sampled = layer([x_low, x_high, att])
        key = _keys.seeded_key(2**40 + 7, att)
        words = [int(w) for w in numpy(layer.sampling_key(att))]  # a NumPy map, as the call takes
        assert words[0] + 2**32 * words[1] == key, (words, key)
        indices, probs = atskern.sample(att, 5, replace=replace, seed=key)
        np.testing.assert_allclose(numpy(sampled), probs, rtol=1e-6)
        offsets = atskern.patch_offsets(indices, (6, 7), (24, 28), (3, 4))
        np.testing.assert_array_equal(numpy(patches), atskern.extract_patches(x_high, offsets, (3, 4), fill=-1))
        # and patch by patch by slicing, an independent computation of the gather
        b, k = 1, 2
        r, c = offsets[b, k]
        padded = np.pad(x_high[b], ((4, 4), (4, 4), (0, 0)), constant_values=-1)
        np.testing.assert_array_equal(numpy(patches)[b, k], padded[r + 4 : r + 7, c + 4 : c + 8])
    # the backend's op for explicit key words draws atskern.sample(seed=k0 + 2**32 k1)
    be = backend_ops()
    words = be.key_words(ops.convert_to_tensor(np.array([123456789, 987654321], dtype=np.int64)))
    indices, _ = be.sample(ops.convert_to_tensor(att), 4, replace=False, key=words, deterministic=False)
    want, _ = atskern.sample(att, 4, seed=123456789 + 2**32 * 987654321)
    np.testing.assert_array_equal(numpy(indices), want)
    # the in-graph fingerprint is the NumPy reference's
    assert tuple(int(v) for v in numpy(be.fingerprint(ops.convert_to_tensor(att)))) == _keys.fingerprint(att)


def check_seeded_draws_under_jit_equal_atskern():
    """Compiled (TF jit_compile=True: ats.tf.xla; jax.jit), a seeded layer draws atskern's sample for its key."""
    if BACKEND == "torch":
        return "not applicable (Keras' torch backend runs eagerly)"
    rng = np.random.default_rng(3)
    att = random_attention(rng, (2, 5, 6))
    x_high = rng.uniform(size=(2, 20, 24, 1)).astype("float32")
    layer = SamplePatches(4, 3, seed=99, replace=False)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda a, b, c: layer([a, b, c]), jit_compile=True, autograph=False)
    else:
        import jax

        compiled = jax.jit(lambda a, b, c: layer([a, b, c]))
    patches, sampled = compiled(x_high[:, ::4, ::4], x_high, att)
    indices, probs = atskern.sample(att, 4, seed=_keys.seeded_key(99, att))
    np.testing.assert_allclose(numpy(sampled), probs, rtol=1e-6)
    offsets = atskern.patch_offsets(indices, (5, 6), (20, 24), (3, 3))
    np.testing.assert_array_equal(numpy(patches), atskern.extract_patches(x_high, offsets, (3, 3)))


def check_unseeded_draws_are_fresh():
    att = np.full((2, 8, 8), 1 / 64, "float32")
    x = np.random.default_rng(1).uniform(size=(2, 16, 16, 1)).astype("float32")
    layer = SamplePatches(5, 2)
    draws = {numpy(layer([x[:, ::2, ::2], x, att])[0]).tobytes() for _ in range(4)}
    assert len(draws) > 1, "four unseeded calls drew the same patches"
    seeded = SamplePatches(5, 2, seed=3)
    assert len({numpy(seeded([x[:, ::2, ::2], x, att])[0]).tobytes() for _ in range(3)}) == 1


def _grads(layer, features, probs, upstream):
    """Gradients of <layer([features, probs]), upstream> with the backend's own autodiff."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        f, p = tf.constant(features), tf.constant(probs)
        with tf.GradientTape() as tape:
            tape.watch([f, p])
            value = tf.reduce_sum(layer([f, p]) * upstream)
        return [g.numpy() for g in tape.gradient(value, [f, p])]
    if BACKEND == "torch":
        import torch

        f = torch.tensor(features, requires_grad=True)
        p = torch.tensor(probs, requires_grad=True)
        layer([f, p]).backward(torch.tensor(upstream))
        return [f.grad.numpy(), p.grad.numpy()]
    import jax

    _, vjp = jax.vjp(lambda f, p: layer([f, p]), features, probs)
    return [np.asarray(g) for g in vjp(upstream)]


def check_expectation_gradients_equal_atskern():
    rng = np.random.default_rng(2)
    for replace in (False, True):
        att = random_attention(rng, (3, 10))
        _, probs = atskern.sample(att, 4, replace=replace, seed=5)
        probs = probs.astype("float32")
        features = rng.normal(size=(3, 4, 6)).astype("float32")
        upstream = rng.normal(size=(3, 6)).astype("float32")
        layer = Expectation(replace=replace)
        np.testing.assert_allclose(numpy(layer([features, probs])), atskern.expectation(features, probs, replace=replace), rtol=1e-5, atol=1e-6)
        grad_features, grad_probs = _grads(layer, features, probs, upstream)
        want_probs, want_features = atskern.expectation_grad(upstream, features, probs, replace=replace)
        np.testing.assert_allclose(grad_features, want_features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_probs, want_probs, rtol=1e-5, atol=1e-6)
        # independently, without replacement: w (pm_k / a_k + n - 1 - k) <g, f_k>
        if not replace:
            p64 = probs.astype(np.float64)
            pm = 1 - (np.cumsum(p64, axis=1) - p64)
            inner = np.einsum("bf,bkf->bk", upstream.astype(np.float64), features.astype(np.float64))
            direct = (pm / p64 + (3 - np.arange(4))) / 4 * inner
            np.testing.assert_allclose(grad_probs, direct, rtol=1e-4, atol=1e-6)


def check_expected_layer_keeps_dtypes():
    """The 2019 Expected layer autocast like a plain layer: float16 probabilities were checked with float32's
    tolerance (a valid draw [0.3, 0.7] refused), and under mixed_float16 its float32 attention became float16 (the
    gradient at a probability of 1e-5 was inf); Keras' torch backend summed float64 weights in float32 (7% off)."""
    value = numpy(Expected()([np.array([[0.3, 0.7]], np.float16), np.ones((1, 2, 2), np.float16)]))
    np.testing.assert_allclose(value.astype(np.float64), 1.0, rtol=1e-3)
    probs = np.array([[1e-5, 0.6, 0.39999]], np.float32)
    features = np.ones((1, 3, 2), np.float32)
    upstream = np.ones((1, 2), np.float32)
    want = atskern.expectation_grad(upstream, features, probs)[0]
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = Expected()
        got = _grads(lambda inputs: layer([inputs[1], inputs[0]]), features, probs, upstream)[1]
    finally:
        keras.config.set_dtype_policy(policy)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    if backend_ops().x64():
        draw = np.array([[0.6807046910206214, 0.3192944988699695, 4.555825375221708e-07]])
        last = np.array([[[0.0], [0.0], [1.0]]])
        got = numpy(expected(ops.convert_to_tensor(draw, "float64"), ops.convert_to_tensor(last, "float64"),
                             weights=ops.convert_to_tensor(np.full((1, 3), 1 / 3), "float64")))
        np.testing.assert_allclose(got, atskern.expectation(last, draw), rtol=1e-9)


def check_weighted_estimator_keeps_a_tiny_last_draw():
    """The 2019 ``expected`` with weights: the last draw holds 1e-20 of the mass, so its mass left is the mass still
    to come (a reversed cumulative sum; the row sum minus a cumulative sum cancels it to noise on JAX and torch);
    and a late draw whose ``1 - sum`` float32 cannot resolve (JAX without x64)."""
    from ats.keras import functions

    for rows in (16, 64, 256):
        rng = np.random.default_rng(rows)
        probs = rng.random((1, rows))
        probs[0, :-1] /= probs[0, :-1].sum()
        probs[0, -1] = 1e-20
        probs = probs.astype("float32")
        features = np.ones((1, rows, 1), "float32")
        weights = ops.convert_to_tensor(np.full((1, rows), 1.0 / rows, "float32"))
        estimate = lambda fp: functions.expected(fp[1], fp[0], weights=weights)  # noqa: E731
        _, grad_probs = _grads(estimate, features, probs, np.ones((1, 1), "float32"))
        want, _ = atskern.expectation_grad(np.ones((1, 1), np.float32), features, probs)
        np.testing.assert_allclose(grad_probs[0, -1], want[0, -1], rtol=1e-5)
    # a last draw of 1.1e-8 with about 6e-7 of the mass left before it: on JAX without x64 the float32 ``1 - sum``
    # kept one digit (its attention gradient 0.125 for atskern's 6.585), with or without weights
    probs = np.array([[0.1788238286972046, 0.441189706325531, 0.08380994945764542, 0.04159441590309143,
                       0.084211565554142, 0.03532977029681206, 0.13504016399383545, 1.1385423270837691e-08]], "float32")
    features = np.ones((1, 8, 1), "float32")
    want, _ = atskern.expectation_grad(np.ones((1, 1), np.float32), features, probs)
    weights = ops.convert_to_tensor(np.full((1, 8), 1.0 / 8, "float32"))
    for estimate in (lambda fp: functions.expected(fp[1], fp[0]),
                     lambda fp: functions.expected(fp[1], fp[0], weights=weights)):
        _, grad_probs = _grads(estimate, features, probs, np.ones((1, 1), "float32"))
        np.testing.assert_allclose(grad_probs, want, rtol=1e-5)



def check_sample_softmax_takes_16_bit_maps_in_float32():
    """SampleSoftmax under mixed_float16: the float16 sum of 65536 exponentials overflowed (an all-zero map on
    TensorFlow and JAX, then "no positive weight"), and ``smooth / N`` was 0 (N cast to float16 is inf), on every
    backend. 16-bit logits are now normalized in float32, and float32 logits are not cast to float16 first."""
    policy = keras.config.dtype_policy()
    try:
        for name in ("mixed_float16", "mixed_bfloat16"):
            keras.config.set_dtype_policy(name)
            low = name.removeprefix("mixed_")
            peaked = np.zeros((1, 256, 256, 1), low)
            peaked[0, 3, 5, 0] = 30
            for logits, smallest in ((np.zeros((1, 256, 256, 1), low), 1 / 65536), (peaked, 0.5 / 65536)):
                p = SampleSoftmax(squeeze_channels=True, smooth=0.5)(ops.convert_to_tensor(logits))
                assert keras.backend.standardize_dtype(p.dtype) == "float32", p.dtype
                p = numpy(p).astype(np.float64)
                np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
                np.testing.assert_allclose(p.min(), smallest, rtol=1e-5)
            close = ops.convert_to_tensor(np.array([[0.0, 1e-4]], np.float32))  # equal once cast to float16
            p = numpy(SampleSoftmax()(close))
            assert p.dtype == np.float32 and p[0, 1] > p[0, 0], p
    finally:
        keras.config.set_dtype_policy(policy)

def check_logits_keys_and_mixed_precision():
    """Seeded use_logits keys fingerprint the logits as given (the backends' softmaxes differ by an ulp, and so did
    their keys); float64 maps whose values are float32 subnormals fingerprint as NumPy rounds them (XLA's cast
    flushed them); under mixed_float16 the attention regularizer leaves the float32 attention alone (its autocast
    made it float16: NaN gradients) and the patches' symbolic dtype is the one call returns; a patch larger than
    x_high is refused when the model left the sizes to the data."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 12, 12)).astype("float32")
    x_high = rng.uniform(size=(2, 48, 48, 1)).astype("float32")
    layer = SamplePatches(6, 4, use_logits=True, seed=77)
    _, sampled = layer([x_high[:, ::4, ::4], x_high, logits])
    key = _keys.seeded_key(77, logits)
    weights = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    indices, _ = atskern.sample(weights / weights.sum(axis=(1, 2), keepdims=True), 6, seed=key)
    np.testing.assert_allclose(numpy(sampled), np.take_along_axis(logits.reshape(2, -1),
                                                                  indices[..., 0] * 12 + indices[..., 1], 1))
    tiny = np.array([[1e-40, 0.5, 3e-39, 0.25, -2e-45, 1.5e-45]], np.float64)
    assert tuple(int(v) for v in numpy(backend_ops().fingerprint(ops.convert_to_tensor(tiny)))) == \
        _keys.fingerprint(tiny)
    if BACKEND == "jax":  # float64 maps stay float64 only in JAX's 64-bit mode
        import jax

        with jax.enable_x64(True):
            words = backend_ops().fingerprint(jax.numpy.asarray(tiny))
            assert str(words.dtype) == "uint32" and tuple(int(v) for v in numpy(words)) == _keys.fingerprint(tiny)

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x_low, high = L.Input((8, 8, 1)), L.Input((32, 32, 1))
        attention = L.Reshape((8, 8))(L.Conv2D(1, 3, padding="same")(x_low))
        attention = SampleSoftmax(dtype="float32")(attention)
        features, att, patches = attention_sampling(
            lambda x: attention, keras.Sequential([L.Flatten(), L.Dense(3)]), patch_size=4, n_patches=3, seed=1,
            attention_regularizer=multinomial_entropy(0.01))([x_low, high])
        model = keras.Model([x_low, high], [features, att, patches])
        assert [str(t.dtype) for t in model.outputs] == ["float16", "float32", "float16"], model.outputs
        got = model([x_high[:, :32:4, :32:4], x_high[:, :32, :32]])
        assert [str(numpy(t).dtype) for t in got] == ["float16", "float32", "float16"], [t.dtype for t in got]
    finally:
        keras.mixed_precision.set_global_policy("float32")

    inputs = [L.Input((None, None, 1)), L.Input((None, None, 1)), L.Input((None, None))]
    free = keras.Model(inputs, SamplePatches(3, 8)(inputs))
    _raises("patch_size (8, 8) is larger than x_high's spatial shape (6, 6)", lambda: free.predict(
        [x_high[:, :3, :3], x_high[:, :6, :6], np.full((2, 3, 3), 1 / 9, np.float32)], verbose=0))


def _raises(match, fn):
    try:
        fn()
    except ValueError as error:
        assert match in str(error), f"ValueError {error!s} does not say {match!r}"
    else:
        raise AssertionError(f"no ValueError (expected one saying {match!r})")


def check_bad_input_gets_value_errors():
    _raises("n_patches must be a positive integer", lambda: SamplePatches(0, 2))
    _raises("mode must be one of", lambda: SamplePatches(2, 2, mode="best"))
    _raises("seed must be None or an int", lambda: SamplePatches(2, 2, seed=-1))
    _raises("x_high must be (batch, *spatial, channels)",
            lambda: SamplePatches(2, 2)([L.Input((4, 4, 4, 4, 1)), L.Input((8, 8, 8, 8, 1)), L.Input((4, 4, 4, 4))]))
    _raises("attention must be (batch, *grid)", lambda: SamplePatches(2, 2)([L.Input((4, 4, 1)), L.Input((8, 8, 1)), L.Input((4, 4, 1))]))
    _raises("patch_size (10, 10) is larger than x_high's spatial shape (8, 8)",
            lambda: SamplePatches(2, 10)([L.Input((4, 4, 1)), L.Input((8, 8, 1)), L.Input((4, 4))]))
    _raises("n_patches=17 is larger than the 16 positions",
            lambda: SamplePatches(17, 2)([L.Input((4, 4, 1)), L.Input((16, 16, 1)), L.Input((4, 4))]))
    _raises("patch_size must have 2 entries",
            lambda: SamplePatches(2, (2, 2, 2))([L.Input((4, 4, 1)), L.Input((8, 8, 1)), L.Input((4, 4))]))
    x = np.ones((2, 8, 8, 1), "float32")
    _raises("must share the batch size", lambda: SamplePatches(1, 2, seed=0)([x[:, ::2, ::2], x, np.ones((3, 4, 4), "float32") / 16]))
    _raises("Expectation needs features (B, n, ...) and sampled_attention (B, n)",
            lambda: Expectation()([np.ones((2, 3, 4), "float32"), np.ones((2, 3, 1), "float32")]))
    # eager calls on concrete maps: the backends' own messages, in the layer's terms
    low, high = np.zeros((1, 2, 2, 1), "float32"), np.zeros((1, 8, 8, 1), "float32")
    _raises("n_patches=5 is larger than the 4 positions", lambda: SamplePatches(5, 2)([low, high, np.ones((1, 2, 2),
                                                                                                      "float32")]))
    _raises("pass use_logits=True", lambda: SamplePatches(2, 2)([low, high, -np.ones((1, 2, 2), "float32")]))
    switched = SamplePatches(2, 2, mode="topk")  # no seed generator: an AttributeError on None once sampling
    switched.mode = "sample"
    _raises("unseeded sampling needs the seed generator", lambda: switched([low, high, np.ones((1, 2, 2), "float32")]))


def check_config_of_a_fraction_receptive_field():
    """A Fraction receptive field works in the layer, and its config is JSON (model.save raised 'Cannot serialize
    object 5/2 of type Fraction'): the same patches after a round trip through JSON."""
    layer = SamplePatches(3, 4, mode="topk", receptive_field=Fraction(5, 3))
    copy = SamplePatches.from_config(json.loads(json.dumps(layer.get_config())))
    rng = np.random.default_rng(2)
    x_high = rng.random((2, 40, 40, 1)).astype("float32")
    inputs = [x_high[:, ::4, ::4], x_high, rng.random((2, 10, 10)).astype("float32")]
    np.testing.assert_array_equal(numpy(layer(inputs)[0]), numpy(copy(inputs)[0]))


def quick_start(size=1500):
    """The README's Keras quick-start (2019 names)."""
    x_high = L.Input(shape=(size, size, 1))
    x_low = L.AveragePooling2D(pool_size=10)(x_high)
    attention = keras.Sequential([L.Conv2D(8, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same"),
                                  SampleSoftmax(squeeze_channels=True)])
    feature = keras.Sequential([L.Conv2D(32, 3, activation="relu"), L.GlobalMaxPooling2D()])
    regularizer = multinomial_entropy(0.01)
    features, attention, patches = attention_sampling(attention, feature, patch_size=(32, 32), n_patches=10,
                                                      attention_regularizer=regularizer)([x_low, x_high])
    y = L.Dense(10, activation="softmax")(features)
    return keras.Model(inputs=x_high, outputs=y)


def check_quick_start_fits_and_predicts():
    model = quick_start()
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 1500, 1500, 1)).astype("float32")
    history = model.fit(x, rng.integers(0, 10, 2), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.predict(x[:1], verbose=0).shape == (1, 10)


def check_jitted_training():
    """TF: model.compile(jit_compile=True) (sampling and gather as ats.tf.xla ops inside XLA); JAX: Keras'
    jitted steps (the default). Training changes the weights; unseeded draws change between jitted calls."""
    if BACKEND == "torch":
        return "not applicable (Keras' torch backend does not jit a model with jit_compile='auto')"
    model = quick_start(size=200)
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    assert model.jit_compile is True
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 200, 200, 1)).astype("float32")
    before = [numpy(w).copy() for w in model.trainable_weights]
    history = model.fit(x, rng.integers(0, 10, 4), batch_size=2, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(not np.array_equal(b, numpy(w)) for b, w in zip(before, model.trainable_weights) if b.ndim > 1)
    patches_model = keras.Model(model.inputs, [la for la in model.layers if isinstance(la, SamplePatches)][0].output[0])
    patches_model.compile(jit_compile=True)
    draws = {patches_model.predict(x[:1], verbose=0).tobytes() for _ in range(3)}
    assert len(draws) > 1, "jitted predict drew the same patches three times"


def small_model():
    """A small model saved and loaded across backends: mode="auto" takes the top-k in predict."""
    x_high = L.Input((32, 32, 1))
    x_low = L.AveragePooling2D(4)(x_high)
    attention = keras.Sequential([L.Conv2D(4, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same"),
                                  SampleSoftmax(squeeze_channels=True)])
    feature = keras.Sequential([L.Conv2D(5, 3, activation="relu"), L.GlobalMaxPooling2D()])
    regularizer = multinomial_entropy(0.01)
    features, _, _ = attention_sampling(attention, feature, patch_size=6, n_patches=3, mode="auto",
                                        attention_regularizer=regularizer)([x_low, x_high])
    return keras.Model(x_high, L.Dense(2)(features))


def small_inputs():
    return np.random.default_rng(9).uniform(size=(3, 32, 32, 1)).astype("float32")


def check_save(directory):
    keras.utils.set_random_seed(4)
    model = small_model()
    model.compile("adam", "mse")
    model.fit(small_inputs(), np.zeros((3, 2), "float32"), epochs=1, verbose=0)  # trained weights, a used seed generator
    model.save(directory / f"{BACKEND}.keras")
    np.save(directory / f"{BACKEND}.npy", model.predict(small_inputs(), verbose=0))


RELEASE = Path(__file__).resolve().parent / "data" / "keras_tf_only_release"


def check_files_of_the_tf_only_release_load():
    """.keras files saved by the TensorFlow-only ats.core (tests/data/keras_tf_only_release) load and predict
    as then (their SampleSoftmax is the 2019 helpers', registered by importing ats.keras.layers)."""
    x = np.random.default_rng(9).uniform(size=(3, 32, 32, 1)).astype("float32")
    for name in ("auto", "topk"):
        model = keras.models.load_model(RELEASE / f"{name}.keras")
        np.testing.assert_allclose(model.predict(x, verbose=0), np.load(RELEASE / f"{name}.npy"), rtol=1e-5, atol=1e-6)


def check_load(directory, source):
    model = keras.models.load_model(directory / f"{source}.keras")
    np.testing.assert_allclose(model.predict(small_inputs(), verbose=0), np.load(directory / f"{source}.npy"), rtol=1e-5, atol=1e-6)
    assert any(isinstance(layer, SamplePatches) for layer in model.layers)


# --- the toy task ----------------------------------------------------------------------------------------

def check_toy_task():
    """tests/test_ats_training.py's toy task and criteria (tests/keras_toy.py), on this backend."""
    regularizer = multinomial_entropy(0.001)
    first, last, steps, accuracy = learn_toy_task(attention_sampling, SampleSoftmax, regularizer)
    print(f"TOY {BACKEND}: loss {first:.3f} -> {last:.3f} in {steps} steps, test accuracy {accuracy:.3f}")


def run(checks):
    results = {}
    for name, fn in checks:
        try:
            note = fn()
            results[name] = "ok" if note is None else f"ok: {note}"
        except Exception:  # reported by name to the calling test
            results[name] = traceback.format_exc(limit=4)[-2500:]
    print("RESULT " + json.dumps(results))


def main(argv):
    command, directory = argv[0], Path(argv[1])
    if command == "main":
        run([
            ("draws_equal_atskern", check_draws_equal_atskern),
            ("seeded_draws_under_jit_equal_atskern", check_seeded_draws_under_jit_equal_atskern),
            ("unseeded_draws_are_fresh", check_unseeded_draws_are_fresh),
            ("expectation_gradients_equal_atskern", check_expectation_gradients_equal_atskern),
            ("weighted_estimator_keeps_a_tiny_last_draw", check_weighted_estimator_keeps_a_tiny_last_draw),
            ("expected_layer_keeps_dtypes", check_expected_layer_keeps_dtypes),
            ("bad_input_gets_value_errors", check_bad_input_gets_value_errors),
            ("config_of_a_fraction_receptive_field", check_config_of_a_fraction_receptive_field),
            ("sample_softmax_takes_16_bit_maps_in_float32", check_sample_softmax_takes_16_bit_maps_in_float32),
            ("logits_keys_and_mixed_precision", check_logits_keys_and_mixed_precision),
            ("quick_start_fits_and_predicts", check_quick_start_fits_and_predicts),
            ("jitted_training", check_jitted_training),
            ("files_of_the_tf_only_release_load", check_files_of_the_tf_only_release_load),
            ("save", lambda: check_save(directory)),
        ])
    elif command == "load":
        run([(f"load_{source}", lambda source=source: check_load(directory, source))
             for source in BACKENDS if source != BACKEND and (directory / f"{source}.keras").exists()])
    elif command == "toy":
        run([("toy_task", check_toy_task)])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
