"""The estimator at the edges of floating point, on every front end: the mass left when the probabilities cannot
resolve it, 16-bit probabilities, mixed precision, second derivatives, a run-time ``n``, and arguments that used
to pass unchecked (flags as strings, ``n = 0``, another batch in ``expectation_grad``)."""

from __future__ import annotations

import numpy as np
import pytest

import atskern
from atskern import reference

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
keras = pytest.importorskip("keras")

import jax.numpy as jnp  # noqa: E402

from ats import jax as ajax  # noqa: E402
from ats import ops  # noqa: E402
from ats.tf import xla  # noqa: E402
from ats.torch import functional as F  # noqa: E402


def grad_probs_everywhere(features, probs):
    """The probabilities' gradient of ``sum(expectation(features, probs))`` (without replacement) from every
    front end, as float64 arrays."""
    grad = np.ones((features.shape[0],) + features.shape[2:], features.dtype)
    out = {"atskern": atskern.expectation_grad(grad, features, probs)[0],
           "reference": reference.expectation_grad(grad, features, probs)[0]}
    p = torch.tensor(probs, requires_grad=True)
    F.expectation(torch.tensor(features), p).sum().backward()
    out["ats.torch"] = p.grad.numpy()
    for name, estimator in (("ats.ops", ops.expectation), ("ats.tf.xla", xla.expectation)):
        p = tf.constant(probs)
        with tf.GradientTape() as tape:
            tape.watch(p)
            value = tf.reduce_sum(estimator(tf.constant(features), p))
        out[name] = tape.gradient(value, p).numpy()
    for x64 in (False, True):
        with jax.enable_x64(x64):
            out[f"ats.jax x64={x64}"] = np.asarray(jax.grad(
                lambda q: jnp.sum(ajax.expectation(jnp.asarray(features), q)))(jnp.asarray(probs)))
    return {name: np.asarray(g, np.float64) for name, g in out.items()}


@pytest.mark.parametrize("probs", [
    # float32 probabilities of softmax([0, 0, 0, -80]) drawn in full: 1 - a_0 - a_1 - a_2 is -3e-8
    [np.float32(1 / 3)] * 3 + [np.float32(np.exp(-80.0) / 3)],
    # 1 - a_0 - a_1 is +2.2e-8 of rounding, 2e22 times the last draw (normal floats: TF flushes subnormals)
    [np.float32(0.1), np.float32(0.9), np.float32(1e-30)],
], ids=["negative", "positive-sliver"])
def test_a_mass_left_lost_in_rounding_gives_finite_gradients_from_the_draws_still_to_come(probs):
    probs = np.array([probs], np.float32)
    n = probs.shape[1]
    assert abs(1.0 - probs[0, :-1].astype(np.float64).sum()) < 4e-8  # the subtraction is pure rounding
    features = np.full((1, n, 4), 2.0, np.float32)  # <g, f> = 8
    # the last draw's mass left is taken as its own probability (the only draw still to come): pm / a = 1
    last = 1.0 / n * 8.0
    for name, grad in grad_probs_everywhere(features, probs).items():
        assert np.isfinite(grad).all(), name
        np.testing.assert_allclose(grad[0, -1], last, rtol=1e-6, err_msg=name)
        earlier = (1.0 - (np.cumsum(probs[0, :-1], dtype=np.float64) - probs[0, :-1]))
        want = (earlier / probs[0, :-1] + np.arange(n - 1, 0, -1)) / n * 8.0
        np.testing.assert_allclose(grad[0, :-1], want, rtol=1e-5, err_msg=name)


def test_a_resolved_mass_left_is_the_exact_one():
    probs = np.array([[0.5, 0.25, 1e-30]], np.float64)  # float64 resolves the 0.25 left after two draws
    features = np.full((1, 3, 1), 1.0)
    want = (np.array([1.0, 0.5, 0.25]) / probs[0] + [2, 1, 0]) / 3
    for name, grad in grad_probs_everywhere(features, probs).items():
        if name == "ats.jax x64=False":  # float32 arithmetic: 0.25 / 1e-30 overflows
            continue
        np.testing.assert_allclose(grad[0], want, rtol=1e-12, err_msg=name)


def test_torch_second_derivative_runs_through_the_coefficients_as_jax_does():
    probs = np.array([[0.4, 0.3, 0.2]])
    features = np.array([[[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]])

    p = torch.tensor(probs, requires_grad=True)
    f = torch.tensor(features, requires_grad=True)
    (grad_f,) = torch.autograd.grad((F.expectation(f, p) ** 2).sum(), f, create_graph=True)
    (got,) = torch.autograd.grad((grad_f ** 2).sum(), p)

    with jax.enable_x64(True):
        def penalty(q):
            grad_fj = jax.grad(lambda ff: jnp.sum(ajax.expectation(ff, q) ** 2))(jnp.asarray(features))
            return jnp.sum(grad_fj ** 2)

        want = np.asarray(jax.grad(penalty)(jnp.asarray(probs)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # the coefficient path alone: d/dp of 4 ||F||^2 sum_k c_k^2 with F held fixed is not zero here
    assert abs(got.numpy()[0, 0] - 15.732) > 1.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_probabilities_that_round_above_one_are_accepted_everywhere(dtype):
    values = {"float16": [0.05249, 0.34375, 0.31445, 0.29102], "bfloat16": [0.05249023, 0.34375, 0.31445312, 0.29101562]}
    probs64 = np.array([values[dtype]])
    features = np.ones((1, 4, 2), np.float32)
    t = tf.constant(probs64, getattr(tf, dtype))
    assert float(tf.reduce_sum(tf.cast(t, tf.float64))) > 1.0  # the rounding of a valid draw
    np.testing.assert_allclose(xla.expectation(tf.constant(features), t).numpy(), [[1.0, 1.0]], rtol=1e-2)
    np.testing.assert_allclose(ops.expectation(tf.constant(features), t).numpy(), [[1.0, 1.0]], rtol=1e-2)
    j = jnp.asarray(probs64, dtype=getattr(jnp, dtype))
    np.testing.assert_allclose(np.asarray(ajax.expectation(jnp.asarray(features), j)), [[1.0, 1.0]], rtol=1e-2)
    too_much = jnp.asarray([[0.6, 0.6]], dtype=getattr(jnp, dtype))
    with pytest.raises(ValueError, match="sum to"):
        ajax.expectation(jnp.ones((1, 2, 2)), too_much)


def test_tf_xla_expectation_takes_a_draw_count_known_only_at_run_time():
    probs = tf.constant([[0.5, 0.3, 0.2]], tf.float64)
    features = tf.constant([[[1.0], [2.0], [4.0]]], tf.float64)
    spec = [tf.TensorSpec([None, None, 1], tf.float64), tf.TensorSpec([None, None], tf.float64)]
    for replace in (False, True):
        @tf.function(input_signature=spec)
        def value_and_grad(f, p, replace=replace):
            with tf.GradientTape() as tape:
                tape.watch(p)
                value = xla.expectation(f, p, replace=replace)
            return value, tape.gradient(value, p)

        value, grad = value_and_grad(features, probs)
        want_value = atskern.expectation(features.numpy(), probs.numpy(), replace=replace)
        want_grad, _ = atskern.expectation_grad(np.ones((1, 1)), features.numpy(), probs.numpy(), replace=replace)
        np.testing.assert_allclose(value.numpy(), want_value, rtol=1e-12)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-12)


def test_jax_expectation_grad_checks_its_inputs_as_expectation_does():
    grad, features, probs = jnp.ones((2, 4)), jnp.ones((2, 3, 4)), jnp.asarray([[0.5, 0.3, 0.2]])
    with pytest.raises(ValueError, match=r"features must be \(batch, n, ...\) = \(1, 3\)"):
        ajax.expectation_grad(grad, features, probs)
    with pytest.raises(TypeError, match="features and probs must be floating"):
        ajax.expectation_grad(jnp.ones((1, 4)), jnp.ones((1, 3, 4), jnp.int32), probs)
    with pytest.raises(ValueError, match="probs must be finite"):
        ajax.expectation_grad(jnp.ones((1, 4)), jnp.ones((1, 3, 4)), jnp.asarray([[0.5, jnp.nan, 0.2]]))
    with pytest.raises(ValueError, match="sum to"):
        ajax.expectation_grad(jnp.ones((1, 4)), jnp.ones((1, 3, 4)), jnp.asarray([[0.9, 0.9, 0.2]]))


def test_ats_ops_flags_must_be_booleans():
    features, probs = tf.ones((1, 2, 1)), tf.constant([[0.5, 0.5]])
    with pytest.raises(TypeError, match="replace must be True or False, got 'False'"):
        ops.expectation(features, probs, replace="False")
    attention = tf.ones((1, 4, 4)) / 16
    for flag in ("replace", "deterministic", "strict"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'False'"):
            ops.sample(attention, 2, seed=1, **{flag: "False"})


def test_no_draws_is_refused_on_every_front_end():
    features, probs = np.ones((2, 0, 3), np.float32), np.ones((2, 0), np.float32)
    calls = {
        "atskern": lambda: atskern.expectation(features, probs),
        "ats.torch": lambda: F.expectation(torch.tensor(features), torch.tensor(probs)),
        "ats.ops": lambda: ops.expectation(tf.constant(features), tf.constant(probs)),
        "ats.tf.xla": lambda: xla.expectation(tf.constant(features), tf.constant(probs)),
        "ats.jax": lambda: ajax.expectation(jnp.asarray(features), jnp.asarray(probs)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"probs must not be empty, got shape \(2, 0\)"):
            call()
            pytest.fail(name)


def test_mixed_float16_keeps_the_sampled_attention_and_its_gradient_finite():
    from ats.keras import Expectation, SamplePatches

    size = 256
    logits = tf.zeros((1, size * size))
    images = tf.fill((1, size, size, 8), 2.0)  # <g, f> = 16: the attention gradient is ~1e5 > float16's 65504
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        sampler, estimator = SamplePatches(10, (1, 1), seed=1), Expectation()
        with tf.GradientTape() as tape:
            tape.watch(logits)
            attention = tf.reshape(tf.nn.softmax(logits, axis=1), (1, size, size))
            patches, sampled = sampler([images, images, attention])
            value = tf.reduce_sum(tf.cast(estimator([tf.reshape(patches, (1, 10, 8)), sampled]), tf.float32))
        grad = tape.gradient(value, logits).numpy()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert sampled.dtype == tf.float32
    assert np.isfinite(grad).all()
    assert np.abs(grad).max() > 0


def test_torch_func_transforms_take_the_torch_estimator():
    probs = torch.tensor([[0.4, 0.3, 0.2], [0.5, 0.1, 0.05]], dtype=torch.float64)
    features = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mapped = torch.func.vmap(lambda f, p: F.expectation(f[None], p[None])[0])(features, probs)
    np.testing.assert_allclose(mapped.numpy(), F.expectation(features, probs).numpy(), rtol=1e-14)
    grad = torch.func.grad(lambda p: F.expectation(features, p).sum())(probs)
    want, _ = atskern.expectation_grad(np.ones((2, 4)), features.numpy(), probs.numpy())
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12)


def test_torch_modules_normalize_float16_logits_in_float32():
    from ats.torch import Expectation, SamplePatches

    size = 256
    logits = torch.zeros(1, size, size, dtype=torch.float16, requires_grad=True)
    images = torch.full((1, 8, size, size), 2.0, dtype=torch.float16)  # <g, f> = 16 at every cell
    patches, sampled = SamplePatches(10, 1, use_logits=True, seed=1)(images, images, logits)
    Expectation()(patches.reshape(1, 10, 8), sampled).float().sum().backward()
    assert sampled.dtype == torch.float32
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 0


def test_torch_per_sample_gradients_vmap_of_grad():
    probs = torch.tensor([[0.4, 0.3, 0.2], [0.5, 0.1, 0.05]], dtype=torch.float64)
    features = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def row_loss(p, f):
        return F.expectation(f[None], p[None])[0].sum()

    per_row = torch.func.vmap(torch.func.grad(row_loss))(probs, features)
    want, _ = atskern.expectation_grad(np.ones((2, 4)), features.numpy(), probs.numpy())
    np.testing.assert_allclose(per_row.numpy(), want, rtol=1e-12)


def test_mixed_float16_patches_and_features_keep_the_policy_dtype():
    from ats.keras import Expectation, SamplePatches

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        images = tf.random.uniform((1, 16, 16, 2))
        attention = tf.fill((1, 16, 16), 1.0 / 256)
        patches, sampled = SamplePatches(3, 2, seed=1)([images, images, attention])
        estimate = Expectation()([tf.ones((1, 3, 5)), sampled])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert patches.dtype == tf.float16 and estimate.dtype == tf.float16 and sampled.dtype == tf.float32
