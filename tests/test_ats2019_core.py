"""The 2019 low-level API re-expressed as tests: ats.core.sampling, ats.core.expectation, ats.data, ats.core.builder."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import ats.ops  # noqa: E402
from ats.core.builder import ATSBuilder, ATSOutput  # noqa: E402
from ats.core.expectation import Expected, expected  # noqa: E402
from ats.core.sampling import Sample, sample  # noqa: E402
from ats.data.base import MultiResolutionBatch  # noqa: E402
from ats.data.from_tensors import FromTensors, level_offsets  # noqa: E402
from ats.utils.layers import SampleSoftmax  # noqa: E402

from .enumeration import all_draws, expect_at  # noqa: E402

L = keras.layers


# --- sampling --------------------------------------------------------------------


@pytest.mark.parametrize("replace", [True, False])
def test_sampled_attention_is_the_attention_at_the_samples(replace):
    x = np.random.default_rng(0).uniform(size=(10, 100))
    x /= x.sum(axis=1, keepdims=True)
    samples, sampled = sample(10, tf.constant(x), (100,), replace=replace, seed=1)
    s, sa = samples.numpy(), sampled.numpy()
    assert s.shape == (10, 10, 1) and s.dtype == np.int32
    for i, row in enumerate(x):
        np.testing.assert_array_equal(sa[i], row[s[i, :, 0]])
        if not replace:
            assert len(set(s[i, :, 0])) == 10


def test_one_hot_attention():
    x = np.zeros((1, 100))
    x[0, 0] = 1
    s, _ = sample(10, tf.constant(x), (100,), replace=True, seed=2)
    assert (s.numpy() == 0).all()
    try:
        s, sa = sample(10, tf.constant(x), (100,), replace=False, seed=2)
    except (ValueError, tf.errors.InvalidArgumentError) as error:
        if "fewer than n" in str(error):
            pytest.skip("atskern's short-row rule (R1: zero-probability fillers) is not merged yet")
        raise
    s = s.numpy()[0, :, 0]
    assert s[0] == 0 and (s[1:] != 0).all()
    # R1: the fillers are the zero-weight cells of lowest index, each with probability 0
    assert s[1:].tolist() == list(range(1, 10)) and (sa.numpy()[0, 1:] == 0).all()


def test_uniform_attention_counts_within_four_standard_errors():
    x = np.full((1, 10), 0.1)
    s, _ = sample(10000, tf.constant(x), (10,), replace=True, seed=3)
    counts = np.array([Counter(s.numpy()[0, :, 0].tolist())[i] for i in range(10)])
    sd = np.sqrt(10000 * 0.1 * 0.9)
    assert np.abs(counts - 1000).max() < 4 * sd
    s, _ = sample(10, tf.constant(x), (10,), replace=False, seed=3)
    assert sorted(s.numpy()[0, :, 0].tolist()) == list(range(10))


@pytest.mark.parametrize("replace", [True, False])
def test_sampling_2d_returns_grid_coordinates(replace):
    x = np.random.default_rng(4).uniform(size=(1, 10, 10))
    x /= x.sum()
    s, sa = sample(10, tf.constant(x), (10, 10), replace=replace, seed=5)
    assert s.shape == (1, 10, 2)
    np.testing.assert_array_equal(sa.numpy()[0], x[0, s.numpy()[0, :, 0], s.numpy()[0, :, 1]])


def test_use_logits_draws_from_the_softmax_and_returns_logits():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(3, 5, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=(1, 2), keepdims=True)
    s_logits, sa_logits = sample(4, tf.constant(logits), (5, 4), use_logits=True, seed=7)
    s_probs, _ = sample(4, tf.constant(probs), (5, 4), seed=7)
    np.testing.assert_array_equal(s_logits.numpy(), s_probs.numpy())  # same key, same distribution
    for b in range(3):
        np.testing.assert_array_equal(sa_logits.numpy()[b], logits[b, s_logits.numpy()[b, :, 0], s_logits.numpy()[b, :, 1]])


def test_sampled_attention_carries_the_gradient():
    x = tf.constant(np.full((2, 6), 1 / 6))
    with tf.GradientTape() as tape:
        tape.watch(x)
        s, sa = sample(3, x, (6,), seed=8)
        total = tf.reduce_sum(sa)
    grad = tape.gradient(total, x).numpy()
    want = np.zeros((2, 6))
    for b in range(2):
        want[b, s.numpy()[b, :, 0]] = 1
    np.testing.assert_array_equal(grad, want)


def test_sample_space_must_be_the_attention_grid():
    with pytest.raises(ValueError, match=r"sample_space \(5,\) must equal the attention's grid shape \(6,\)"):
        sample(2, tf.ones((1, 6)), (5,))
    with pytest.raises(ValueError, match="must be the attention's grid shape"):
        sample(2, tf.ones((1, 6)), (2, 3))


def test_sample_on_symbolic_tensors_builds_a_layer():
    attention = keras.Input((4, 5))
    samples, sampled = sample(3, attention, (4, 5))
    assert tuple(samples.shape) == (None, 3, 2) and tuple(sampled.shape) == (None, 3)
    model = keras.Model(attention, [samples, sampled])
    x = np.random.default_rng(9).uniform(size=(2, 4, 5)).astype(np.float32)
    s, sa = model.predict(x, verbose=0)
    for b in range(2):
        np.testing.assert_array_equal(sa[b], x[b, s[b, :, 0], s[b, :, 1]])
    assert Sample.from_config(model.layers[-1].get_config()).n_samples == 3


# --- expectation: exact enumeration of every ordered draw -----------------------------


def _run_expected(a_rows, f_rows, g, replace, weights=None):
    a = tf.constant(a_rows)
    f = tf.constant(f_rows)
    with tf.GradientTape() as tape:
        tape.watch([a, f])
        value = expected(a, f, replace=replace, weights=None if weights is None else tf.constant(weights))
        total = tf.reduce_sum(value * g)
    grad_a, grad_f = tape.gradient(total, [a, f])
    return value.numpy(), grad_a.numpy(), grad_f.numpy()


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("weights", ["default", "fixed"])
def test_expected_is_unbiased_by_enumeration(replace, weights):
    rng = np.random.default_rng(10)
    K, n, F = 5, 3, 2
    a = rng.uniform(0.2, 1.0, size=K)
    a /= a.sum()
    f = rng.normal(size=(K, F))
    g = rng.normal(size=F)
    seqs, p = all_draws(a, n, replace)
    w = None if weights == "default" else np.tile([0.5, 0.3, 0.7], (len(seqs), 1))  # sums to 1.5
    total_w = 1.0 if w is None else 1.5
    value, grad_a, grad_f = _run_expected(a[seqs], f[seqs], g, replace, w)
    np.testing.assert_allclose(p @ value, total_w * (a @ f), rtol=0, atol=1e-12)
    np.testing.assert_allclose(expect_at(seqs, p[:, None] * grad_a, K), total_w * (f @ g), rtol=0, atol=1e-12)
    np.testing.assert_allclose(expect_at(seqs, p[:, None, None] * grad_f, K), total_w * a[:, None] * g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("replace", [True, False])
def test_uniform_weights_equal_the_default_estimator(replace):
    rng = np.random.default_rng(11)
    a = rng.uniform(0.01, 0.2, size=(4, 5))
    f = rng.normal(size=(4, 5, 3))
    g = rng.normal(size=(4, 3))
    default = _run_expected(a, f, g, replace)
    uniform = _run_expected(a, f, g, replace, np.full((4, 5), 0.2))
    for x, y in zip(default, uniform):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)
    ops_value = ats.ops.expectation(tf.constant(f), tf.constant(a), replace=replace).numpy()
    np.testing.assert_allclose(default[0], ops_value, rtol=1e-12)


def test_custom_weights_coefficients_match_direct_formula():
    # without replacement: c_k = w_k pm_k + a_k sum_{j>k} w_j ; s_k = w_k pm_k / a_k + sum_{j>k} w_j
    a = np.array([[0.1, 0.3, 0.2]])
    w = np.array([[0.2, 0.5, 0.3]])
    f = np.eye(3)[None]
    g = np.array([[1.0, 2.0, 3.0]])
    value, grad_a, grad_f = _run_expected(a, f, g, False, w)
    pm = np.array([1.0, 0.9, 0.6])
    later = np.array([0.8, 0.3, 0.0])
    c = w[0] * pm + a[0] * later
    np.testing.assert_allclose(value[0], c, rtol=1e-14)
    np.testing.assert_allclose(grad_f[0], c[:, None] * g, rtol=1e-14)
    np.testing.assert_allclose(grad_a[0], (w[0] * pm / a[0] + later) * g[0], rtol=1e-14)


def test_zero_probability_sample_contributes_nothing():
    a = np.array([[0.6, 0.0]])
    f = np.array([[[1.0], [5.0]]])
    value, grad_a, grad_f = _run_expected(a, f, np.ones((1, 1)), False, np.array([[0.5, 0.5]]))
    assert np.isfinite(grad_a).all() and grad_a[0, 1] == 0 and grad_f[0, 1, 0] == 0
    np.testing.assert_allclose(value, [[0.5 * 1.0 + 0.5 * 0.6 * 1.0]])  # F_1 = a_0 f_0 + 0 * f_1


def test_expected_validates_and_works_on_symbolic_tensors():
    with pytest.raises(ValueError, match="weights must have attention's shape"):
        expected(tf.ones((2, 3)), tf.ones((2, 3, 4)), weights=tf.ones((2, 4)))
    att, feats, w = keras.Input((3,)), keras.Input((3, 4)), keras.Input((3,))
    out = expected(att, feats, replace=True, weights=w)
    assert tuple(out.shape) == (None, 4)
    model = keras.Model([att, feats, w], out)
    rng = np.random.default_rng(12)
    a, f, wv = rng.uniform(size=(2, 3)), rng.normal(size=(2, 3, 4)), rng.uniform(size=(2, 3))
    np.testing.assert_allclose(model.predict([a, f, wv], verbose=0), np.einsum("bk,bkf->bf", wv, f), rtol=1e-5)
    assert Expected.from_config(model.layers[-1].get_config()).replace is True


# --- ats.data.FromTensors ----------------------------------------------------------


def _patches(x_high, x_low, samples, offsets, sample_space, previous, size, fromlevel, tolevel):
    batch = FromTensors([tf.constant(x_low), tf.constant(x_high)], None)
    patches, starts = batch.patches(tf.constant(samples), tf.constant(offsets), sample_space, previous, size,
                                    fromlevel, tolevel)
    return patches.numpy(), starts.numpy()


def _zi(*shape):
    return np.zeros(shape, np.int32)


def test_from_tensors_2019_cases():
    rng = np.random.default_rng(13)
    x_high = rng.uniform(size=(2, 1000, 1000, 3)).astype(np.float32)
    x_low = rng.uniform(size=(2, 100, 100, 3)).astype(np.float32)
    # the whole low image from one sample of a 1x1 space
    p, _ = _patches(x_high, x_low, _zi(2, 1, 2), _zi(2, 1, 2), (1, 1), [100, 100], [100, 100], 0, 0)
    np.testing.assert_array_equal(p[:, 0], x_low)
    # cell 12 of 25 covers high pixels 480..520: its 50x50 patch starts at 475
    p, starts = _patches(x_high, x_low, np.full((2, 1, 2), 12.0, np.float32), _zi(2, 1, 2), (25, 25), [100, 100],
                         [50, 50], 0, 1)
    np.testing.assert_array_equal(p[:, 0], x_high[:, 475:525, 475:525])
    assert (starts == 475).all()
    # cell 0 of 25: centre 20, start -5, the first 5 rows and columns are outside
    p, _ = _patches(x_high, x_low, _zi(2, 1, 2), _zi(2, 1, 2), (25, 25), [100, 100], [50, 50], 0, 1)
    np.testing.assert_array_equal(p[:, 0, 5:, 5:], x_high[:, :45, :45])
    assert (p[:, 0, :5, :5] == 0).all()
    # cell 0 of 100: centre 5, start -20
    p, _ = _patches(x_high, x_low, _zi(2, 1, 2), _zi(2, 1, 2), (100, 100), [100, 100], [50, 50], 0, 1)
    np.testing.assert_array_equal(p[:, 0, 20:, 20:], x_high[:, :30, :30])
    assert (p[:, 0, :20, :20] == 0).all()
    # within the high level itself: a patch centred on the pixel
    p, _ = _patches(x_high, x_low, np.full((2, 1, 2), 55, np.int32), _zi(2, 1, 2), (1000, 1000), [1000, 1000],
                    [50, 50], 1, 1)
    np.testing.assert_array_equal(p[:, 0], x_high[:, 30:80, 30:80])


def _fraction_start(s, offset, space, prev, size, src, dst):
    centre = Fraction(offset) * Fraction(dst, src) + (s + Fraction(1, 2)) * Fraction(prev * dst, src * space)
    return round(centre - Fraction(size, 2))  # Python rounds Fractions half to even


@settings(max_examples=60, deadline=None)
@given(
    low=st.integers(4, 60),
    rf_frac=st.floats(0, 0.49),
    ratio=st.integers(1, 8),
    extra=st.integers(0, 5),
    grid_frac=st.floats(0.01, 1),
    size_frac=st.floats(0, 1),
    data=st.data(),
)
def test_level_offsets_are_exact_and_match_patch_offsets(low, rf_frac, ratio, extra, grid_frac, size_frac, data):
    rf = int(rf_frac * low)
    high = low * ratio + extra
    grid = max(1, int(grid_frac * (low - rf)))
    size = max(1, int(size_frac * high))
    s = np.array(data.draw(st.lists(st.integers(0, grid - 1), min_size=1, max_size=6))).reshape(1, -1, 1)
    starts = level_offsets(s, np.full(s.shape, rf / 2), [grid], [low - rf], [size], [low], [high]).numpy()
    want = [_fraction_start(int(v), Fraction(rf, 2), grid, low - rf, size, low, high) for v in s.ravel()]
    assert starts.ravel().tolist() == want
    # the same mapping as SamplePatches' (margin = rf / 2 / low), up to float margins beside exact ties
    mapped = ats.ops.patch_offsets(s.astype(np.int32), [grid], [high], size, margin=rf / 2 / low).numpy()
    assert np.abs(mapped.ravel() - np.array(want)).max() <= 1
    if rf == 0:
        np.testing.assert_array_equal(mapped.ravel(), want)


def test_level_offsets_round_exact_ties_half_to_even():
    # prev * to / (from * G) = 3 pixels per cell: centres 1.5, 4.5, 7.5, ...; a 2-pixel patch starts at c - 1
    starts = level_offsets(np.arange(4).reshape(1, 4, 1), np.zeros((1, 4, 1)), [4], [12], [2], [12], [12]).numpy()
    assert starts.ravel().tolist() == [0, 4, 6, 10]  # rint of 0.5, 3.5, 6.5, 9.5, half to even


def test_from_tensors_symbolic_and_interface():
    x_low, x_high = keras.Input((10, 10, 1)), keras.Input((40, 40, 1))
    samples = keras.Input((2, 2), dtype="int32")
    batch = FromTensors([x_low, x_high], "targets")
    assert batch.inputs() == [] and batch.targets() == "targets" and batch.data(1) is x_high
    patches, starts = batch.patches(samples, keras.ops.zeros_like(samples), (5, 5), [10, 10], [8, 8], 0, 1)
    assert tuple(patches.shape) == (None, 2, 8, 8, 1) and tuple(starts.shape) == (None, 2, 2)
    model = keras.Model([x_low, x_high, samples], [patches, starts])
    high = np.arange(40 * 40, dtype=np.float32).reshape(1, 40, 40, 1)
    p, st = model.predict([high[:, ::4, ::4], high, np.array([[[2, 2], [0, 4]]], np.int32)], verbose=0)
    assert st.tolist() == [[[16, 16], [0, 32]]]  # centres 20 and 4, 36: starts 16, 0, 32
    np.testing.assert_array_equal(p[0, 0], high[0, 16:24, 16:24])
    with pytest.raises(NotImplementedError, match="must implement patches"):
        MultiResolutionBatch().patches(None, None, None, None, None, 0, 1)


# --- ats.core.builder -----------------------------------------------------------------


SMALL, LARGE = (15, 15, 3), (100, 100, 3)
CONV = dict(kernel_size=3, padding="same", activation="relu")


def _attention():
    return keras.Sequential([L.Input(SMALL), L.Conv2D(4, **CONV), L.MaxPooling2D(), L.Conv2D(1, 3, padding="same"),
                             SampleSoftmax(squeeze_channels=True)])


def _feature(out=16):
    return keras.Sequential([L.Input(SMALL), L.Conv2D(4, **CONV), L.MaxPooling2D(), L.Flatten(), L.Dense(out)])


def test_builder_builds_a_keras_model():
    x_full, x_small = L.Input(LARGE), L.Input(SMALL)
    result = (ATSBuilder().from_tensors([x_small, x_full], None).attention(_attention()).feature(_feature())
              .patch_size(SMALL[:2]).n_patches(10).sample_without_replacement().get())
    assert isinstance(result, ATSOutput)
    inputs, outputs, targets, attention, patches = result
    assert inputs == [] and targets is None
    assert tuple(outputs.shape) == (None, 16) and tuple(attention.shape) == (None, 7, 7)
    assert tuple(patches.shape) == (None, 10, 15, 15, 3)
    model = keras.Model([x_full, x_small], [outputs, patches])
    rng = np.random.default_rng(15)
    out, p = model.predict([rng.uniform(size=(2, *LARGE)), rng.uniform(size=(2, *SMALL))], verbose=0)
    assert out.shape == (2, 16) and np.isfinite(out).all() and p.shape == (2, 10, 15, 15, 3)


def test_builder_eagerly_with_replacement_and_receptive_field():
    rng = np.random.default_rng(16)
    x_small = tf.constant(rng.uniform(size=(2, *SMALL)), tf.float32)
    x_full = tf.constant(rng.uniform(size=(2, *LARGE)), tf.float32)
    result = (ATSBuilder().from_tensors([x_small, x_full], "y").attention(_attention()).feature(_feature(5))
              .attention_receptive_field(2).patch_size((15, 15)).n_patches(30).sample_with(replacement=True).get())
    assert result.outputs.shape == (2, 5) and result.patches.shape == (2, 30, 15, 15, 3) and result.targets == "y"


def test_builder_says_what_is_missing():
    with pytest.raises(ValueError, match="needs feature, patch_size to be set first"):
        ATSBuilder().from_tensors([tf.ones((1, 4, 4, 1))] * 2, None).attention(lambda x: x).n_patches(1).get()
    with pytest.raises(ValueError, match="receptive_field must be a non-negative integer"):
        ATSBuilder().attention_receptive_field(-1)
    unknown = [L.Input((None, None, 3)), L.Input((None, None, 3))]  # a TypeError from `None - rf` before
    with pytest.raises(ValueError, match=r"needs the spatial sizes of level 0 .* shape \(None, None, None, 3\)"):
        (ATSBuilder().from_tensors(unknown, None).attention(_attention()).feature(_feature()).patch_size((8, 8))
         .n_patches(2).get())


class InputsBatch(MultiResolutionBatch):
    """A MultiResolutionBatch that creates its own keras.Input levels (2019's placeholders, in Keras 3 terms)."""

    def __init__(self):
        self.levels = [L.Input(SMALL, name="low"), L.Input(LARGE, name="high")]
        self._inner = FromTensors(self.levels, None)

    def inputs(self):
        return list(self.levels)

    def targets(self):
        return None

    def data(self, level):
        return self.levels[level]

    def patches(self, *args):
        return self._inner.patches(*args)


def test_builder_from_a_batch_that_owns_its_inputs():
    batch = InputsBatch()
    result = (ATSBuilder().from_batch(batch).attention(_attention()).feature(_feature(4)).patch_size((15, 15))
              .n_patches(2).get())
    model = keras.Model(result.inputs, result.outputs)  # the batch's inputs are the model's inputs
    assert [t.name for t in model.inputs] == ["low", "high"]
    rng = np.random.default_rng(17)
    assert model.predict([rng.uniform(size=(1, *SMALL)), rng.uniform(size=(1, *LARGE))], verbose=0).shape == (1, 4)


def test_flags_must_be_true_or_false():
    """README: flags that are not True/False are errors; these took ``bool(...)`` (the string "False" was True:
    20 draws with replacement from 16 cells), and the builder took only ``is True`` (``np.True_`` sampled without
    replacement)."""
    from ats.core import attention_sampling
    from ats.core.sampling import sample
    from ats.utils.layers import ImagePan, ResizeImages, SampleSoftmax

    attention = np.full((1, 4, 4), 1 / 16, np.float32)
    probs, features = np.array([[0.5, 0.25]], np.float32), np.ones((1, 2, 4), np.float32)
    calls = {
        "replace": [lambda: sample(3, attention, (4, 4), replace="False"),
                    lambda: expected(probs, features, replace="False")],
        "use_logits": [lambda: sample(3, attention, (4, 4), use_logits=1)],
        "squeeze_channels": [lambda: SampleSoftmax(squeeze_channels="False")],
        "vertically": [lambda: ImagePan(vertically="False")],
        "antialias": [lambda: ResizeImages((2, 2), antialias="False")],
        "deterministic": [lambda: attention_sampling(None, None, deterministic="False")],
        "replacement": [lambda: ATSBuilder().sample_with(replacement=1)],
    }
    for name, makes in calls.items():
        for make in makes:
            with pytest.raises(TypeError, match=f"{name} must be True or False"):
                make()
    assert ATSBuilder().sample_with(replacement=np.bool_(True))._sample_with_replacement is True
    samples, _ = sample(20, attention, (4, 4), replace=np.bool_(True))
    assert tuple(samples.shape) == (1, 20, 2)


def test_sizes_and_counts_are_integers_not_truncated():
    from ats.keras.core import BatchToPatches
    from ats.utils.layers import ResizeImages

    for size in ((2.7, 3), "ab", (2, 0)):  # (2.7, 3) was (2, 3), "ab" failed in int()
        with pytest.raises(ValueError, match=r"size must be \(height, width\) with positive integer entries"):
            ResizeImages(size)
    assert ResizeImages((np.int64(2), 3)).size == (2, 3)
    with pytest.raises(ValueError, match="n_patches must be a positive integer, got 2.5"):
        BatchToPatches(2.5)  # was 2
    for bad in (0, 2.5):  # ATSBuilder().n_patches(0) failed in get(), naming sample()'s n_samples
        with pytest.raises(ValueError, match=f"n_patches must be a positive integer, got {bad}"):
            ATSBuilder().n_patches(bad)
