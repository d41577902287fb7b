"""Every public name of the 2019 library imports from its 2019 path; ats.ops.extract_patches and ats.utils helpers."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import ats.ops  # noqa: E402
from ats import utils  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (module, name) for every public name of idiap/attention-sampling (ats/ at its last commit)
NAMES_2019 = [
    ("ats.core", "attention_sampling"),
    ("ats.core", "SamplePatches"),
    ("ats.core", "Expectation"),
    ("ats.core.ats_layer", "attention_sampling"),
    ("ats.core.ats_layer", "SamplePatches"),
    ("ats.core.ats_layer", "Expectation"),
    ("ats.core.builder", "ATSBuilder"),
    ("ats.core.builder", "ATSOutput"),
    ("ats.core.expectation", "expected"),
    ("ats.core.sampling", "sample"),
    ("ats.data", "FromTensors"),
    ("ats.data.base", "MultiResolutionBatch"),
    ("ats.data.from_tensors", "FromTensors"),
    ("ats.ops.extract_patches", "extract_patches"),
    *[("ats.utils", name) for name in ("to_tensor", "to_dtype", "to_float16", "to_float32", "to_float64", "to_double",
                                       "to_int8", "to_int16", "to_int32", "to_int64", "expand_many")],
    *[("ats.utils.layers", name) for name in ("SampleSoftmax", "L2Normalize", "ResizeImages", "TotalReshape",
                                              "ActivityRegularizer", "ImageLinearTransform", "ImagePan")],
    ("ats.utils.regularizers", "MultinomialEntropy"),
    ("ats.utils.regularizers", "multinomial_entropy"),
    *[("ats.utils.training", name) for name in ("Batcher", "DataTransform", "LambdaTransform", "compose_sequences")],
]


@pytest.mark.parametrize(("module", "name"), NAMES_2019, ids=[f"{m}.{n}" for m, n in NAMES_2019])
def test_2019_name_imports_from_its_2019_path(module, name):
    assert callable(getattr(importlib.import_module(module), name))


def test_2019_submodules_are_attributes_after_import_ats_core():
    code = (
        "import ats.core, ats.data; "
        "print(ats.core.sampling.sample.__name__, ats.core.expectation.expected.__name__, "
        "ats.core.builder.ATSBuilder.__name__, ats.core.ats_layer.SamplePatches.__name__, "
        "ats.data.base.MultiResolutionBatch.__name__)"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'adapters'}", "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["sample", "expected", "ATSBuilder", "SamplePatches", "MultiResolutionBatch"]


# --- ats.ops.extract_patches: module path and function ---------------------------


def _direct(x, offsets, size):
    """Patches by slicing a zero-padded copy (independent of the kernels)."""
    pad = max(size) + int(np.abs(offsets).max())
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros((x.shape[0], offsets.shape[1], *size, x.shape[-1]), x.dtype)
    for b in range(x.shape[0]):
        for k in range(offsets.shape[1]):
            r, c = offsets[b, k] + pad
            out[b, k] = padded[b, r : r + size[0], c : c + size[1]]
    return out


def test_extract_patches_is_both_a_module_and_a_function():
    from ats.ops.extract_patches import extract_patches

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 30, 30, 2)).astype(np.float32)
    offsets = rng.integers(0, 21, size=(3, 4, 2)).astype(np.int32)
    want = _direct(x, offsets, (10, 10))
    np.testing.assert_array_equal(extract_patches(x, offsets, [10, 10]).numpy(), want)
    np.testing.assert_array_equal(ats.ops.extract_patches(x, offsets, (10, 10)).numpy(), want)
    import ats.ops.extract_patches as module

    assert module is ats.ops.extract_patches
    np.testing.assert_array_equal(module(x, offsets, np.array([10, 10])).numpy(), want)


def test_extract_patches_2019_out_of_bounds_case():
    # 2019's test: offsets (0, b - 5) along the width; outside pixels are 0
    from ats.ops.extract_patches import extract_patches

    x = np.random.default_rng(1).uniform(size=(10, 100, 100, 3)).astype(np.float32)
    offsets = np.zeros((10, 1, 2), np.int32)
    offsets[:, 0, 1] = np.arange(10) - 5
    patches = extract_patches(x, offsets, tf.constant([10, 10])).numpy()
    want = np.zeros((10, 1, 10, 10, 3), np.float32)
    for b in range(10):
        source = slice(max(b - 5, 0), min(5 + b, max(b - 5, 0) + 10))
        target = slice(max(5 - b, 0), 10)
        want[b, 0, :, target] = x[b, :10, source]
    np.testing.assert_array_equal(patches, want)


def test_extract_patches_size_tensor_known_at_trace_time():
    from ats.ops.extract_patches import extract_patches

    x = np.random.default_rng(2).uniform(size=(2, 20, 20, 3)).astype(np.float32)
    offsets = np.array([[[0, 0], [5, 7]]] * 2, np.int32)

    @tf.function
    def traced(x, offsets):
        return extract_patches(x, offsets, tf.constant([4, 6]))

    out = traced(x, offsets)
    assert out.shape == (2, 2, 4, 6, 3)
    np.testing.assert_array_equal(out.numpy(), _direct(x, offsets, (4, 6)))

    @tf.function
    def from_static_shape(x, offsets):
        return extract_patches(x, offsets, tf.shape(x)[1:3])

    assert from_static_shape(x, offsets).shape == (2, 2, 20, 20, 3)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3)), tf.TensorSpec((None, None, 2), tf.int32),
                                  tf.TensorSpec((2,), tf.int32)])
    def run_time_size(x, offsets, size):
        return extract_patches(x, offsets, size)

    with pytest.raises(ValueError, match="size must be known when the op is traced"):
        run_time_size(x, offsets, [4, 4])


def test_extract_patches_static_shape_inference():
    # 2019's shape-inference test: unknown batch and patch count, known size and channels
    from ats.ops.extract_patches import extract_patches

    @tf.function(input_signature=[tf.TensorSpec((None, 100, 100, 3)), tf.TensorSpec((None, None, 2), tf.int32)])
    def graph(x, offsets):
        patches = extract_patches(x, offsets, [10, 10])
        assert tuple(patches.shape) == (None, None, 10, 10, 3)
        return patches

    graph.get_concrete_function()


def test_extract_patches_rejects_a_float_size_array():
    with pytest.raises(TypeError, match="size must hold integers"):
        ats.ops.extract_patches(np.zeros((1, 8, 8, 1), np.float32), np.zeros((1, 1, 2), np.int32), np.array([2.0, 2.0]))


# --- ats.utils -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("helper", "dtype"),
    [("to_float16", "float16"), ("to_float32", "float32"), ("to_float64", "float64"), ("to_double", "float64"),
     ("to_int8", "int8"), ("to_int16", "int16"), ("to_int32", "int32"), ("to_int64", "int64")],
)
def test_cast_helpers(helper, dtype):
    x = np.array([1.75, -2.25, 3.0])
    out = keras.ops.convert_to_numpy(getattr(utils, helper)(x))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, x.astype(dtype))


def test_to_dtype_unsigned_and_errors():
    out = keras.ops.convert_to_numpy(utils.to_dtype(np.array([1, 200]), "int", 8, sign=False))
    assert out.dtype == np.uint8 and out.tolist() == [1, 200]
    with pytest.raises(ValueError, match="width must be one of"):
        utils.to_dtype(np.ones(2), "float", 12)
    with pytest.raises(ValueError, match="width must be one of .* got 32.0"):
        utils.to_dtype(np.ones(2), "float", 32.0)  # once "Invalid dtype: float32.0"
    assert keras.ops.convert_to_numpy(utils.to_dtype(np.ones(2), "float", np.int64(16))).dtype == np.float16
    with pytest.raises(ValueError, match="no unsigned float32"):
        utils.to_dtype(np.ones(2), "float", 32, sign=False)
    with pytest.raises(ValueError, match="type must be one of"):
        utils.to_dtype(np.ones(2), "complex", 64)


def test_to_tensor_keeps_tensors_and_converts_the_rest():
    t = tf.constant([1.5])
    assert utils.to_tensor(t) is t
    assert utils.to_tensor([1, 2]).dtype == tf.int32
    assert utils.to_tensor([1, 2], dtype="float32").dtype == tf.float32
    symbolic = keras.Input((3,))
    assert utils.to_tensor(symbolic) is symbolic


def test_expand_many_and_symbolic_use():
    assert tuple(utils.expand_many(np.ones((2, 3)), [0, -1, -1]).shape) == (1, 2, 3, 1, 1)
    symbolic = keras.Input((3,))
    assert tuple(utils.expand_many(utils.to_float16(symbolic), [-1]).shape) == (None, 3, 1)


def test_import_ats_utils_is_light():
    code = "import sys, ats.utils; print('keras' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{ROOT}:{ROOT / 'adapters'}"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
