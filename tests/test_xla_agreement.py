"""One seed, one answer: atskern's NumPy kernels, ats.tf.xla, ats.jax (kernel and XLA paths) and ats.torch.

Draws are compared for exact equality. DESIGN.md allows backends to differ
where two keys (or a with-replacement target and a CDF step) are equal to
within rounding, and ``ats.jax``'s XLA path ranks float32 keys when JAX's
64-bit mode is off. So every input here is first checked to be free of near
ties (:func:`near_tie_gap`: the smallest relative gap between consecutive
keys of a row's first ``n + 1``, or between a target and a CDF step, is above
1e-4, 400 float32 ulps), computed independently from atskern's Philox words
in float64; the exact assertion is then a real test, not luck.

Everything runs compiled: ``jax.jit`` (with a traced key) and ``jax.vmap``,
``tf.function(jit_compile=True)``; patches and their gradient (the scatter
adjoint) are compared bit for bit (integer-valued data: sums are exact in
any order), estimator gradients to rounding against
``atskern.expectation_grad`` and an explicit formula.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")
tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import atskern  # noqa: E402
from ats import jax as aj  # noqa: E402
from ats.jax import _paths  # noqa: E402
from ats.tf import xla  # noqa: E402
from ats.torch import functional as torch_f  # noqa: E402
from atskern import _rng as np_rng  # noqa: E402

GAP = 1e-4
JAX_PATHS = ["kernel", "xla"]


def near_tie_gap(attention, n: int, seed: int, replace: bool, logits: bool) -> float:
    """Smallest relative gap, over all rows, that a rounding error would have to bridge to change a draw."""
    flat = np.asarray(attention, np.float64).reshape(attention.shape[0], -1)
    gaps = [np.inf]
    for row, a in enumerate(flat):
        w = np.exp(a - a[np.isfinite(a)].max()) if logits else a
        if replace:
            cdf = np.cumsum(w)
            targets = np.asarray(np_rng.replacement_uniforms(n, row, seed)) * cdf[-1]
            steps = cdf[w > 0]
            gaps.append(np.min(np.abs(targets[:, None] - steps[None, :])) / cdf[-1])
        else:
            u = np.asarray(np_rng.position_uniforms(w.size, row, seed))
            keys = np.sort(-np.log(u[w > 0]) / w[w > 0])[: n + 1]
            if keys.size > 1:
                gaps.append(np.min(np.diff(keys) / keys[1:]))
    return float(min(gaps))


def _attention(shape, n, *, replace, logits, dtype, short_rows, seed):
    rng = np.random.default_rng(seed)
    if logits:
        a = rng.normal(size=shape) * 2
        if short_rows:
            a.reshape(shape[0], -1)[0, 2:] = -np.inf  # row 0: two finite logits, the rest -inf
    else:
        a = rng.random(shape) ** 2 + 0.01
        if short_rows:
            flat = a.reshape(shape[0], -1)
            flat[0, 1::2] = 0  # row 0 keeps half its cells
            flat[-1, 3:] = 0  # the last row keeps three
    return a.astype(dtype)


# grid shapes of 1-3 dims; n; replace; logits; dtype; short rows (R1 fillers without replacement)
DRAWS = [
    ((3, 40), 6, False, False, np.float32, False),
    ((3, 40), 9, False, False, np.float64, True),
    ((2, 6, 7), 8, True, False, np.float32, False),
    ((2, 6, 7), 12, False, False, np.float32, True),
    ((2, 5, 6), 5, False, True, np.float64, False),
    ((2, 5, 6), 4, True, True, np.float32, True),
    ((2, 3, 4, 5), 7, False, False, np.float64, False),
    ((2, 3, 4, 5), 30, True, False, np.float64, True),
]


def _draw_case(case):
    shape, n, replace, logits, dtype, short = case
    for seed in range(7, 200, 13):  # the first seed whose draw has no near tie (usually the first)
        attention = _attention(shape, n, replace=replace, logits=logits, dtype=dtype, short_rows=short, seed=seed)
        if near_tie_gap(attention, n, seed, replace, logits) > GAP:
            return attention, n, seed, replace, logits
    raise AssertionError("no near-tie-free input found")  # pragma: no cover


def _jax_draws(attention, n, seed, replace, logits, path):
    """Eager (the kernel path only: the XLA path's eager call is the same computation, cached), and in one
    compiled function: a traced key, and vmapped over two keys (seed and seed + 1)."""
    eager = aj.sample_indices(attention, n, seed, replace=replace, logits=logits, path=path) if path == "kernel" else None

    @jax.jit
    def compiled(a, keys):
        draw = lambda k: aj.sample_indices(a, n, k, replace=replace, logits=logits, path=path)  # noqa: E731
        return draw(keys[0]), jax.vmap(lambda k: draw(k)[0])(keys)

    jitted, mapped = compiled(attention, jnp.array([[seed, 0], [seed + 1, 0]], jnp.uint32))
    return eager, jitted, mapped


@pytest.mark.parametrize("case", DRAWS, ids=lambda c: f"{len(c[0]) - 1}d-n{c[1]}-{'r' if c[2] else 'wo'}{'-logits' if c[3] else ''}-{np.dtype(c[4]).name}{'-short' if c[5] else ''}")
def test_draws_identical_across_frameworks(case):
    attention, n, seed, replace, logits = _draw_case(case)
    want, want_probs = atskern.sample(attention, n, seed=seed, replace=replace, logits=logits)
    want_next, _ = atskern.sample(attention, n, seed=seed + 1, replace=replace, logits=logits)
    rtol = 1e-12 if attention.dtype == np.float64 else 2e-6
    if case[5] and not replace:
        assert (want_probs == 0).any()  # the case really has R1 fillers

    # TensorFlow, compiled by XLA
    tf_draw = tf.function(lambda a: xla.sample_indices(a, n, seed, replace=replace, logits=logits), jit_compile=True, autograph=False)
    indices, probs = tf_draw(tf.constant(attention))
    np.testing.assert_array_equal(indices.numpy(), want)
    np.testing.assert_allclose(probs.numpy(), want_probs, rtol=rtol)
    assert probs.dtype.as_numpy_dtype == attention.dtype

    # JAX, both paths; float64 inputs in 64-bit mode (else JAX makes them float32)
    with jax.enable_x64(attention.dtype == np.float64):
        for path in JAX_PATHS:
            eager, jitted, mapped = _jax_draws(attention, n, seed, replace, logits, path)
            for got_indices, got_probs in [jitted] + ([eager] if eager else []):
                np.testing.assert_array_equal(np.asarray(got_indices), want, err_msg=path)
                assert got_probs.dtype == attention.dtype
                np.testing.assert_allclose(np.asarray(got_probs), want_probs, rtol=rtol, err_msg=path)
                assert np.array_equal(np.asarray(got_probs) == 0, want_probs == 0)
            np.testing.assert_array_equal(np.asarray(mapped[0]), want, err_msg=path)
            np.testing.assert_array_equal(np.asarray(mapped[1]), want_next, err_msg=path)

    # torch (weights only: ats.torch samples a softmax's output, not logits)
    if not logits:
        t_idx, _ = torch_f.sample(torch.from_numpy(attention), n, replace=replace, key=seed)
        np.testing.assert_array_equal(t_idx.numpy(), want)


def test_kernel_path_is_exact_at_a_near_tie():
    """Two keys equal to within a float32 ulp (and distinct in float64): the kernel path is atskern, whatever
    JAX's precision mode; the float32 XLA path may order them either way (not asserted)."""
    u = np.asarray(np_rng.position_uniforms(64, 0, 5))
    attention = np.full((1, 64), 1e-3, np.float32)
    attention[0, 0] = 1
    attention[0, 1] = np.float32(np.log(u[1]) / np.log(u[0]))
    keys = -np.log(u) / attention[0].astype(np.float64)
    assert near_tie_gap(attention, 2, 5, False, False) < 1e-6 and np.argsort(keys)[:2].tolist() in ([0, 1], [1, 0])
    want, _ = atskern.sample(attention, 2, seed=5)
    np.testing.assert_array_equal(want[0, :, 0], np.argsort(keys, kind="stable")[:2])  # independent: float64 keys
    for got in (aj.sample_indices(attention, 2, 5, path="kernel")[0], jax.jit(lambda a: aj.sample_indices(a, 2, 5, path="kernel")[0])(attention)):
        np.testing.assert_array_equal(np.asarray(got), want)


# --- patches and their adjoint ----------------------------------------------------------------


PATCHES = [((2, 20, 3), (5,), False), ((2, 11, 9, 2), (4, 6), True), ((1, 6, 5, 4, 2), (3, 2, 4), False), ((2, 9, 8, 1), (4, 4), False)]


def _patch_data(shape, patch, channels_first):
    rng = np.random.default_rng(len(shape))
    x = rng.integers(-50, 50, shape).astype(np.float32)
    if channels_first:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    offsets = rng.integers(-6, 12, (shape[0], 6, len(patch))).astype(np.int32)
    out = atskern.extract_patches(x, offsets, patch, fill=2.0, channels_first=channels_first)
    g = rng.integers(-9, 9, out.shape).astype(np.float32)
    return x, offsets, g, out


@pytest.mark.parametrize("shape, patch, channels_first", PATCHES)
def test_patches_and_adjoint_identical_across_frameworks(shape, patch, channels_first):
    x, offsets, g, want = _patch_data(shape, patch, channels_first)
    spatial = x.shape[2:] if channels_first else x.shape[1:-1]
    want_grad = atskern.scatter_patches(g, offsets, spatial, channels_first=channels_first)
    zero_fill = atskern.extract_patches(x, offsets, patch, channels_first=channels_first)
    assert np.sum(zero_fill.astype(np.float64) * g) == np.sum(x.astype(np.float64) * want_grad)  # the dot test (integers: exact)

    for path in JAX_PATHS:
        extract = lambda a, o, path=path: aj.extract_patches(a, o, patch, fill=2.0, channels_first=channels_first, path=path)  # noqa: E731
        value_and_grad = jax.jit(lambda a, o: jax.vjp(lambda b: extract(b, o), a)[1](jnp.asarray(g))[0])
        np.testing.assert_array_equal(np.asarray(jax.jit(extract)(x, offsets)), want, err_msg=path)
        np.testing.assert_array_equal(np.asarray(value_and_grad(x, offsets)), want_grad, err_msg=path)
        # vmap over images, one per vmapped element (batch 1 inside): the same patches, the same gradients
        mapped = jax.vmap(lambda a, o: extract(a[None], o[None])[0])(x, offsets)
        np.testing.assert_array_equal(np.asarray(mapped), want, err_msg=path)
        mapped_grad = jax.vmap(jax.grad(lambda a, o, c: jnp.vdot(extract(a[None], o[None])[0], c)))(x, offsets, g)
        np.testing.assert_array_equal(np.asarray(mapped_grad), want_grad, err_msg=path)
        np.testing.assert_array_equal(
            np.asarray(aj.scatter_patches(g, offsets, spatial, channels_first=channels_first, path=path)), want_grad, err_msg=path
        )

    @tf.function(jit_compile=True, autograph=False)
    def tf_run(a, o):
        with tf.GradientTape() as tape:
            tape.watch(a)
            out = xla.extract_patches(a, o, patch, fill=2.0, channels_first=channels_first)
        return out, tape.gradient(out, a, output_gradients=tf.constant(g))

    out, grad = tf_run(tf.constant(x), tf.constant(offsets))
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(grad.numpy(), want_grad)

    tx = torch.from_numpy(x).requires_grad_(True)
    out = torch_f.extract_patches(tx, torch.from_numpy(offsets), patch, fill=2.0, channels_first=channels_first)
    out.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(out.detach().numpy(), want)
    np.testing.assert_array_equal(tx.grad.numpy(), want_grad)


def test_patches_equal_direct_slicing():
    """Independent of atskern: one patch by hand, fill outside (the shared fixture's oracle)."""
    x, offsets, _, want = _patch_data((2, 9, 8, 1), (4, 4), False)
    b, k = 1, 3
    top, left = offsets[b, k]
    for i in range(4):
        for j in range(4):
            r, c = top + i, left + j
            expected = x[b, r, c, 0] if 0 <= r < 9 and 0 <= c < 8 else 2.0
            assert want[b, k, i, j, 0] == expected
            assert np.asarray(aj.extract_patches(x, offsets, 4, fill=2.0, path="xla"))[b, k, i, j, 0] == expected


# --- the estimator's gradients ----------------------------------------------------------------


@pytest.mark.parametrize("replace", [False, True])
def test_estimator_gradients_equal_atskern_on_every_framework(replace):
    rng = np.random.default_rng(3)
    attention = rng.random((3, 6, 5)) + 0.01
    attention[2, :, 1:] = 0  # row 2 has 6 positive cells: without replacement, n = 8 gives two fillers (R1/R3)
    _, probs = atskern.sample(attention, 8, seed=4, replace=replace)
    features = rng.standard_normal((3, 8, 2, 3))
    g = rng.standard_normal((3, 2, 3))
    want_probs, want_features = atskern.expectation_grad(g, features, probs, replace=replace)
    want_value = atskern.expectation(features, probs, replace=replace)
    # independent: DESIGN.md's formulas written out
    inner = np.einsum("bij,bkij->bk", g, features)
    drawn = probs > 0
    if replace:
        c, s = np.full_like(probs, 1 / 8), 1 / (8 * np.where(drawn, probs, 1))
    else:
        pm = 1 - (np.cumsum(probs, 1) - probs)
        c = (pm + np.arange(7, -1, -1) * probs) / 8
        s = (pm / np.where(drawn, probs, 1) + np.arange(7, -1, -1)) / 8
    c, s = np.where(drawn, c, 0), np.where(drawn, s, 0)
    np.testing.assert_allclose(want_probs, s * inner, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(want_features, c[:, :, None, None] * g[:, None], rtol=1e-12, atol=1e-15)
    if not replace:
        assert (~drawn).sum() == 2

    with jax.enable_x64(True):
        def jax_grads(f, a, gg):
            value, vjp = jax.vjp(lambda f, a: aj.expectation(f, a, replace=replace), f, a)
            return (value, *vjp(gg))

        for got in (jax.jit(jax_grads)(features, probs, g), jax.vmap(lambda f, a, gg: [t[0] for t in jax_grads(f[None], a[None], gg[None])])(features, probs, g)):
            value, grad_features, grad_probs = (np.asarray(t) for t in got)
            np.testing.assert_allclose(value, want_value, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(grad_probs, want_probs, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(grad_features, want_features, rtol=1e-12, atol=1e-15)

    @tf.function(jit_compile=True, autograph=False)
    def tf_grads(f, a):
        with tf.GradientTape() as tape:
            tape.watch([f, a])
            value = xla.expectation(f, a, replace=replace)
        return (value, *tape.gradient(value, [f, a], output_gradients=tf.constant(g)))

    value, grad_features, grad_probs = (t.numpy() for t in tf_grads(tf.constant(features), tf.constant(probs)))
    np.testing.assert_allclose(value, want_value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad_probs, want_probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad_features, want_features, rtol=1e-12, atol=1e-15)

    f = torch.from_numpy(features).requires_grad_(True)
    a = torch.from_numpy(probs).requires_grad_(True)
    value = torch_f.expectation(f, a, replace=replace)
    value.backward(torch.from_numpy(g))
    np.testing.assert_allclose(value.detach().numpy(), want_value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.grad.numpy(), want_probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(f.grad.numpy(), want_features, rtol=1e-12, atol=1e-15)


# --- path choice ------------------------------------------------------------------------------


def test_auto_path_choice_and_bad_path():
    x = jnp.zeros((1, 8, 8, 1), jnp.float32)
    assert _paths.choose("auto", "sample", x) == "kernel"
    assert _paths.choose("auto", "patches", x) == "kernel"
    seen = []
    jax.jit(lambda a: seen.append(_paths.choose("auto", "patches", a)) or a)(x)
    assert seen == ["xla"]
    assert _paths.choose("xla", "sample", x) == "xla" and _paths.choose("kernel", "patches", x) == "kernel"
    with pytest.raises(ValueError, match="path must be one of"):
        aj.sample_indices(np.ones((1, 4), np.float32), 2, 1, path="gpu")
    with pytest.raises(ValueError, match="path must be one of"):
        aj.extract_multiscale([x], np.zeros((1, 2, 2), np.int32), (2, 2), [3], path=None)


def test_auto_path_on_other_platforms_is_xla(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    traced = []
    jax.jit(lambda a: traced.append(_paths.choose("auto", "sample", a)) or a)(jnp.zeros((1, 4)))
    assert traced == ["xla"]


def test_kernel_path_checks_rows_under_jit():
    """Traced values are unknown to Python, but the kernel path's callback runs atskern's checks."""
    bad = np.ones((2, 6), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(Exception, match="attention row 1 contains NaN"):
        jax.jit(lambda a: aj.sample_indices(a, 2, 1, path="kernel")[0])(bad).block_until_ready()
    with pytest.raises(ValueError, match="attention row 1 contains NaN"):
        aj.sample_indices(bad, 2, 1, path="kernel")
    with pytest.raises(ValueError, match="cannot be represented"):
        aj.extract_patches(np.zeros((1, 4, 4, 1), np.uint8), np.zeros((1, 1, 2), np.int32), 2, fill=300, path="xla")


def test_kernel_path_16_bit_inputs():
    attention = (np.random.default_rng(0).random((2, 30)) + 0.1).astype(jnp.bfloat16)
    want, _ = atskern.sample(np.asarray(attention, np.float32), 4, seed=2)
    indices, probs = aj.sample_indices(attention, 4, 2, path="kernel")
    np.testing.assert_array_equal(np.asarray(indices), want)
    assert probs.dtype == jnp.bfloat16
    x = (np.arange(2 * 7 * 6 * 3) % 50).reshape(2, 7, 6, 3).astype(np.float16)
    offsets = np.array([[[-2, 1], [5, 4]], [[0, 0], [3, -3]]], np.int32)
    for path in JAX_PATHS:
        got = jax.jit(lambda a: aj.extract_patches(a, offsets, 3, fill=1, path=path))(x)
        assert got.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(got), atskern.extract_patches(x, offsets, 3, fill=1))
        grad = jax.grad(lambda a: jnp.sum(aj.extract_patches(a, offsets, 3, path=path).astype(jnp.float32)))(jnp.asarray(x))
        assert grad.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(grad, np.float32), atskern.scatter_patches(np.ones((2, 2, 3, 3, 3), np.float32), offsets, (7, 6)))


# --- the functional API mirrors ats.torch.functional ------------------------------------------


MIRRORED = ["sample", "patch_offsets", "extract_patches", "extract_multiscale", "expectation", "sample_softmax", "multinomial_entropy"]


@pytest.mark.parametrize("name", MIRRORED)
def test_functional_api_mirrors_torch(name):
    """Every torch argument exists in ats.jax under the same name and kind (JAX adds ``path``, ``sample`` ``key``
    semantics differ only in that JAX has no global generator), and every function has a docstring."""
    ours = inspect.signature(getattr(aj.functional, name)).parameters
    theirs = inspect.signature(getattr(torch_f, name)).parameters
    for arg, param in theirs.items():
        assert arg in ours, f"ats.jax.{name} lacks {arg}"
        assert ours[arg].kind == param.kind, f"ats.jax.{name}({arg}) is {ours[arg].kind}, torch's is {param.kind}"
        if arg != "channels_first":  # JAX's layout is channels-last, torch's channels-first
            assert ours[arg].default == param.default, f"ats.jax.{name}({arg}) default differs"
    assert len(getattr(aj.functional, name).__doc__) > 100
    assert getattr(aj, name) is getattr(aj.functional, name)


def test_attention_helpers_equal_torch():
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    for smooth in (0.0, 0.1):
        np.testing.assert_allclose(
            np.asarray(aj.sample_softmax(x, smooth=smooth)), torch_f.sample_softmax(torch.from_numpy(x), smooth=smooth).numpy(), rtol=1e-6
        )
    p = np.array(aj.sample_softmax(x, smooth=0.1))  # a writable copy (torch.from_numpy warns on read-only arrays)
    np.testing.assert_allclose(p.reshape(3, -1).sum(1), 1, rtol=1e-6)
    want = 0.5 * np.sum(p * np.log(p + 1e-6)) / 3  # independent: the formula
    np.testing.assert_allclose(float(aj.multinomial_entropy(p, 0.5)), want, rtol=1e-6)
    np.testing.assert_allclose(float(aj.multinomial_entropy(p, 0.5)), float(torch_f.multinomial_entropy(torch.from_numpy(p), 0.5)), rtol=1e-6)
    with pytest.raises(ValueError, match="smooth must be"):
        aj.sample_softmax(x, smooth=2)
