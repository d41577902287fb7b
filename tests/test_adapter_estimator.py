"""The adapters' estimators follow rule R3 (issue 11, item 8): fillers (probs == 0) get coefficient 0 and
both gradients exactly 0, results equal atskern.expectation_grad and are unbiased by exact enumeration on
rows with zeros; impossible probs are refused; a model whose attention underflows keeps training."""

from __future__ import annotations

import math

import numpy as np
import pytest

import atskern

from .enumeration import all_draws, expect_at

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

from ats import ops  # noqa: E402
from ats.torch import functional as F  # noqa: E402


def tf_estimator(features, probs, grad, replace):
    f, p = tf.constant(features), tf.constant(probs)
    with tf.GradientTape() as tape:
        tape.watch([f, p])
        value = ops.expectation(f, p, replace=replace)
    grad_probs, grad_features = tape.gradient(value, [p, f], output_gradients=tf.constant(grad))
    return value.numpy(), grad_probs.numpy(), grad_features.numpy()


def torch_estimator(features, probs, grad, replace):
    f = torch.tensor(features, requires_grad=True)
    p = torch.tensor(probs, requires_grad=True)
    value = F.expectation(f, p, replace=replace)
    value.backward(torch.tensor(grad))
    return value.detach().numpy(), p.grad.numpy(), f.grad.numpy()


ESTIMATORS = {"tf": tf_estimator, "torch": torch_estimator}


def inputs_with_fillers(seed=3):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(8), size=3)[:, :5]
    probs[0, 3:] = 0.0  # a short row's fillers
    probs[2, 1] = 0.0  # an underflowed probability
    return rng.standard_normal((3, 5, 4)), probs, rng.standard_normal((3, 4))


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("front", ESTIMATORS)
def test_fillers_get_zero_weight_and_equal_atskern(front, replace):
    features, probs, grad = inputs_with_fillers()
    value, gp, gf = ESTIMATORS[front](features, probs, grad, replace)
    assert np.isfinite(gp).all() and np.isfinite(gf).all()
    assert (gp[0, 3:] == 0).all() and (gf[0, 3:] == 0).all() and gp[2, 1] == 0 and (gf[2, 1] == 0).all()
    np.testing.assert_allclose(value, atskern.expectation(features, probs, replace=replace), rtol=1e-12, atol=1e-14)
    want_gp, want_gf = atskern.expectation_grad(grad, features, probs, replace=replace)
    np.testing.assert_allclose(gp, want_gp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gf, want_gf, rtol=1e-12, atol=1e-14)
    changed = features.copy()
    changed[0, 3:], changed[2, 1] = 1e9, -1e9
    assert np.array_equal(ESTIMATORS[front](changed, probs, grad, replace)[0], value)


@pytest.mark.parametrize("front", ESTIMATORS)
@pytest.mark.parametrize("K", [3, 5])
def test_unbiased_with_zero_weights_by_enumeration(front, K):
    """Every ordered draw (fillers after the positive cells, R1) weighted by its exact probability."""
    for zeros in range(1, K):
        for n in range(1, K + 1):
            rng = np.random.default_rng(100 * K + 10 * zeros + n)
            a = rng.random(K) + 0.1
            a[rng.permutation(K)[:zeros]] = 0.0
            a /= a.sum()
            f, g = rng.standard_normal((K, 3)), rng.standard_normal(3)
            seqs, weight = all_draws(a, n, replace=False)
            value, gp, gf = ESTIMATORS[front](f[seqs], a[seqs], np.tile(g, (len(seqs), 1)), False)
            np.testing.assert_allclose([math.fsum(weight * value[:, c]) for c in range(3)], a @ f, atol=1e-12)
            np.testing.assert_allclose(expect_at(seqs, weight[:, None] * gp, K), np.where(a > 0, f @ g, 0.0),
                                       atol=1e-12)
            np.testing.assert_allclose(expect_at(seqs, weight[:, None, None] * gf, K), a[:, None] * g, atol=1e-12)


def test_impossible_probs_are_refused():
    features = np.zeros((1, 3, 2))
    bad = np.array([[0.9, 0.9, 0.9]])
    with pytest.raises(ValueError, match=r"probs row 0 sums to .* > 1"):
        ops.expectation(tf.constant(features), tf.constant(bad))
    with pytest.raises(ValueError, match=r"probs row 0 sums to .* > 1"):
        F.expectation(torch.tensor(features), torch.tensor(bad))
    for values in ([[0.5, -0.1, 0.2]], [[0.5, np.nan, 0.2]], [[1.5, 0.0, 0.0]]):
        with pytest.raises(ValueError, match=r"probs row 0"):
            ops.expectation(tf.constant(features), tf.constant(values), replace=True)
        with pytest.raises(ValueError, match=r"probs row 0"):
            F.expectation(torch.tensor(features), torch.tensor(values), replace=True)
    ops.expectation(tf.constant(features), tf.constant(bad), replace=True)  # with replacement: each in [0, 1]
    graph = tf.function(lambda f, p: ops.expectation(f, p))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"probs must be finite, in \[0, 1\]"):
        graph(tf.constant(features), tf.constant(bad))


# --- a model whose attention underflows keeps training (needs atskern.sample's fillers, R1) ----------


@pytest.mark.slow
def test_keras_model_with_underflowing_attention_fits_and_predicts():
    keras = pytest.importorskip("keras")
    from ats.core import attention_sampling
    from ats.utils.layers import SampleSoftmax

    x_high = keras.Input((32, 32, 1))
    x_low = keras.layers.AveragePooling2D(4)(x_high)
    # a learnable attention whose logits start (and stay) spread over > 104: softmax underflows to zeros
    attention = keras.Sequential([keras.layers.Conv2D(1, 1, kernel_initializer=keras.initializers.Constant(400.0),
                                                      bias_initializer="zeros"), SampleSoftmax(squeeze_channels=True)])
    feature = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(4)])
    features, _, _ = attention_sampling(attention, feature, patch_size=(4, 4), n_patches=5)([x_low, x_high])
    model = keras.Model(x_high, keras.layers.Dense(2)(features))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.zeros((4, 32, 32, 1), np.float32)
    x[:, :4, :4] = 1.0  # one bright low-resolution cell: logits 400 there, 0 elsewhere
    y = np.array([0, 1, 0, 1])
    history = model.fit(x, y, batch_size=2, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(model.predict(x, verbose=0)).all()


def test_torch_training_step_with_underflowing_attention():
    import ats.torch as at

    torch.manual_seed(0)
    attention_net = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        attention_net.weight.fill_(400.0)
        attention_net.bias.zero_()
    model = at.AttentionSampling(torch.nn.Sequential(attention_net, at.SampleSoftmax(squeeze_channels=True)),
                                 torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)),
                                 patch_size=(4, 4), n_patches=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x_high = torch.zeros(2, 1, 32, 32)
    x_high[:, :, :4, :4] = 1.0
    x_low = torch.nn.functional.avg_pool2d(x_high, 4)
    for _ in range(2):
        features, attention, _ = model(x_low, x_high)
        assert (attention > 0).sum(dim=(1, 2)).max() < 5  # fewer positive cells than n_patches
        loss = features.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_strict_keeps_the_error_and_the_default_fills():
    row = np.array([[0.0, 1.0, 0.0, 2.0]], np.float32)
    indices, sampled = F.sample(torch.tensor(row), 3, key=1)
    assert indices[0, 2].item() == 0 and sampled[0, 2].item() == 0.0  # filler: lowest zero-weight cell
    with pytest.raises(ValueError, match=r"fewer than n=3"):
        F.sample(torch.tensor(row), 3, key=1, strict=True)
    indices, sampled = ops.sample(tf.constant(row), 3, seed=1)
    assert indices.numpy()[0, 2].tolist() == [0] and sampled.numpy()[0, 2] == 0.0
    with pytest.raises(ValueError, match=r"fewer than n=3"):
        ops.sample(tf.constant(row), 3, seed=1, strict=True)
