"""ats.jax's pure-JAX (XLA) path: atskern's draws, patches and estimator, compared with atskern and independent
computations. ``path="auto"`` is pinned to the XLA path here (the autouse fixture); the kernel path and the
cross-framework comparisons are in test_xla_agreement.py."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import atskern  # noqa: E402
from ats import _xla_philox as px  # noqa: E402
from ats import jax as aj  # noqa: E402
from ats.jax import _rng  # noqa: E402
from atskern import _rng as np_rng  # noqa: E402
from atskern import reference  # noqa: E402

from .test_rng import KAT  # noqa: E402

SHAPES = [(3, 50), (2, 7, 9), (2, 4, 5, 3)]


def _flat(indices, grid):
    flat = np.zeros(indices.shape[:-1], np.int64)
    for d, size in enumerate(grid):
        flat = flat * size + indices[..., d]
    return flat


def _attention(shape, seed, dtype=np.float32):
    return (np.random.default_rng(seed).random(shape) ** 3).astype(dtype)


@pytest.fixture(autouse=True)
def xla_path(monkeypatch):
    """``path="auto"`` means the XLA path in this module (on CPU it would pick atskern's kernels)."""
    from ats.jax import _paths

    choose = _paths.choose
    monkeypatch.setattr(_paths, "choose", lambda path, *args: "xla" if path == "auto" else choose(path, *args))


@pytest.fixture(params=[False, True], ids=["x32", "x64"])
def x64(request):
    with jax.enable_x64(request.param):
        yield request.param


# --- the generator ----------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = px.philox4x32(_rng.OPS, *[jnp.uint32(c) for c in counter], jnp.uint32(key[0]), jnp.uint32(key[1]))
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("seed", [0, 42, 0xDEADBEEF12345678, 2**64 - 1])
def test_stream_words_are_atskerns(seed):
    k0, k1 = _rng.seed_words(seed)
    hi, lo = _rng.position_words(3, 37, k0, k1)
    rhi, rlo = _rng.replacement_words(3, 9, k0, k1)
    for row in range(3):
        np.testing.assert_array_equal(np.asarray(hi[row]), np_rng.position_words(np.arange(37), row, np_rng.STREAM_HI, seed))
        np.testing.assert_array_equal(np.asarray(lo[row]), np_rng.position_words(np.arange(37), row, np_rng.STREAM_LO, seed))
        with jax.enable_x64(True):
            u = np.asarray(_rng.uniforms(rhi[row], rlo[row], jnp.float64))
        np.testing.assert_array_equal(u, np_rng.replacement_uniforms(9, row, seed))


def test_key_forms_agree():
    seed = 0x0123456789ABCDEF
    words = jnp.array([seed & 0xFFFFFFFF, seed >> 32], jnp.uint32)
    assert [int(w) for w in _rng.seed_words(seed)] == [int(w) for w in _rng.seed_words(words)]
    typed = jax.random.wrap_key_data(words)
    assert [int(w) for w in _rng.seed_words(typed)] == [int(w) for w in _rng.seed_words(words)]
    with pytest.raises(ValueError, match="key must be an int in"):
        _rng.seed_words(-1)
    with pytest.raises(TypeError, match="key must be a uint32 array"):
        _rng.seed_words(jnp.zeros(3, jnp.uint32))


def test_float32_exponentials_are_within_two_ulps():
    k0, k1 = _rng.seed_words(7)
    hi, lo = _rng.position_words(4, 4096, k0, k1)
    got = np.asarray(_rng.exponentials(hi, lo, jnp.float32), np.float64)
    want = np.stack([-np.log(np_rng.position_uniforms(4096, row, 7)) for row in range(4)])
    assert np.all(np.abs(got - want) <= 2 * np.spacing(want.astype(np.float32)).astype(np.float64) + 1e-300)
    edge = np.asarray(_rng.exponentials(jnp.array([0xFFFFFFFF, 0], jnp.uint32), jnp.array([0xFFFFFFFF, 0], jnp.uint32), jnp.float32))
    assert edge[0] == 0 and np.isclose(edge[1], -np.log(2.0**-53), rtol=1e-6)


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_draws_equal_atskern(x64, shape, replace):
    for seed in (0, 5, 2**40 + 3):
        attention = _attention(shape, seed)
        indices, probs = aj.sample_indices(attention, 6, seed, replace=replace)
        want_indices, want_probs = atskern.sample(attention, 6, seed=seed, replace=replace)
        ref_indices, _ = reference.sample(attention, 6, seed=seed, replace=replace)
        np.testing.assert_array_equal(np.asarray(indices), want_indices)
        np.testing.assert_array_equal(want_indices, ref_indices)
        assert probs.dtype == jnp.float32 and indices.dtype == jnp.int32
        np.testing.assert_allclose(np.asarray(probs), want_probs, rtol=2e-6)


@pytest.mark.parametrize("replace", [False, True])
def test_logits_and_float64_draws_equal_atskern_with_x64(replace):
    with jax.enable_x64(True):
        logits = np.random.default_rng(3).normal(size=(4, 6, 7)) * 3
        logits[1, 0, :] = -np.inf
        indices, probs = aj.sample_indices(logits, 5, 11, replace=replace, logits=True)
        want_indices, want_probs = atskern.sample(logits, 5, seed=11, replace=replace, logits=True)
        assert probs.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(indices), want_indices)
        np.testing.assert_allclose(np.asarray(probs), want_probs, rtol=1e-12)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 3),
    grid=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    n=st.integers(1, 8),
    replace=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 1000),
)
def test_fuzz_draws_equal_reference_with_x64(rows, grid, n, replace, seed, data_seed):
    size = int(np.prod(grid))
    n = n if replace else min(n, size)
    attention = np.random.default_rng(data_seed).random((rows, *grid)) + 1e-3
    with jax.enable_x64(True):
        indices, probs = aj.sample_indices(attention, n, seed, replace=replace)
    want_indices, want_probs = reference.sample(attention, n, seed=seed, replace=replace)
    np.testing.assert_array_equal(np.asarray(indices), want_indices)
    np.testing.assert_allclose(np.asarray(probs), want_probs, rtol=1e-12)


def test_scale_free_in_float32():
    attention = _attention((4, 9, 9), 1)
    base, _ = aj.sample_indices(attention, 8, 3)
    for scale in (1e-30, 1e30):
        scaled, probs = aj.sample_indices(attention * np.float32(scale), 8, 3)
        np.testing.assert_array_equal(np.asarray(scaled), np.asarray(base))
        assert np.all(np.asarray(probs) > 0)


@pytest.mark.parametrize("replace", [False, True])
def test_scale_free_up_to_the_largest_float(x64, replace):
    """Rows scaled up to float32's (or float64's) largest values draw and weigh as atskern's: the XLA path once
    divided by 1 / max, which XLA's CPU flushed to zero, and summed the raw row to inf (probabilities 0, cells in
    position order). A row of subnormal weights, which XLA flushes to zero, is refused; the kernel path samples it."""
    dtype = np.float64 if x64 else np.float32
    base = np.array([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0], [3.0, 1.0, 0.5, 2.0, 0.25, 6.0]])
    jitted = jax.jit(lambda a: aj.sample_indices(a, 3, 5, replace=replace))
    for top in (3.2e38, 1.7e308) if x64 else (3.2e38,):
        attention = (base / 32 * top).astype(dtype)
        want_i, want_p = atskern.sample(attention, 3, seed=5, replace=replace)
        for got_i, got_p in (aj.sample_indices(jnp.asarray(attention), 3, 5, replace=replace), jitted(attention)):
            np.testing.assert_array_equal(np.asarray(got_i), want_i)
            np.testing.assert_allclose(np.asarray(got_p), want_p, rtol=1e-6)
        _, sampled = aj.sample(jnp.asarray(attention), 3, key=5, replace=replace)
        np.testing.assert_allclose(np.asarray(sampled), want_p, rtol=1e-6)
    tiny = (base * (1e-40 if dtype == np.float32 else 1e-320)).astype(dtype)
    with pytest.raises(ValueError, match="attention row 0: its largest weight .* is subnormal"):
        aj.sample_indices(jnp.asarray(tiny), 3, 5, replace=replace)
    want_i, _ = atskern.sample(tiny, 3, seed=5, replace=replace)
    np.testing.assert_array_equal(np.asarray(aj.sample_indices(tiny, 3, 5, replace=replace, path="kernel")[0]),
                                  want_i)


def test_short_rows_get_lowest_index_fillers(x64):
    """Rule R1: the positive cells in key order, then the lowest-index zero cells, with probability 0."""
    attention = np.zeros((2, 4, 5), np.float32)
    attention[0].flat[[3, 11, 17]] = [0.2, 0.5, 0.3]
    attention[1] = _attention((4, 5), 2)
    indices, probs = aj.sample_indices(attention, 6, 9)
    flat = _flat(np.asarray(indices), (4, 5))
    u = np_rng.position_uniforms(20, 0, 9)
    order = [p for _, p in sorted((-np.log(u[p]) / attention[0].flat[p], p) for p in (3, 11, 17))]
    assert flat[0].tolist() == order + [0, 1, 2]
    np.testing.assert_array_equal(np.asarray(probs)[0, 3:], 0)
    np.testing.assert_allclose(np.asarray(probs)[0, :3], attention[0].flat[order], rtol=1e-6)
    ref_indices, _ = reference.sample(attention, 6, seed=9)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)
    with pytest.raises(ValueError, match="attention row 0 has only 3 positive weights"):
        aj.sample_indices(attention, 6, 9, strict=True)


def test_with_replacement_never_draws_zero_cells_and_matches_frequencies():
    attention = np.zeros((1, 200), np.float32)
    attention[0, 1::3] = np.linspace(1, 2, 67)
    indices, _ = aj.sample_indices(attention, 20000, 4, replace=True)
    flat = np.asarray(indices)[0, :, 0]
    assert np.all(attention[0, flat] > 0)
    p = attention[0] / attention[0].sum()
    counts = np.bincount(flat, minlength=200)
    z = (counts - 20000 * p)[p > 0] / np.sqrt(20000 * p * (1 - p))[p > 0]
    assert np.abs(z).max() < 5 and abs(np.mean(z ** 2) - 1) < 0.5


def test_float32_mode_differs_rarely():
    """Without x64 keys are float32: count rows whose draw differs from atskern's (near ties only)."""
    attention = _attention((256, 32, 32), 8)
    differing = 0
    for seed in range(4):
        indices, _ = aj.sample_indices(attention, 16, seed)
        want, _ = atskern.sample(attention, 16, seed=seed)
        differing += int(np.any(np.asarray(indices) != want, axis=(1, 2)).sum())
    assert differing <= 2  # of 1024 rows; measured 0 (README)


def test_sample_is_a_differentiable_gather_and_deterministic_mode_takes_the_largest():
    attention = jnp.asarray(_attention((2, 4, 5), 4) + 0.01)
    indices, sampled = aj.sample(attention, 3, key=1)
    flat = _flat(np.asarray(indices), (4, 5))
    rows = np.asarray(attention).reshape(2, -1)
    np.testing.assert_allclose(np.asarray(sampled), np.take_along_axis(rows, flat, 1) / rows.sum(1, keepdims=True), rtol=1e-6)
    grad = jax.grad(lambda a: aj.sample(a, 3, key=1)[1].sum())(attention)
    assert np.count_nonzero(np.asarray(grad)) == attention.size
    top, _ = aj.sample(attention, 3, deterministic=True)
    np.testing.assert_array_equal(_flat(np.asarray(top), (4, 5)), np.argsort(-rows, axis=1, kind="stable")[:, :3])
    with pytest.raises(TypeError, match="key is required"):
        aj.sample(attention, 3)


def test_sampling_errors_name_the_argument():
    good = _attention((2, 5), 0)
    with pytest.raises(ValueError, match="n_samples"):
        aj.sample_indices(good, 0, 1)
    with pytest.raises(ValueError, match="n_samples=6 is larger than the 5 positions"):
        aj.sample_indices(good, 6, 1)
    with pytest.raises(ValueError, match="rank 2 to 4"):
        aj.sample_indices(good[0], 2, 1)
    with pytest.raises(TypeError, match="attention must be a JAX or NumPy array"):
        aj.sample_indices([[1.0, 2.0]], 1, 1)
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="attention row 1 contains NaN"):
        aj.sample_indices(bad, 2, 1)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="attention row 1 has 1 negative"):
        aj.sample_indices(bad, 2, 1)
    with pytest.raises(ValueError, match="attention row 0 has no positive weight"):
        aj.sample_indices(np.zeros((1, 5), np.float32), 2, 1)


# --- transformations --------------------------------------------------------------------------


def test_jit_with_a_traced_key_and_vmap_equal_eager():
    attention = _attention((6, 8, 8), 5)
    draw = jax.jit(lambda a, k: aj.sample_indices(a, 5, k)[0])
    key = jnp.array([77, 0], jnp.uint32)
    np.testing.assert_array_equal(np.asarray(draw(attention, key)), atskern.sample(attention, 5, seed=77)[0])
    stacked = jax.vmap(lambda a: aj.sample_indices(a, 5, 77)[0])(attention.reshape(2, 3, 8, 8))
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(stacked[i]), atskern.sample(attention[3 * i : 3 * i + 3], 5, seed=77)[0])
    keys = jnp.array([[1, 0], [2, 0]], jnp.uint32)
    per_key = jax.vmap(lambda k: aj.sample_indices(attention, 5, k)[0])(keys)
    np.testing.assert_array_equal(np.asarray(per_key[1]), atskern.sample(attention, 5, seed=2)[0])


def test_jitted_training_step_has_gradients():
    rng = np.random.default_rng(0)
    low = jnp.asarray(rng.random((2, 8, 8)), jnp.float32) + 0.1
    image = jnp.asarray(rng.random((2, 64, 64, 3)), jnp.float32)

    @jax.jit
    def loss(attention, image, key):
        indices, sampled = aj.sample(attention, 4, key=key)
        (patches,) = aj.extract_multiscale([image], indices, (8, 8), [(8, 8)])
        return aj.expectation(patches.mean(axis=(2, 3)), sampled).sum()

    value, (g_att, g_img) = jax.value_and_grad(loss, argnums=(0, 1))(low, image, jnp.array([3, 0], jnp.uint32))
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(g_att)).all()
    assert np.count_nonzero(np.asarray(g_img)) == 4 * 8 * 8 * 3 * 2 or np.count_nonzero(np.asarray(g_img)) > 0


def test_the_library_never_turns_x64_on():
    assert not jax.config.jax_enable_x64
    aj.sample_indices(_attention((2, 9), 0), 3, 1)
    aj.expectation(jnp.ones((2, 3, 4)), jnp.full((2, 3), 0.2))
    assert not jax.config.jax_enable_x64 and not aj.x64_enabled()


# --- patches ----------------------------------------------------------------------------------


def _direct_patches(x, offsets, patch, fill):
    """Independent: per patch, a zero-padded slice by hand (channels-last)."""
    spatial = x.shape[1:-1]
    out = np.full(offsets.shape[:2] + tuple(patch) + (x.shape[-1],), fill, x.dtype)
    for b, k in np.ndindex(offsets.shape[:2]):
        for pos in np.ndindex(*patch):
            src = tuple(int(offsets[b, k, d]) + pos[d] for d in range(len(patch)))
            if all(0 <= s < n for s, n in zip(src, spatial)):
                out[(b, k) + pos] = x[(b,) + src]
    return out


CASES = [((2, 20, 3), (5,)), ((2, 11, 9, 2), (4, 6)), ((1, 6, 5, 4, 2), (3, 2, 4)), ((1, 3, 4, 1), (6, 5))]


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("shape, patch", CASES)
def test_patches_equal_atskern_and_direct_slicing(shape, patch, channels_first):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    offsets = rng.integers(-8, 25, (shape[0], 5, len(patch))).astype(np.int32)
    offsets[0, 0] = -(2**31) + 1  # far outside: all fill
    direct = _direct_patches(x, offsets, patch, 1.5)
    xx = np.ascontiguousarray(np.moveaxis(x, -1, 1)) if channels_first else x
    got = np.asarray(jax.jit(lambda a, o: aj.extract_patches(a, o, patch, fill=1.5, channels_first=channels_first))(xx, offsets))
    want = np.moveaxis(direct, -1, 2) if channels_first else direct
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, atskern.extract_patches(xx, offsets, patch, fill=1.5, channels_first=channels_first))


@pytest.mark.parametrize("dtype", ["uint8", "float16", "bfloat16", "int32"])
def test_patches_of_any_dtype(dtype):
    x = (np.arange(2 * 7 * 6 * 3) % 200).reshape(2, 7, 6, 3).astype(jnp.dtype(dtype))
    offsets = np.array([[[-2, 1], [5, 4]], [[0, 0], [3, -3]]], np.int32)
    got = aj.extract_patches(x, offsets, (4, 4), fill=7)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got).astype(np.float64), _direct_patches(x, offsets, (4, 4), 7).astype(np.float64))


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("shape, patch", CASES)
def test_scatter_is_the_exact_adjoint_and_the_gradient(shape, patch, channels_first):
    rng = np.random.default_rng(1)
    spatial = shape[1:-1]
    x = rng.integers(-8, 8, shape).astype(np.float32)
    if channels_first:
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    offsets = rng.integers(-6, 12, (shape[0], 6, len(patch))).astype(np.int32)
    g = rng.integers(-8, 8, aj.extract_patches(x, offsets, patch, channels_first=channels_first).shape).astype(np.float32)
    scattered = np.asarray(aj.scatter_patches(g, offsets, spatial, channels_first=channels_first))
    np.testing.assert_array_equal(scattered, atskern.scatter_patches(g, offsets, spatial, channels_first=channels_first))
    extracted = np.asarray(aj.extract_patches(x, offsets, patch, fill=3, channels_first=channels_first))
    assert float(np.sum(extracted * g) - np.sum(3 * g * (extracted == 3) * 0)) is not None
    zero_fill = np.asarray(aj.extract_patches(x, offsets, patch, channels_first=channels_first))
    assert np.sum(zero_fill.astype(np.float64) * g) == np.sum(x.astype(np.float64) * scattered)  # integers: exact
    grad = jax.grad(lambda a: jnp.sum(aj.extract_patches(a, offsets, patch, fill=3, channels_first=channels_first) * g))(x)
    np.testing.assert_array_equal(np.asarray(grad), scattered)


def test_half_precision_gradients_accumulate_in_float32():
    x = jnp.zeros((1, 4, 1), jnp.float16)
    offsets = jnp.zeros((1, 300, 1), jnp.int32)
    g = jnp.full((1, 300, 2, 1), 1 + 2**-9, jnp.float16)
    assert aj.scatter_patches(g, offsets, (4,)).dtype == jnp.float32
    grad = jax.grad(lambda a: jnp.sum(aj.extract_patches(a, offsets, 2).astype(jnp.float32) * g))(x)
    assert grad.dtype == jnp.float16 and float(grad[0, 0, 0]) == float(np.float16(300 * (1 + 2**-9)))


def test_patch_offsets_exact_half_to_even():
    cells = jnp.array([[[12, 0], [0, 99]]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(aj.patch_offsets(cells, (25, 100), (1000, 1000), 50)), [[[475, -20], [-5, 970]]])
    # a margin of 3/14 (receptive field 6 on a 14-cell side): exact ties, checked with Fractions
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 14, (2, 40, 1)).astype(np.int32)
    got = np.asarray(aj.patch_offsets(samples, (14,), (56,), (7,), margin=Fraction(3, 14)))
    m = Fraction(3, 14)
    for value, s in zip(got.ravel(), samples.ravel()):
        centre = 56 * (m + Fraction(2 * int(s) + 1, 28) * (1 - 2 * m)) - Fraction(7, 2)
        assert value == round(centre)  # Python's round of a Fraction is half to even
    plain = rng.integers(0, 25, (3, 10, 2)).astype(np.int32)
    np.testing.assert_array_equal(
        np.asarray(aj.patch_offsets(plain, (25, 25), (1000, 800), (50, 30))), atskern.patch_offsets(plain, (25, 25), (1000, 800), (50, 30))
    )
    # an exact tie that float64 arithmetic misses: 800 * 3.5 / 25 - 15.5 = 96.5 -> 96 (even)
    assert int(aj.patch_offsets(jnp.array([[[3]]]), (25,), (800,), 31)[0, 0, 0]) == 96
    with pytest.raises(ValueError, match="margin must be in"):
        aj.patch_offsets(plain, (25, 25), (100, 100), 5, margin=0.5)


def test_float_margins_read_as_atskern_reads_them():
    """A float margin is the simplest fraction that rounds to it, as in atskern (0.1 is 1/10): taken at its exact
    binary value, 1050 (1/10 + 1/12 (4/5)) - 1/2 = 174.5 went to 175 instead of 174."""
    assert int(aj.patch_offsets(jnp.array([[[0]]], jnp.int32), (6,), (1050,), 1, margin=0.1)[0, 0, 0]) == 174
    cells = np.arange(12, dtype=np.int32).reshape(1, 12, 1)
    for margin in (0.1, 0.3, 0.15, 3 / 16, 0.05):
        for level in (1050, 999, 640, 77):
            for patch in (1, 2, 7):
                want = atskern.patch_offsets(cells, (12,), (level,), (patch,), margin=margin)
                np.testing.assert_array_equal(np.asarray(aj.patch_offsets(cells, (12,), (level,), (patch,),
                                                                          margin=margin)), want)


def test_multiscale_matches_atskern():
    rng = np.random.default_rng(2)
    levels = [rng.random((2, 32, 32, 3)).astype(np.float32), rng.random((2, 64, 64, 3)).astype(np.float32)]
    samples = rng.integers(0, 8, (2, 5, 2)).astype(np.int32)
    got = aj.extract_multiscale(levels, samples, (8, 8), [(6, 6), (10, 10)])
    want = atskern.extract_multiscale(levels, samples, (8, 8), [(6, 6), (10, 10)])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_patch_errors_name_the_argument():
    x = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="offsets must be"):
        aj.extract_patches(x, np.zeros((2, 4, 3), np.int32), 3)
    with pytest.raises(TypeError, match="offsets must be an integer"):
        aj.extract_patches(x, np.zeros((2, 4, 2), np.float32), 3)
    with pytest.raises(ValueError, match="patch_size must have 2 entries"):
        aj.extract_patches(x, np.zeros((2, 4, 2), np.int32), (3, 3, 3))
    with pytest.raises(ValueError, match="x must be"):
        aj.extract_patches(np.zeros((8, 8), np.float32), np.zeros((2, 4, 2), np.int32), 3)


# --- the estimator ----------------------------------------------------------------------------


def _draw(replace, seed=0):
    attention = _attention((3, 6, 5), seed, np.float64) + 0.01
    _, probs = atskern.sample(attention, 4, seed=seed, replace=replace)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 4, 2, 3)), probs, rng.standard_normal((3, 2, 3))


@pytest.mark.parametrize("replace", [False, True])
def test_estimator_and_gradients_equal_atskern(x64, replace):
    features, probs, g = _draw(replace)
    dtype = np.float64 if x64 else np.float32
    features, probs, g = features.astype(dtype), probs.astype(dtype), g.astype(dtype)
    value, vjp = jax.vjp(lambda f, a: aj.expectation(f, a, replace=replace), features, probs)
    grad_features, grad_probs = vjp(jnp.asarray(g))
    want_probs, want_features = atskern.expectation_grad(g, features, probs, replace=replace)
    ref_probs, ref_features = reference.expectation_grad(g, features, probs, replace=replace)
    rtol = 1e-12 if x64 else 2e-5
    np.testing.assert_allclose(np.asarray(value), atskern.expectation(features, probs, replace=replace), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(np.asarray(value), reference.expectation(features, probs, replace=replace), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(np.asarray(grad_probs), want_probs, rtol=rtol)
    np.testing.assert_allclose(np.asarray(grad_probs), ref_probs, rtol=rtol)
    np.testing.assert_allclose(np.asarray(grad_features), want_features, rtol=rtol)
    np.testing.assert_allclose(np.asarray(grad_features), ref_features, rtol=rtol)


@pytest.mark.parametrize("replace", [False, True])
def test_zero_probability_entries_weigh_nothing(replace):
    """Rule R3: fillers (probs == 0) get coefficient 0 and gradients 0; everything stays finite."""
    features = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)
    probs = jnp.array([[0.5, 0.3, 0.2, 0.0], [0.25, 0.0, 0.0, 0.0]], jnp.float32)
    value, vjp = jax.vjp(lambda f, a: aj.expectation(f, a, replace=replace), features, probs)
    grad_features, grad_probs = vjp(jnp.ones((2, 3), jnp.float32))
    zero = np.asarray(probs) == 0
    assert np.isfinite(np.asarray(value)).all() and np.isfinite(np.asarray(grad_probs)).all()
    np.testing.assert_array_equal(np.asarray(grad_probs)[zero], 0)
    np.testing.assert_array_equal(np.asarray(grad_features)[zero], 0)
    changed = features.at[0, 3].set(1e6).at[1, 1:].set(-1e6)
    np.testing.assert_array_equal(np.asarray(aj.expectation(changed, probs, replace=replace)), np.asarray(value))
    # the positive entries: the DESIGN formulas, written out (n = 4)
    if not replace:
        c = (np.array([1.0, 0.5, 0.2]) + np.array([3, 2, 1]) * np.array([0.5, 0.3, 0.2])) / 4
        np.testing.assert_allclose(np.asarray(value)[0], (c[:, None] * np.asarray(features)[0, :3]).sum(0), rtol=1e-6)


def test_estimator_checks_probs():
    features = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="probs must be finite and in"):
        aj.expectation(features, np.array([[0.5, -0.1, 0.2], [0.1, 0.1, 0.1]], np.float32))
    with pytest.raises(ValueError, match="probs of row 1 sum to"):
        aj.expectation(features, np.array([[0.5, 0.1, 0.2], [0.6, 0.3, 0.2]], np.float32))
    aj.expectation(features, np.array([[0.6, 0.3, 0.2]] * 2, np.float32), replace=True)
    with pytest.raises(ValueError, match="features must be"):
        aj.expectation(np.ones((2, 4, 4), np.float32), np.full((2, 3), 0.1, np.float32))


def test_float64_selection_is_exact_through_the_float32_prefilter():
    """``smallest``: float32 candidates, then the exact float64 order; rows with float32 ties fall back."""
    from ats.jax._sampling import smallest

    rng = np.random.default_rng(0)
    cases = [
        rng.exponential(size=(4, 300)),  # separated: the refinement
        1 + rng.integers(0, 3, (4, 300)) * 1e-12,  # equal in float32, distinct in float64: the fallback
        np.where(np.arange(300) < 295, np.inf, rng.exponential(size=(4, 300))),  # fillers' infinite keys
    ]
    with jax.enable_x64(True):
        pick = jax.jit(lambda k: smallest(k, 10))
        for keys in cases:
            want = np.lexsort((np.broadcast_to(np.arange(300), keys.shape), keys))[:, :10]
            np.testing.assert_array_equal(np.asarray(pick(jnp.asarray(keys))), want)


@pytest.mark.parametrize("replace", [False, True])
def test_fillers_and_zero_probability_gradients_equal_atskerns(x64, replace):
    """Rules R1-R3 as atskern implements them (short rows, underflowing probabilities, the estimator)."""
    attention = _attention((3, 6, 4), 7)
    attention[0] = 0
    attention[0, 1, [0, 3]] = [0.4, 0.6]
    attention[1, :, :] *= np.arange(24).reshape(6, 4) % 3 > 0
    indices, probs = aj.sample_indices(attention, 5, 12, replace=replace)
    want_indices, want_probs = atskern.sample(attention, 5, seed=12, replace=replace)
    np.testing.assert_array_equal(np.asarray(indices), want_indices)
    np.testing.assert_array_equal(np.asarray(probs) == 0, want_probs == 0)
    features = np.random.default_rng(1).standard_normal((3, 5, 2)).astype(np.float32)
    g = np.ones((3, 2), np.float32)
    grad_probs, grad_features = aj.expectation_grad(g, features, want_probs, replace=replace)
    atol = 0 if x64 else 1e-5
    want_grad_probs, want_grad_features = atskern.expectation_grad(g, features, want_probs, replace=replace)
    np.testing.assert_allclose(np.asarray(grad_probs), want_grad_probs, rtol=2e-6, atol=atol)
    np.testing.assert_allclose(np.asarray(grad_features), want_grad_features, rtol=2e-6, atol=atol)
    with pytest.raises(ValueError, match="attention row 0 has only 2 positive weights"):
        aj.sample_indices(attention, 5, 12, strict=True)
    with pytest.raises(ValueError, match="attention row 0 has only 2 positive weights"):
        atskern.sample(attention, 5, seed=12, strict=True)


@pytest.mark.parametrize("path", ["xla", "kernel"])
def test_sampled_attention_when_the_row_sum_overflows_float32(path):
    """Unnormalized float32 (and float16) rows whose sum overflows: each draw's share of its row, as atskern's
    probabilities (an inf sum made every sampled attention 0)."""
    attention = jnp.array([[3e38, 3e38, 1.0]], jnp.float32)
    indices, sampled = aj.sample(attention, 2, key=0, path=path)
    assert sorted(np.asarray(indices)[0, :, 0].tolist()) == [0, 1]
    np.testing.assert_allclose(np.asarray(sampled), [[0.5, 0.5]], rtol=1e-6)
    jitted = jax.jit(lambda a: aj.sample(a, 2, key=0, path=path)[1])(attention)
    np.testing.assert_allclose(np.asarray(jitted), [[0.5, 0.5]], rtol=1e-6)
    half = aj.sample(jnp.full((1, 64, 64), 20.0, jnp.float16), 3, key=1, path=path)[1]
    np.testing.assert_allclose(np.asarray(half, np.float64), np.full((1, 3), 1 / 4096), rtol=1e-3)


@pytest.mark.parametrize("row, message", [([1.0, float("nan"), 0.5], "contains NaN or inf"),
                                          ([1.0, -3.0, 0.5], "has 1 negative weights"),
                                          ([0.0, 0.0, 0.0], "has no positive weight")])
def test_top_k_mode_refuses_the_rows_sampling_refuses(row, message):
    attention = jnp.array([[0.2, 0.3, 0.5], row])
    with pytest.raises(ValueError, match=f"attention row 1 {message}"):
        aj.sample(attention, 2, deterministic=True)
    aj.sample(attention, 2, deterministic=True, validate=False)
    with pytest.raises(ValueError, match="only 2 positive weights, fewer than n_samples=3"):
        aj.sample(jnp.array([[1.0, 0.0, 0.5]]), 3, deterministic=True, strict=True)


def test_an_int_seed_passed_to_a_jitted_function_draws_as_atskern():
    """A Python int handed to a jitted function arrives as a traced integer scalar: it is the seed itself (it was
    refused as "not a uint32 [k0, k1] array", though the README's jit example passes one)."""
    attention = np.random.default_rng(2).random((2, 8, 8)).astype(np.float32)
    draw = jax.jit(lambda a, key: aj.sample(a, 3, key=key)[0])
    assert np.array_equal(np.asarray(draw(jnp.asarray(attention), 1234)), atskern.sample(attention, 3, seed=1234)[0])
    assert np.array_equal(np.asarray(aj.sample(attention, 3, key=jnp.int32(77))[0]),
                          atskern.sample(attention, 3, seed=77)[0])
    with pytest.raises(ValueError, match=r"key must be an int in \[0, 2\*\*64\), got -1"):
        aj.sample(attention, 3, key=jnp.int32(-1))
