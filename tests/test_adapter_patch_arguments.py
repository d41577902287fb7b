"""Patch arguments at the edges of their dtypes, on the TensorFlow and JAX front ends: offsets of every integer
dtype (far outside an image they must stay outside, never wrap back in), cells of uint64, ``fill`` checked
against the images' dtype on every path, checks at trace time, ml_dtypes images, one patch size per level."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import atskern  # noqa: E402
from ats import ops  # noqa: E402
from ats import jax as ajax  # noqa: E402
from ats.tf import xla  # noqa: E402

FILL = -7


def sliced_patches(x, offsets, patch, fill):
    """Independent gather, channels-last 2-D: each pixel read by plain indexing where it lies in ``x``."""
    batch, height, width, channels = x.shape
    count = len(offsets[0])
    out = np.full((batch, count, patch, patch, channels), fill, x.dtype)
    for b in range(batch):
        for k, (top, left) in enumerate(offsets[b]):
            for i in range(patch):
                for j in range(patch):
                    if 0 <= top + i < height and 0 <= left + j < width:
                        out[b, k, i, j] = x[b, top + i, left + j]
    return out


def offset_cases(dtype):
    """``(1, K, 2)`` offsets of ``dtype``: inside the 200 x 6 image, at the dtype's limits, and past int32."""
    info = np.iinfo(dtype)
    rows = [(1, 2), (min(150, info.max), 3), (min(198, info.max), 4), (info.max, 0), (0, info.max), (info.min, 1)]
    if info.min < 0:
        rows += [(-1, -1), (2, -1)]
    if info.max > 2**32:
        rows += [(2**32 + 1, 1), (1, 2**32 + 2)]
    if info.min < -(2**32):
        rows += [(-(2**32) + 1, 1)]
    return np.array([rows], dtype)


IMAGE = np.arange(1, 1 + 200 * 6, dtype=np.float32).reshape(1, 200, 6, 1)
DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def tf_paths():
    return {
        "ats.ops eager": lambda x, o: ops.extract_patches(x, o, 2, fill=FILL),
        "ats.ops tf.function": tf.function(lambda x, o: ops.extract_patches(x, o, 2, fill=FILL)),
        "ats.ops jit_compile": tf.function(lambda x, o: ops.extract_patches(x, o, 2, fill=FILL), jit_compile=True),
        "ats.tf.xla eager": lambda x, o: xla.extract_patches(x, o, 2, fill=FILL),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tensorflow_offsets_of_every_integer_dtype_read_what_slicing_reads(dtype):
    offsets = offset_cases(dtype)
    want = sliced_patches(IMAGE, offsets.tolist(), 2, FILL)
    np.testing.assert_array_equal(atskern.extract_patches(IMAGE, offsets, 2, fill=FILL), want)
    for name, gather in tf_paths().items():
        got = gather(tf.constant(IMAGE), tf.constant(offsets)).numpy()
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_jax_offsets_of_every_integer_dtype_read_what_slicing_reads(dtype):
    offsets = offset_cases(dtype)
    want = sliced_patches(IMAGE, offsets.tolist(), 2, FILL)
    jitted = jax.jit(lambda x, o: ajax.extract_patches(x, o, 2, fill=FILL, path="xla"))
    for path in ("kernel", "xla"):
        got = np.asarray(ajax.extract_patches(IMAGE, offsets, 2, fill=FILL, path=path))
        np.testing.assert_array_equal(got, want, err_msg=f"NumPy offsets, {path} path")
    if np.dtype(dtype).itemsize < 8:  # JAX holds 64-bit integers only with x64
        np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(IMAGE), jnp.asarray(offsets))), want)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(lambda x, o: ajax.extract_patches(x, o, 2, fill=FILL, path="xla"))(
            jnp.asarray(IMAGE), jnp.asarray(offsets)))
        np.testing.assert_array_equal(got, want, err_msg="x64, jit")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint32], ids=lambda d: np.dtype(d).name)
def test_jax_xla_scatter_of_narrow_offsets_is_the_adjoint(dtype):
    offsets = np.array([[[1, 2], [120, 0], [np.iinfo(dtype).max, 1]]], dtype)
    grad = np.random.default_rng(0).integers(-4, 5, size=(1, 3, 2, 2, 1)).astype(np.float32)
    want = atskern.scatter_patches(grad, offsets.astype(np.int64), (200, 6))
    got = np.asarray(ajax.scatter_patches(jnp.asarray(grad), jnp.asarray(offsets), (200, 6), path="xla"))
    np.testing.assert_array_equal(got, want)
    image_grad = jax.grad(lambda x: jnp.sum(ajax.extract_patches(x, jnp.asarray(offsets), 2, path="xla") * grad))
    np.testing.assert_array_equal(np.asarray(jax.jit(image_grad)(jnp.asarray(IMAGE))), want)


def test_uint64_cells_past_int64_stay_outside_the_grid_in_tensorflow():
    samples = np.array([[[2**64 - 1, 0], [2**63, 1], [1, 1]]], np.uint64)
    want = atskern.patch_offsets(samples, (4, 4), (40, 40), 12)
    got = ops.patch_offsets(tf.constant(samples), (4, 4), (40, 40), 12).numpy()
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 0] > 40 and got[0, 1, 0] > 40  # below the image, not on its first row


@pytest.mark.parametrize("fill", [300, -1, 1.5], ids=str)
def test_unrepresentable_fill_is_refused_on_every_path(fill):
    x = np.zeros((1, 4, 4, 1), np.uint8)
    offsets = np.array([[[0, 0]]], np.int32)
    calls = {
        "atskern": lambda: atskern.extract_patches(x, offsets, 2, fill=fill),
        "ats.tf.xla": lambda: xla.extract_patches(tf.constant(x), tf.constant(offsets), 2, fill=fill),
        "ats.ops jit_compile": lambda: tf.function(lambda a, o: ops.extract_patches(a, o, 2, fill=fill),
                                                   jit_compile=True)(tf.constant(x), tf.constant(offsets)),
        "ats.jax xla": lambda: ajax.extract_patches(x, offsets, 2, fill=fill, path="xla"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="fill=.* cannot be represented in the images' dtype uint8"):
            call()
            pytest.fail(name)


@pytest.mark.parametrize("fill", [True, np.float32(2), np.int64(3)], ids=repr)
def test_numpy_scalar_and_bool_fills_are_accepted_wherever_atskern_accepts_them(fill):
    dtype = np.bool_ if isinstance(fill, bool) else np.float32
    x = np.zeros((1, 2, 2, 1), dtype)
    offsets = np.array([[[5, 5]]], np.int32)  # outside: every pixel is the fill
    want = atskern.extract_patches(x, offsets, 1, fill=fill)
    assert want.ravel()[0] == fill
    got = {
        "ats.jax kernel": ajax.extract_patches(x, offsets, 1, fill=fill, path="kernel"),
        "ats.jax xla": ajax.extract_patches(x, offsets, 1, fill=fill, path="xla"),
        "ats.tf.xla": xla.extract_patches(tf.constant(x), tf.constant(offsets), 1, fill=fill).numpy(),
        "ats.ops": ops.extract_patches(tf.constant(x), tf.constant(offsets), 1, fill=fill).numpy(),
    }
    for name, patches in got.items():
        np.testing.assert_array_equal(np.asarray(patches), want, err_msg=name)


@pytest.mark.parametrize(("name", "fill"), [("int4", 8), ("int4", -9), ("uint4", 16), ("uint4", -1), ("int2", 2),
                                            ("float4_e2m1fn", 7.0), ("float4_e2m1fn", -1000.0),
                                            ("float8_e4m3fn", 464.0), ("float6_e2m3fn", 7.75)])
def test_fills_an_ml_dtypes_image_cannot_hold_are_refused(name, fill):
    x = np.zeros((1, 3, 3, 1), getattr(ml_dtypes, name))
    with pytest.raises(ValueError, match=f"fill={fill!r} cannot be represented in the images' dtype {name}"):
        atskern.extract_patches(x, np.array([[[-5, -5]]]), 1, fill=fill)


@pytest.mark.parametrize(("name", "fill"), [("int4", 7), ("int4", -8), ("uint4", 15), ("int2", -2),
                                            ("float4_e2m1fn", 6.9), ("float8_e4m3fn", 463.0)])
def test_fills_an_ml_dtypes_image_holds_give_the_cast_value(name, fill):
    dtype = getattr(ml_dtypes, name)
    got = atskern.extract_patches(np.zeros((1, 3, 3, 1), dtype), np.array([[[-5, -5]]]), 1, fill=fill)
    assert got.dtype == dtype and got.ravel()[0] == np.asarray(fill).astype(dtype)


def test_ats_ops_checks_its_arguments_when_traced():
    x = tf.zeros((1, 4, 4, 1), tf.uint8)
    offsets = tf.constant([[[0, 0]]])
    cases = [
        (ValueError, "fill=300 cannot be represented", x, offsets, {"fill": 300}),
        (TypeError, "x must have a numeric dtype of item size 1, 2, 4 or 8", tf.zeros((1, 4, 4, 1), tf.complex128),
         offsets, {}),
        (ValueError, "offsets and x must share the batch size, got offsets 2, x 1", x, tf.zeros((2, 1, 2), tf.int32), {}),
        (TypeError, "channels_first must be True or False", x, offsets, {"channels_first": "no"}),
    ]
    for error, message, a, o, kwargs in cases:
        traced = tf.function(lambda a, o, kwargs=kwargs: ops.extract_patches(a, o, 2, **kwargs))
        with pytest.raises(error, match=message):
            traced.get_concrete_function(a, o)


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_ats_ops_gathers_eager_ml_dtypes_tensors(name):
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1).astype(getattr(ml_dtypes, name))
    offsets = np.array([[[1, 1], [3, -1]]], np.int32)
    want = sliced_patches(image, offsets.tolist(), 2, 0)
    for gather in (ops.extract_patches, tf.function(ops.extract_patches)):
        got = gather(tf.constant(image), tf.constant(offsets), 2)
        assert got.dtype.as_numpy_dtype == image.dtype
        np.testing.assert_array_equal(got.numpy().astype(np.float32), want.astype(np.float32))


def test_ats_ops_multiscale_takes_one_patch_size_per_level_as_every_front_end():
    rng = np.random.default_rng(3)
    levels = [rng.random((1, 32, 32, 2)).astype(np.float32), rng.random((1, 16, 16, 2)).astype(np.float32)]
    samples = np.array([[[1, 2], [3, 0]]], np.int32)
    want = atskern.extract_multiscale(levels, samples, (4, 4), [8, 4])
    got = ops.extract_multiscale([tf.constant(level) for level in levels], tf.constant(samples), (4, 4), [8, 4])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)
    first = [np.moveaxis(level, -1, 1) for level in levels]
    got = ops.extract_multiscale([tf.constant(level) for level in first], tf.constant(samples), (4, 4), [8, 4],
                                 channels_first=True)
    for g, w in zip(got, atskern.extract_multiscale(first, samples, (4, 4), [8, 4], channels_first=True)):
        np.testing.assert_array_equal(g.numpy(), w)
    with pytest.raises(ValueError, match=r"patch_sizes must be a list with one entry per level \(2 levels\)"):
        ops.extract_multiscale([tf.constant(level) for level in levels], tf.constant(samples), (4, 4), (8, 4, 2))


def test_patch_offsets_refuse_levels_that_int32_cannot_address():
    """Offsets clipped to int32 would move patches inside a level longer than 2**31 - 1 pixels: the TensorFlow and
    JAX patch_offsets (int32) refuse such a level, naming level_shape."""
    cells = np.array([[[0, 3]]])
    long = (1 << 31) + 1
    for name, patch_offsets in (("ats.ops", ops.patch_offsets), ("ats.tf.xla", xla.patch_offsets),
                                ("ats.jax", ajax.patch_offsets)):
        with pytest.raises(ValueError, match="level_shape .* longer than 2\\*\\*31 - 1"):
            patch_offsets(cells, (1, 4), (1, long), (1, 4))
        np.testing.assert_array_equal(np.asarray(patch_offsets(cells, (1, 4), (1, 2**31 - 1), (1, 4))),
                                      atskern.patch_offsets(cells, (1, 4), (1, 2**31 - 1), (1, 4)), err_msg=name)
