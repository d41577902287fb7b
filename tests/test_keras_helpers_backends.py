"""The 2019 helpers (ats.utils.*, ats.data, sample/expected, ATSBuilder) on Keras' TensorFlow, torch and JAX backends.

Keras fixes its backend at import, so each backend runs
``tests/keras_helpers_script.py`` once in a fresh process (TensorFlow first:
it saves the model the others load). Every value is checked here against an
independent NumPy computation, and the backends against each other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from .keras_helpers_script import LEVEL, SEED, inputs

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "torch", "jax")
DATA = inputs()


def _available(backend):
    return importlib.util.find_spec(backend) is not None and importlib.util.find_spec("keras") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{backend: results}`` of one fresh process per backend (TensorFlow first)."""
    folder = tmp_path_factory.mktemp("keras-helpers")
    results = {}
    for backend in BACKENDS:
        if not _available(backend) or (backend != "tensorflow" and "tensorflow" not in results):
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters")])}
        out = folder / f"{backend}.json"
        done = subprocess.run([sys.executable, "-m", "tests.keras_helpers_script", str(out), str(folder)], cwd=ROOT,
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, f"{backend}:\n{done.stderr[-4000:]}"
        results[backend] = json.loads(out.read_text())
    return results


@pytest.fixture(params=BACKENDS)
def run(request, runs):
    if request.param not in runs:
        pytest.skip(f"{request.param} (or TensorFlow, which saves the shared model) is not installed")
    result = runs[request.param]
    assert result["backend"] == request.param
    return result


def _a(value):
    return np.asarray(value)


# --- independent NumPy references ---------------------------------------------------------------


def _softmax_reference(x, smooth):
    flat = x.reshape(len(x), -1).astype(np.float64)
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return (p * (1 - smooth) + smooth / flat.shape[1]).reshape(x.shape[:-1])


def _linear_resize(x, out, axis):
    """Linear interpolation at pixel centres along ``axis`` (source coordinate clamped to the image)."""
    size = x.shape[axis]
    centre = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
    low = np.floor(centre).astype(int)
    high = np.minimum(low + 1, size - 1)
    t = (centre - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, low, axis) * (1 - t) + np.take(x, high, axis) * t


def _nearest_resize(x, out, axis):
    size = x.shape[axis]
    return np.take(x, np.minimum(np.floor((np.arange(out) + 0.5) * size / out).astype(int), size - 1), axis)


def _shifted(image, dy, dx):
    """``image`` moved by (dy, dx) whole pixels, zeros shifted in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


def _shift_of(panned, image, pixels):
    """The whole-pixel shifts within ``pixels`` that turn ``image`` into ``panned``."""
    return [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)
            if np.array_equal(_shifted(image, dy, dx), panned)]


def _estimator_reference(probs, features, weights, upstream, replace):
    """Value and gradients of the weighted ATS estimator from its formulas, in float64 and loops."""
    a, f, w, g = (np.asarray(v, np.float64) for v in (probs, features, weights, upstream))
    batch, n = a.shape
    value, grad_a, grad_f = np.zeros((batch, f.shape[2])), np.zeros((batch, n)), np.zeros_like(f)
    for b in range(batch):
        for k in range(n):
            if replace:
                coef, scale = w[b, k], w[b, k] / a[b, k]
            else:
                left = 1 - a[b, :k].sum()
                later = w[b, k + 1:].sum()
                coef, scale = w[b, k] * left + a[b, k] * later, w[b, k] * left / a[b, k] + later
            value[b] += coef * f[b, k]
            grad_f[b, k] = coef * g[b]
            grad_a[b, k] = scale * g[b] @ f[b, k]
    return value, grad_a, grad_f


def _rint(q: Fraction) -> int:
    """Round half to even, exactly."""
    floor = q.numerator // q.denominator
    rest = q - floor
    return floor + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1))


def _level_reference(samples, offsets, sample_space, previous_patch_size, patch_size, shape_from, shape_to):
    out = np.zeros(samples.shape, np.int64)
    for index in np.ndindex(samples.shape):
        d = index[-1]
        ratio = Fraction(shape_to[d], shape_from[d])
        offset = Fraction(float(offsets[index])).limit_denominator(2)
        centre = offset * ratio + (Fraction(int(samples[index])) + Fraction(1, 2)) * previous_patch_size[d] * ratio / \
            sample_space[d]
        out[index] = _rint(centre - Fraction(patch_size[d], 2))
    return out


# --- values, per backend -------------------------------------------------------------------------


def test_layers_equal_numpy(run):
    np.testing.assert_allclose(_a(run["softmax"]), _softmax_reference(DATA["softmax_x"], 0.1), rtol=1e-5, atol=1e-7)
    x = DATA["l2_x"].astype(np.float64)
    norm = np.sqrt(np.maximum((x**2).sum(axis=1, keepdims=True), 1e-12))
    np.testing.assert_allclose(_a(run["l2"]), x / norm, rtol=1e-5, atol=1e-7)
    assert not _a(run["l2"])[-1].any()  # the zero row stays zero (no division by zero)
    np.testing.assert_array_equal(_a(run["reshape"]), DATA["reshape_x"].reshape(-1, 4))
    p = DATA["entropy_p"].astype(np.float64)
    entropy = 0.5 * np.sum(p * np.log(p + 1e-6)) / len(p)
    assert run["entropy"] == pytest.approx(entropy, rel=1e-5)
    identity, losses = run["activity"]
    assert identity and losses == [pytest.approx(entropy, rel=1e-5)]
    assert run["softmax_grad_finite"]


def test_casts(run):
    f16, u8, default, f64, shape, error = run["casts"]
    assert (f16, u8, default, shape) == ("float16", "uint8", "int32", [1, 2, 3, 4, 1])
    assert f64 == ("float32" if run["backend"] == "jax" else "float64")  # JAX without x64 has no float64
    assert error[0] == "ValueError" and "float8" in error[1]


def test_resize_equals_numpy(run):
    x = DATA["resize_x"].astype(np.float64)
    bilinear = _linear_resize(_linear_resize(x, 4, 1), 5, 2)
    np.testing.assert_allclose(_a(run["resize_bilinear"]), bilinear, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_a(run["resize_nearest"]), _nearest_resize(_nearest_resize(x, 4, 1), 5, 2).astype(np.float32))


def test_linear_transform_is_an_affine_map_per_image(run):
    x = DATA["linear_x"].astype(np.float64)
    np.testing.assert_allclose(_a(run["linear_fixed"]), 0.75 * x + 0.125, rtol=1e-6)
    changed = 0
    for image, out in zip(x, _a(run["linear"]).astype(np.float64)):
        if np.array_equal(out, image.astype(np.float32)):
            continue
        changed += 1
        (a, b), *_ = np.linalg.lstsq(np.stack([image.ravel(), np.ones(image.size)], 1), out.ravel(), rcond=None)
        np.testing.assert_allclose(out, a * image + b, atol=1e-5)  # one (a, b) for the whole image
        assert 0.5 - 1e-5 <= a <= 1.5 + 1e-5 and -0.2 - 1e-5 <= b <= 0.2 + 1e-5
    assert 0 < changed < len(x)  # p = 0.5 over 6 images with this seed: some of each


def test_pan_is_a_whole_pixel_shift_per_image(run):
    x = DATA["pan_x"]
    shifts = [_shift_of(out, image, 3) for image, out in zip(x, _a(run["pan"]))]
    assert all(len(s) == 1 for s in shifts), shifts
    assert any(dy != 0 for (dy, _), in shifts) and any(dx != 0 for (_, dx), in shifts)
    for image, out in zip(x, _a(run["pan_horizontal"])):
        ((dy, dx),) = _shift_of(out, image, 3)
        assert dy == 0
    moved = 0
    for image, out in zip(x, _a(run["pan_half"])):
        ((dy, dx),) = _shift_of(out, image, 3)
        assert dx == 0
        moved += dy != 0
    assert 0 < moved < len(x)


@pytest.mark.parametrize("layer", ["linear_seed", "pan_seed"])
def test_augmentations_reproducible_with_a_seed_fresh_without(run, layer):
    assert run[layer] == {"same_seed_same_output": True, "second_call_differs": True, "unseeded_differ": True,
                          "inference_identity": True}


def test_bad_arguments_are_value_errors_naming_them(run):
    errors = run["errors"]
    for name, error in errors.items():
        if name == "area" and run["backend"] == "tensorflow":
            assert error is None  # TensorFlow's resize has "area"
            continue
        assert error is not None, name
        kind, message = error
        assert kind == "ValueError", (name, error)
        word = {"pan_mode": "mode", "area": "mode"}.get(name, name)
        assert word in message, (name, message)
    if run["backend"] != "tensorflow":
        assert f"'{run['backend']}' backend" in errors["area"][1]


def test_level_offsets_int32_overflow_is_refused_not_wrapped(run):
    error = run["level_overflow"]
    if run["backend"] == "jax":  # no 64-bit integers without jax_enable_x64
        assert error[0] == "ValueError" and "jax_enable_x64" in error[1], error
    else:
        assert error is None


def test_sample_equals_the_kernel_and_gathers_the_attention(run):
    atskern = pytest.importorskip("atskern")
    att = DATA["attention"]
    samples, sampled, replaced, dtype = run["sample"]
    samples, sampled = _a(samples), _a(sampled)
    assert dtype == "int32" and samples.shape == (3, 4, 2)
    np.testing.assert_array_equal(samples, atskern.sample(att, 4, seed=SEED)[0])
    np.testing.assert_array_equal(_a(replaced), atskern.sample(att, 4, replace=True, seed=SEED)[0])
    rows = np.arange(3)[:, None]
    np.testing.assert_array_equal(sampled, att[rows, samples[..., 0], samples[..., 1]])
    assert all(len({tuple(c) for c in row}) == 4 for row in samples)  # without replacement: distinct cells
    logit_samples, at_logits = (_a(v) for v in run["sample_logits"])
    np.testing.assert_array_equal(logit_samples, samples)  # softmax(log p) = p: the same draw
    np.testing.assert_allclose(at_logits, np.log(att)[rows, samples[..., 0], samples[..., 1]], rtol=1e-6)


def test_sample_seed_forms_are_the_kernel_seeds(run):
    """A seed tensor s draws atskern's seed s (mod 2**64), an int above 2**32 its own seed, and rank 1 the
    salted seed (ats._distributed.salted_seed), on every backend."""
    atskern = pytest.importorskip("atskern")
    from ats._distributed import salted_seed

    att = DATA["attention"]
    tensor, negative, large, rank1 = (_a(v) for v in run["sample_seed_forms"])
    np.testing.assert_array_equal(tensor, atskern.sample(att, 4, seed=SEED)[0])
    np.testing.assert_array_equal(negative, atskern.sample(att, 4, seed=2**64 - SEED)[0])
    np.testing.assert_array_equal(large, atskern.sample(att, 4, seed=2**40 + SEED)[0])
    salted = salted_seed(SEED, 1)
    assert salted != SEED
    np.testing.assert_array_equal(rank1, atskern.sample(att, 4, seed=salted)[0])
    assert not np.array_equal(rank1, atskern.sample(att, 4, seed=SEED)[0])  # the salt changes the draw here


@pytest.mark.parametrize("replace", [False, True], ids=["without", "with"])
def test_weighted_expected_value_and_gradients_equal_the_formulas(run, replace):
    value, grad_a, grad_f, default = (_a(v) for v in run["expected_" + ("replace" if replace else "noreplace")])
    probs = _a(run["sample"][1])
    ref = _estimator_reference(probs, DATA["features"], DATA["weights"], DATA["upstream"], replace)
    np.testing.assert_allclose(value, ref[0], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad_a, ref[1], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad_f, ref[2], rtol=2e-5, atol=1e-6)
    uniform = _estimator_reference(probs, DATA["features"], np.full((3, 4), 0.25), DATA["upstream"], replace)
    np.testing.assert_allclose(default, uniform[0], rtol=2e-5, atol=1e-6)  # weights=None: 1/n


def test_level_offsets_and_patches_equal_exact_arithmetic(run):
    reference = _level_reference(DATA["level_samples"], DATA["level_offsets"], **LEVEL)
    np.testing.assert_array_equal(_a(run["level_offsets"]), reference)
    patches, offsets = (_a(v) for v in run["from_tensors"])
    starts = _level_reference(DATA["level_samples"], np.zeros((2, 3, 2)), [5, 5], [10, 8], [6, 5], [10, 8], [40, 30])
    np.testing.assert_array_equal(offsets, starts)
    x = DATA["level_x"]
    padded = np.pad(x, ((0, 0), (8, 8), (8, 8), (0, 0)))
    for b, k in np.ndindex(2, 3):
        r, c = starts[b, k] + 8
        np.testing.assert_array_equal(patches[b, k], padded[b, r:r + 6, c:c + 5])


def test_symbolic_patches_take_an_int_size_per_dimension(run):
    assert run["symbolic_int_size"] == [None, 3, 6, 6, 3]


def test_model_fits_saves_and_loads(run):
    assert run["fit"]["finite_loss"] and run["fit"]["augmentation_state_advanced"]
    if run["backend"] == "jax":
        assert run["fit"]["jit"]  # the seeded augmentations and Sample ran under jax.jit
    assert run["save_load_same"]
    assert run["config_round_trip"] and all(run["config_round_trip"].values()), run["config_round_trip"]


# --- the backends against each other -------------------------------------------------------------


DETERMINISTIC = ["softmax", "l2", "reshape", "resize_bilinear", "resize_nearest", "linear_fixed", "level_offsets",
                 "from_tensors", "sample", "expected_noreplace", "expected_replace"]


def test_backends_agree(runs):
    if len(runs) < 2:
        pytest.skip("fewer than two Keras backends installed")
    first, *others = runs.values()
    for other in others:
        for key in DETERMINISTIC:
            for a, b in zip(first[key], other[key]):
                if isinstance(a, str):
                    assert a == b
                else:
                    np.testing.assert_allclose(_a(a), _a(b), rtol=1e-5, atol=1e-6, err_msg=f"{key} {other['backend']}")
        assert other["entropy"] == pytest.approx(first["entropy"], rel=1e-6)
        # the model saved under TensorFlow predicts what it predicted there
        for a, b in zip(first["prediction"], other["tensorflow_model_prediction"]):
            np.testing.assert_allclose(_a(b), _a(a), rtol=1e-4, atol=1e-5, err_msg=other["backend"])
