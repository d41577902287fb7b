"""extract_patches / scatter_patches / multi-scale: every backend against atskern.reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atskern
from atskern import reference
from atskern._memory import aligned_empty
from .conftest import HAS_GPU, to_backend, to_numpy
from .memmap_probe import run_next_to_big_memmap

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [np.uint8, np.int16, np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.int64]
SPATIAL = {1: (23,), 2: (13, 17), 3: (5, 7, 9)}
PATCH = {1: (6,), 2: (4, 5), 3: (3, 2, 4)}


def random_images(rng, shape, dtype):
    values = rng.integers(-100, 100, size=shape) if np.dtype(dtype).kind in "iV" else rng.integers(0, 250, size=shape)
    if np.dtype(dtype).kind in "fV":
        values = values + rng.random(shape)
    return values.astype(dtype)


def random_offsets(rng, batch, count, spatial, patch, dtype=np.int32):
    """Offsets inside, straddling and far outside the image."""
    offsets = np.stack([rng.integers(-p - 2, s + 2, size=(batch, count)) for s, p in zip(spatial, patch)], axis=-1)
    offsets[0, 0] = 0
    if count > 2:
        offsets[0, 1, 0] = -(10**6)
        offsets[-1, 2, -1] = 10**6
    return offsets.astype(dtype)


def skip_unsupported(backend, dtype):
    if backend == "gpu" and np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        pytest.skip("CuPy has no bfloat16 arrays")


def images_shape(batch, spatial, channels, channels_first):
    return (batch, channels) + spatial if channels_first else (batch,) + spatial + (channels,)


# --- gather -------------------------------------------------------------------


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_extract_matches_reference(backend, dtype, ndim, channels_first, small_gpu_blocks):
    skip_unsupported(backend, dtype)
    rng = np.random.default_rng(ndim)
    spatial, patch = SPATIAL[ndim], PATCH[ndim]
    x = random_images(rng, images_shape(2, spatial, 3, channels_first), dtype)
    offsets = random_offsets(rng, 2, 5, spatial, patch)
    expected = reference.extract_patches(x, offsets, patch, fill=7, channels_first=channels_first)
    got = atskern.extract_patches(to_backend(x, backend), to_backend(offsets, backend), patch, fill=7,
                                  channels_first=channels_first)
    got = to_numpy(got)
    assert got.dtype == np.dtype(dtype)
    assert got.shape == ((2, 5, 3) + patch if channels_first else (2, 5) + patch + (3,))
    assert np.array_equal(got.view(f"u{got.itemsize}"), expected.view(f"u{got.itemsize}"))
    assert (got[0, 1] == np.asarray(7).astype(dtype)).all(), "a patch far outside is all fill"


def test_extract_known_values():
    x = np.arange(2 * 4 * 5 * 2, dtype=np.int64).reshape(2, 4, 5, 2)
    offsets = np.array([[[1, 2]], [[-1, 4]]])
    patches = atskern.extract_patches(x, offsets, (2, 2), fill=-9)
    assert np.array_equal(patches[0, 0], x[0, 1:3, 2:4])
    assert np.array_equal(patches[1, 0, 0], np.full((2, 2), -9))
    assert np.array_equal(patches[1, 0, 1, 0], x[1, 0, 4])
    assert np.array_equal(patches[1, 0, 1, 1], [-9, -9])


@pytest.mark.parametrize("offsets_dtype", [np.int8, np.uint8, np.int16, np.uint32, np.int64, np.uint64])
def test_extract_offset_dtypes_and_huge_offsets(backend, offsets_dtype):
    rng = np.random.default_rng(1)
    x = random_images(rng, (1, 13, 17, 2), np.float32)
    info = np.iinfo(offsets_dtype)
    offsets = np.array([[[info.min, info.max], [info.max, 3], [2, info.min], [1, 2]]], dtype=offsets_dtype)
    expected = reference.extract_patches(x, offsets, (4, 5))
    got = to_numpy(atskern.extract_patches(to_backend(x, backend), to_backend(offsets, backend), (4, 5)))
    assert np.array_equal(got, expected)
    wide = random_images(rng, (1, 3, 300, 1), np.float32)  # wider than the offsets dtype can count
    offsets = np.array([[[1, min(250, info.max)], [0, info.max]]], dtype=offsets_dtype)
    got = to_numpy(atskern.extract_patches(to_backend(wide, backend), to_backend(offsets, backend), (2, 60), fill=-1))
    assert np.array_equal(got, reference.extract_patches(wide, offsets, (2, 60), fill=-1))


def test_extract_writes_into_out_and_aligns_buffers():
    rng = np.random.default_rng(2)
    x = random_images(rng, (2, 10, 11, 3), np.uint8)
    offsets = random_offsets(rng, 2, 4, (10, 11), (3, 3))
    out = np.zeros((2, 4, 3, 3, 3), np.uint8)
    result = atskern.extract_patches(x, offsets, 3, out=out)
    assert result is out
    assert np.array_equal(out, reference.extract_patches(x, offsets, 3))
    for shape in [(1, 3, 3, 3), (7, 5, 1, 1, 3)]:
        fresh = atskern.extract_patches(x[:1], offsets[:1, :1], 3)
        assert fresh.ctypes.data % 64 == 0
        assert aligned_empty(shape, np.float64).ctypes.data % 64 == 0


def test_extract_non_contiguous_images():
    rng = np.random.default_rng(3)
    big = random_images(rng, (2, 20, 22, 4), np.float64)
    for x in (big[:, ::2, 1::2, :3], np.moveaxis(big, -1, 1)[..., ::3]):
        offsets = random_offsets(rng, 2, 6, x.shape[1:3], (4, 4))
        assert np.array_equal(atskern.extract_patches(x, offsets, 4), reference.extract_patches(x, offsets, 4))


def test_extract_from_sparse_memmap_reads_only_patches(tmp_path):
    """A 4 GiB sparse memmap: extracting 64 patches must not page in the file."""
    report = run_next_to_big_memmap(
        tmp_path,
        """
        rng = np.random.default_rng(0)
        offsets = rng.integers(-10, 32768, size=(1, 64, 2)).astype(np.int32)
        atskern.extract_patches(np.zeros((1, 64, 64, 4), np.uint8), offsets[:, :2] % 8, (64, 64))  # compile
        before = peak_kib()
        patches = atskern.extract_patches(mm, offsets, (64, 64), fill=3)
        after = peak_kib()
        inside = (offsets[0] >= 0).all(axis=1)
        print(json.dumps({"grew_kib": after - before, "file_bytes": mm.nbytes,
                          "ok": bool((patches[0, inside, 5:, 5:] == 0).all())}))
        """,
    )
    assert report["ok"]
    assert report["file_bytes"] == 4 * 2**30
    # 64 patches x 64 rows touch 4096 pages; the kernel maps up to 64 KiB around each fault
    assert report["grew_kib"] * 1024 < report["file_bytes"] / 8, report


# --- scatter ------------------------------------------------------------------


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_scatter_matches_reference(backend, dtype, ndim, channels_first, small_gpu_blocks):
    skip_unsupported(backend, dtype)
    rng = np.random.default_rng(10 + ndim)
    spatial, patch = SPATIAL[ndim], PATCH[ndim]
    offsets = random_offsets(rng, 2, 9, spatial, patch)
    shape = (2, 9, 3) + patch if channels_first else (2, 9) + patch + (3,)
    grad = rng.standard_normal(shape).astype(dtype)
    expected = reference.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
    got = to_numpy(atskern.scatter_patches(to_backend(grad, backend), to_backend(offsets, backend), spatial,
                                           channels_first=channels_first))
    assert got.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert got.shape == images_shape(2, spatial, 3, channels_first)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    if backend == "cpu":
        assert np.array_equal(got, expected), "same summation order as the reference"


def test_scatter_known_values_and_out():
    grad = np.ones((1, 3, 2, 2, 1))
    offsets = np.array([[[0, 0], [1, 1], [-1, 2]]])
    out = np.full((1, 3, 3, 1), np.nan)
    result = atskern.scatter_patches(grad, offsets, (3, 3), out=out)
    assert result is out
    assert np.array_equal(out[0, :, :, 0], [[1, 1, 1], [1, 2, 1], [0, 1, 1]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_adjointness(data):
    """<extract(x), g> == <x, scatter(g)> for any shapes and offsets."""
    ndim = data.draw(st.integers(1, 3), label="ndim")
    spatial = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim), label="spatial"))
    patch = tuple(data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim), label="patch"))
    batch, count, channels = (data.draw(st.integers(1, 3), label=n) for n in ("batch", "count", "channels"))
    channels_first = data.draw(st.booleans(), label="channels_first")
    offsets = np.array(data.draw(st.lists(st.integers(-8, 12), min_size=batch * count * ndim,
                                          max_size=batch * count * ndim), label="offsets")).reshape(batch, count, ndim)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = rng.standard_normal(images_shape(batch, spatial, channels, channels_first))
    patches = atskern.extract_patches(x, offsets, patch, channels_first=channels_first)
    g = rng.standard_normal(patches.shape)
    back = atskern.scatter_patches(g, offsets, spatial, channels_first=channels_first)
    left, right = np.vdot(patches, g), np.vdot(x, back)
    scale = np.abs(patches).ravel() @ np.abs(g).ravel() + 1e-300
    assert abs(left - right) <= 1e-12 * scale


DETERMINISM_SCRIPT = """
import hashlib, numpy as np, atskern
rng = np.random.default_rng(5)
offsets = rng.integers(-20, 300, size=(2, 400, 2))
grad = rng.standard_normal((2, 400, 32, 32, 3)).astype(np.float32)
a = atskern.scatter_patches(grad, offsets, (300, 300))
b = atskern.scatter_patches(grad, offsets, (300, 300))
assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
print(hashlib.sha256(a.tobytes()).hexdigest())
"""


def test_scatter_is_bitwise_deterministic_across_thread_counts():
    digests = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'adapters'}")
        run = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], capture_output=True, text=True, env=env,
                             timeout=240)
        assert run.returncode == 0, run.stderr
        digests.append(run.stdout.strip())
    assert digests[0] == digests[1]


def test_scatter_bands_of_tiny_patches(monkeypatch):
    """Every band visits every patch of its image: tiny patches get one band per image (100,000 patches of 1x1
    took 15-20 ms with 8 bands, 2-3 ms with one), large ones a few work items per thread; every banding gives the
    same bits."""
    from atskern.cpu import patches as kernels

    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 4)
    assert kernels.scatter_bands(1, 1, 512 * 512, 1) == 1
    assert kernels.scatter_bands(1, 1, 512 * 512, 64) == 2
    assert kernels.scatter_bands(1, 1, 512 * 512, 32 * 32 * 3) == 16
    assert kernels.scatter_bands(8, 3, 512 * 512, 32 * 32) == 1
    rng = np.random.default_rng(8)
    offsets = rng.integers(-2, 40, size=(1, 300, 2))
    grad = rng.standard_normal((1, 300, 3, 3, 2)).astype(np.float32)
    want = atskern.scatter_patches(grad, offsets, (40, 40))
    for bands in (2, 7, 40):
        monkeypatch.setattr(kernels, "scatter_bands", lambda *args, bands=bands: bands)
        got = atskern.scatter_patches(grad, offsets, (40, 40))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# --- multi-scale --------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, level, patch, cell, start",
    [(25, 1000, 50, 12, 475), (25, 1000, 50, 0, -5), (100, 1000, 50, 0, -20)],
)
def test_patch_offsets_worked_examples(backend, grid, level, patch, cell, start):
    samples = to_backend(np.array([[[cell, cell]]], dtype=np.int32), backend)
    offsets = atskern.patch_offsets(samples, (grid, grid), (level, level), patch)
    assert to_numpy(offsets).dtype == np.int32
    assert to_numpy(offsets).tolist() == [[[start, start]]]
    assert reference.patch_offsets(to_numpy(samples), (grid, grid), (level, level), patch).tolist() == [[[start, start]]]


def test_patch_offsets_match_reference_with_margin_and_ties():
    rng = np.random.default_rng(7)
    samples = rng.integers(0, 10, size=(3, 20, 2))
    for margin, level, patch in [(0.0, (40, 60), (4, 5)), (0.125, (33, 80), (6, 6)), (0.3, (7, 1000), (1, 64))]:
        got = atskern.patch_offsets(samples, (10, 10), level, patch, margin=margin)
        assert np.array_equal(got, reference.patch_offsets(samples, (10, 10), level, patch, margin=margin))
    # centre 2.5 - 0.5 = 2.0, and centre 7.5 - 1 = 6.5 rounds to even 6
    assert atskern.patch_offsets(np.array([[[0], [1]]]), (2,), (10,), (1,)).ravel().tolist() == [2, 7]
    assert atskern.patch_offsets(np.array([[[1]]]), (2,), (10,), (2,)).ravel().tolist() == [6]


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
def test_multiscale_gather_and_scatter(backend, channels_first):
    rng = np.random.default_rng(8)
    grid, samples = (5, 5), rng.integers(0, 5, size=(2, 6, 2)).astype(np.int32)
    shapes, patches = [(20, 20), (40, 40), (80, 80)], [(4, 4), (6, 6), (10, 8)]
    levels = [rng.standard_normal(images_shape(2, s, 3, channels_first)) for s in shapes]
    got = atskern.extract_multiscale([to_backend(x, backend) for x in levels], to_backend(samples, backend), grid,
                                     patches, margin=0.05, fill=-1.0, channels_first=channels_first)
    grads = []
    for x, shape, patch, result in zip(levels, shapes, patches, got):
        offsets = reference.patch_offsets(samples, grid, shape, patch, margin=0.05)
        expected = reference.extract_patches(x, offsets, patch, fill=-1.0, channels_first=channels_first)
        assert np.array_equal(to_numpy(result), expected)
        grads.append(rng.standard_normal(expected.shape))
    back = atskern.scatter_multiscale([to_backend(g, backend) for g in grads], to_backend(samples, backend), grid,
                                      shapes, patches, margin=0.05, channels_first=channels_first)
    for g, shape, patch, result in zip(grads, shapes, patches, back):
        offsets = reference.patch_offsets(samples, grid, shape, patch, margin=0.05)
        expected = reference.scatter_patches(g, offsets, shape, channels_first=channels_first)
        np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-12, atol=1e-12)


# --- errors -------------------------------------------------------------------

X = np.zeros((2, 8, 8, 3), np.float32)
OFFSETS = np.zeros((2, 4, 2), np.int32)
GRAD = np.zeros((2, 4, 3, 3, 3), np.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=[[1, 2]]), TypeError, r"x must be a NumPy or CuPy array, got list"),
        (dict(x=np.zeros((2, 8), np.float32)), ValueError, r"x must be 3 or 4 or 5-dimensional .*got shape \(2, 8\)"),
        (dict(x=np.zeros((2, 0, 8, 3), np.float32)), ValueError, r"x must not be empty, got shape \(2, 0, 8, 3\)"),
        (dict(x=np.zeros((2, 8, 8, 3), np.complex64)), None, None),
        (dict(x=np.zeros((2, 8, 8, 3), np.complex128)), TypeError, r"got complex128 \(item size 16\)"),
        (dict(x=np.zeros((2, 8, 8, 3), "V4")), TypeError, r"x must have a numeric dtype of item size 1, 2, 4 or 8"),
        (dict(x=np.zeros((2, 8, 8, 3), np.longdouble)), TypeError, r"item size (16|12)"),
        (dict(x=np.zeros((2, 8, 8, 3), object)), TypeError, r"got object"),
        (dict(offsets=np.zeros((3, 4, 2), np.int32)), ValueError, r"offsets has batch size 3 .* images have batch size 2"),
        (dict(offsets=np.zeros((2, 4, 3), np.int32)), ValueError, r"offsets must have shape \(batch, K, 2\) .* got \(2, 4, 3\)"),
        (dict(offsets=np.zeros((2, 4), np.int32)), ValueError, r"offsets must be 3-dimensional \(batch, K, D\), got shape \(2, 4\)"),
        (dict(offsets=np.zeros((2, 4, 2), np.float32)), TypeError, r"offsets must have an integer dtype .* got float32"),
        (dict(offsets=np.zeros((2, 0, 2), np.int32)), ValueError, r"offsets must not be empty"),
        (dict(patch_size=(3, 0)), ValueError, r"patch_size must be > 0 in every dim, got \(3, 0\)"),
        (dict(patch_size=-2), ValueError, r"patch_size must be > 0 in every dim, got \(-2, -2\)"),
        (dict(patch_size=(3, 3, 3)), ValueError, r"patch_size must have 2 entries .* got 3"),
        (dict(patch_size=2.5), TypeError, r"patch_size must be an int or a sequence of 2 ints"),
        (dict(patch_size=(3, 2.0)), TypeError, r"patch_size must be an integer, got 2.0"),
        (dict(fill=1e60), ValueError, r"fill=1e\+60 cannot be represented in the images' dtype float32"),
        (dict(x=np.zeros((2, 8, 8, 3), np.uint8), fill=-1), ValueError, r"fill=-1 cannot be represented .* uint8"),
        (dict(x=np.zeros((2, 8, 8, 3), np.int16), fill=0.5), ValueError, r"fill=0.5 cannot be represented .* int16"),
        (dict(fill="zero"), TypeError, r"fill must be a scalar number, got 'zero'"),
        (dict(channels_first="yes"), TypeError, r"channels_first must be True or False, got 'yes'"),
        (dict(out=np.zeros((2, 4, 3, 3, 2), np.float32)), ValueError, r"out must have shape \(2, 4, 3, 3, 3\), got \(2, 4, 3, 3, 2\)"),
        (dict(out=np.zeros((2, 4, 3, 3, 3), np.float64)), TypeError, r"out must have dtype float32, got float64"),
        (dict(out=np.zeros((2, 4, 3, 3, 6), np.float32)[..., ::2]), ValueError, r"out must be C-contiguous"),
        (dict(out=[0]), TypeError, r"out must be a NumPy or CuPy array"),
    ],
)
def test_extract_errors(kwargs, error, match):
    args = dict(x=X, offsets=OFFSETS, patch_size=3)
    args.update(kwargs)
    x, offsets, patch_size = args.pop("x"), args.pop("offsets"), args.pop("patch_size")
    if error is None:
        assert atskern.extract_patches(x, offsets, patch_size, **args).shape == (2, 4, 3, 3, 3)
        return
    with pytest.raises(error, match=match):
        atskern.extract_patches(x, offsets, patch_size, **args)


@pytest.mark.parametrize(
    "dtype, fill, padded",
    [
        (np.uint64, 2**63, 2**63),
        (np.uint64, 2**64 - 1, 2**64 - 1),
        (np.uint64, np.uint64(2**64 - 1), 2**64 - 1),
        (np.uint64, -1, None),
        (np.uint64, -2**63, None),
        (np.int64, 2**63, None),
        (np.int64, -2**63, -2**63),
        (ml_dtypes.float4_e2m1fn, float("nan"), None),
        (ml_dtypes.float6_e3m2fn, float("nan"), None),
        (ml_dtypes.float8_e4m3fn, float("nan"), "nan"),
    ],
    ids=str,
)
def test_fill_at_the_edges_of_its_dtype(dtype, fill, padded):
    """A fill is taken exactly when the dtype holds it (uint64 up to 2**64 - 1, a NaN where the format has one)
    and refused otherwise (negative uint64 fills wrapped around; a NaN became -0.0 in floats without NaN)."""
    x = np.ones((1, 3, 3, 1), dtype)
    offsets = np.array([[[-1, -1]]])
    if padded is None:
        with pytest.raises(ValueError, match="cannot be represented"):
            atskern.extract_patches(x, offsets, 2, fill=fill)
        return
    corner = atskern.extract_patches(x, offsets, 2, fill=fill)[0, 0, 0, 0, 0]
    if padded == "nan":
        assert np.isnan(float(corner))
    else:
        assert int(corner) == padded


def test_extract_read_only_out_and_mixed_devices():
    out = np.zeros((2, 4, 3, 3, 3), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        atskern.extract_patches(X, OFFSETS, 3, out=out)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(grad=np.zeros((2, 4, 3, 3, 3), np.int32)), TypeError, r"grad must be float32 or float64 .* got int32"),
        (dict(grad=np.zeros((2, 4, 3), np.float32)), ValueError, r"grad must be 4 or 5 or 6-dimensional"),
        (dict(grad=np.zeros((2, 0, 3, 3, 3), np.float32)), ValueError, r"grad must not be empty"),
        (dict(grad=np.zeros((2, 5, 3, 3, 3), np.float32)), ValueError, r"grad has 5 patches per image .* offsets has 4"),
        (dict(offsets=np.zeros((1, 4, 2), np.int64)), ValueError, r"offsets has batch size 1"),
        (dict(offsets=np.zeros((2, 4, 2), np.float64)), TypeError, r"offsets must have an integer dtype"),
        (dict(spatial_shape=(8,)), ValueError, r"spatial_shape must have 2 entries .* got 1"),
        (dict(spatial_shape=(8, 0)), ValueError, r"spatial_shape must be > 0 in every dim, got \(8, 0\)"),
        (dict(spatial_shape=8), TypeError, r"spatial_shape must be a sequence of 2 ints, got 8"),
        (dict(channels_first=1), TypeError, r"channels_first must be True or False, got 1"),
        (dict(out=np.zeros((2, 8, 8, 3), np.float64)), TypeError, r"out must have dtype float32, got float64"),
        (dict(out=np.zeros((2, 8, 9, 3), np.float32)), ValueError, r"out must have shape \(2, 8, 8, 3\), got \(2, 8, 9, 3\)"),
        (dict(out=np.zeros((2, 8, 8, 3), np.float32, order="F")), ValueError, r"out must be C-contiguous"),
        (dict(deterministic=None), TypeError, r"deterministic must be True or False"),
    ],
)
def test_scatter_errors(kwargs, error, match):
    args = dict(grad=GRAD, offsets=OFFSETS, spatial_shape=(8, 8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        atskern.scatter_patches(args.pop("grad"), args.pop("offsets"), args.pop("spatial_shape"), **args)


def test_multiscale_errors():
    samples = np.zeros((2, 4, 2), np.int32)
    levels = [X, np.zeros((2, 16, 16, 3), np.float32)]
    with pytest.raises(TypeError, match=r"samples must have an integer dtype .* got float32"):
        atskern.patch_offsets(samples.astype(np.float32), (4, 4), (8, 8), 3)
    with pytest.raises(ValueError, match=r"grid_shape must have 2 entries"):
        atskern.patch_offsets(samples, (4,), (8, 8), 3)
    with pytest.raises(ValueError, match=r"level_shape must be > 0 in every dim, got \(8, 0\)"):
        atskern.patch_offsets(samples, (4, 4), (8, 0), 3)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\), got 0.5"):
        atskern.patch_offsets(samples, (4, 4), (8, 8), 3, margin=0.5)
    with pytest.raises(ValueError, match=r"patch_sizes must be a list with one entry per level \(2 levels\)"):
        atskern.extract_multiscale(levels, samples, (4, 4), [3])
    with pytest.raises(ValueError, match=r"patch_sizes\[1\] must be > 0"):
        atskern.extract_multiscale(levels, samples, (4, 4), [3, 0])
    with pytest.raises(ValueError, match=r"levels\[1\] must have 2 spatial dims like samples, got shape \(2, 16, 3\)"):
        atskern.extract_multiscale([X, np.zeros((2, 16, 3), np.float32)], samples, (4, 4), [3, 3])
    with pytest.raises(ValueError, match=r"samples has batch size 2 but the levels have batch size 1"):
        atskern.extract_multiscale([X, np.zeros((1, 16, 16, 3), np.float32)], samples, (4, 4), [3, 3])
    with pytest.raises(TypeError, match=r"levels must be a list of arrays"):
        atskern.extract_multiscale(X, samples, (4, 4), [3])
    grads = [np.zeros((2, 4, 3, 3, 3)), np.zeros((2, 4, 5, 5, 3))]
    with pytest.raises(ValueError, match=r"grads\[1\] holds patches of size \(5, 5\) but patch_sizes\[1\] is \(6, 6\)"):
        atskern.scatter_multiscale(grads, samples, (4, 4), [(8, 8), (16, 16)], [3, 6])
    with pytest.raises(ValueError, match=r"level_shapes must be a list with one entry per level"):
        atskern.scatter_multiscale(grads, samples, (4, 4), [(8, 8)], [3, 5])


ANY_ARRAY = st.builds(
    lambda shape, dtype: np.zeros(shape, dtype),
    st.lists(st.integers(0, 4), min_size=0, max_size=6).map(tuple),
    st.sampled_from([np.uint8, np.int32, np.float16, np.float32, np.float64, np.bool_, np.complex64, "V3", object]),
)
ANY_VALUE = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.none(), st.text(max_size=3),
                      st.booleans(), st.lists(st.integers(-3, 5), max_size=4), ANY_ARRAY)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=ANY_ARRAY, offsets=ANY_ARRAY, patch=ANY_VALUE, fill=ANY_VALUE, spatial=ANY_VALUE, cf=ANY_VALUE)
def test_validation_fuzz_never_crashes(x, offsets, patch, fill, spatial, cf):
    """Arbitrary arguments either work or raise ValueError/TypeError; never anything else."""
    for call in (
        lambda: atskern.extract_patches(x, offsets, patch, fill=fill, channels_first=cf),
        lambda: atskern.scatter_patches(x, offsets, spatial, channels_first=cf),
        lambda: atskern.patch_offsets(offsets, spatial, spatial, patch),
    ):
        try:
            call()
        except (ValueError, TypeError):
            pass


# --- GPU ----------------------------------------------------------------------


@pytest.fixture
def small_gpu_tiles(monkeypatch):
    """Deterministic GPU scatter with 1-pixel tiles' worth of threads and 3 patches per pass (many tiles, many passes)."""
    from atskern.gpu import patches as gp

    monkeypatch.setattr(gp, "SCATTER_PIXELS", 1)
    monkeypatch.setattr(gp, "SCATTER_CHUNK", 3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_gpu_equals_cpu(channels_first, tiles, index_width, small_gpu_blocks, request):
    """Gathers bitwise; the deterministic scatter bitwise the CPU kernel's (same sums, same order); atomic close."""
    import cupy

    if tiles == "small":
        request.getfixturevalue("small_gpu_tiles")
    rng = np.random.default_rng(21)
    spatial, patch = (40, 50), (8, 6)
    x = random_images(rng, images_shape(3, spatial, 3, channels_first), np.float32)
    offsets = random_offsets(rng, 3, 300, spatial, patch)  # > 256 patches: several passes of the tile scan
    cpu = atskern.extract_patches(x, offsets, patch, channels_first=channels_first)
    gpu = atskern.extract_patches(cupy.asarray(x), cupy.asarray(offsets), patch, channels_first=channels_first)
    assert np.array_equal(cpu.view(np.uint32), gpu.get().view(np.uint32))
    grad = rng.standard_normal(cpu.shape).astype(np.float32)
    expected = atskern.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
    first = atskern.scatter_patches(cupy.asarray(grad), cupy.asarray(offsets), spatial, channels_first=channels_first)
    second = atskern.scatter_patches(cupy.asarray(grad), cupy.asarray(offsets), spatial, channels_first=channels_first)
    assert np.array_equal(first.get().view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(second.get().view(np.uint32), expected.view(np.uint32))
    atomic = atskern.scatter_patches(cupy.asarray(grad), cupy.asarray(offsets), spatial,
                                     channels_first=channels_first, deterministic=False)
    np.testing.assert_allclose(atomic.get(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_gpu_scatter_keeps_subnormals():
    """float32 subnormal gradients: the GPU sums (compiled by CuPy with -ftz=true) keep them, bitwise as the CPU."""
    import cupy

    rng = np.random.default_rng(24)
    offsets = rng.integers(-3, 20, (2, 40, 2))
    tiny = np.finfo(np.float32).smallest_subnormal
    grad = (rng.integers(-50, 50, (2, 40, 6, 6, 2)) * tiny).astype(np.float32)
    expected = atskern.scatter_patches(grad, offsets, (20, 20))
    assert (expected != 0).any()
    got = atskern.scatter_patches(cupy.asarray(grad), cupy.asarray(offsets), (20, 20))
    assert np.array_equal(got.get().view(np.uint32), expected.view(np.uint32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_gpu_gather_at_every_alignment(dtype, index_width):
    """Images and outputs starting at every byte alignment (the 16-byte path's funnel shifts), strided offsets."""
    import cupy

    rng = np.random.default_rng(22)
    item = np.dtype(dtype).itemsize
    x = random_images(rng, (2, 30, 70, 3), dtype)
    base = rng.integers(-8, 70, (2, 2, 9, 2))
    offsets = base[:, 1, ::-1, :]  # a reversed, strided view: the kernel reads it as it is
    expected = reference.extract_patches(x, offsets, (5, 41), fill=2)
    raw_x = cupy.zeros(x.nbytes + 64, np.uint8)
    raw_out = cupy.zeros(expected.nbytes + 64, np.uint8)
    for shift in range(0, 16, item):
        images = raw_x[shift:shift + x.nbytes].view(dtype).reshape(x.shape)
        images[...] = cupy.asarray(x)
        out = raw_out[16 - shift:16 - shift + expected.nbytes].view(dtype).reshape(expected.shape)
        got = atskern.extract_patches(images, cupy.asarray(base)[:, 1, ::-1, :], (5, 41), fill=2, out=out)
        assert got is out
        assert np.array_equal(out.get().view(f"u{item}"), expected.view(f"u{item}")), shift


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_gpu_misaligned_arrays_work(dtype):
    """CuPy views at addresses that are not a multiple of their item size (a byte slice viewed as a wider dtype):
    the image, the offsets, the gradients and both outputs give the CPU's results, and the CUDA context survives
    (a typed access of such an array faults; atskern copies through bytes, ``atskern.gpu._alignment``)."""
    import cupy

    from bench.gpu_smoke import bytes_off, host_bytes

    rng = np.random.default_rng(25)
    x = random_images(rng, (2, 30, 41, 3), dtype)
    offsets = random_offsets(rng, 2, 7, (30, 41), (6, 5)).astype(np.int64)
    expected = atskern.extract_patches(x, offsets, (6, 5))
    grad = random_images(rng, expected.shape, dtype)
    back = atskern.scatter_patches(grad, offsets, (30, 41))
    x_dev, offsets_dev = bytes_off(cupy, x, 1), bytes_off(cupy, offsets, 3)
    out = bytes_off(cupy, np.zeros_like(expected), 1)
    assert atskern.extract_patches(x_dev, offsets_dev, (6, 5), out=out) is out
    assert np.array_equal(host_bytes(cupy, out), host_bytes(np, expected))
    out_back = bytes_off(cupy, np.zeros_like(back), 2)
    atskern.scatter_patches(bytes_off(cupy, grad, 1), offsets_dev, (30, 41), out=out_back)
    assert np.array_equal(host_bytes(cupy, out_back), host_bytes(np, back))
    cupy.cuda.runtime.deviceSynchronize()  # a fault would surface here


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_gpu_kernels_allocate_nothing_and_do_not_synchronize():
    """With ``out=``, gather and deterministic scatter take no memory from CuPy's pool (no temporaries), and a
    call returns before a long kernel queued ahead of it on the stream has finished (no host synchronization)."""
    import cupy

    rng = np.random.default_rng(23)
    x = cupy.asarray(random_images(rng, (2, 64, 64, 3), np.float32))
    offsets = cupy.asarray(random_offsets(rng, 2, 20, (64, 64), (9, 9)).astype(np.int64))
    patches = cupy.empty((2, 20, 9, 9, 3), np.float32)
    back = cupy.empty_like(x)
    atskern.extract_patches(x, offsets, 9, out=patches)
    atskern.scatter_patches(patches, offsets, (64, 64), out=back)  # compile first
    pool = cupy.get_default_memory_pool()
    used = pool.used_bytes()
    spin = cupy.RawKernel(
        r"""extern "C" __global__ void spin(long long cycles) { long long t = clock64(); while (clock64() - t < cycles) {} }""",
        "spin")
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    spin((1,), (1,), (np.int64(2_000_000_000),))  # about a second on the device
    start.record()
    atskern.extract_patches(x, offsets, 9, out=patches)
    atskern.scatter_patches(patches, offsets, (64, 64), out=back)
    stop.record()
    assert not stop.done, "a patch call waited for the device"
    stop.synchronize()
    assert pool.used_bytes() == used


def test_outputs_too_large_to_allocate_name_the_arguments():
    """Sizes whose output NumPy cannot even index get a ValueError naming the arguments that set them (NumPy's
    own said "Maximum allowed dimension exceeded")."""
    x, offsets = np.zeros((1, 8, 8, 1), np.float32), np.zeros((1, 1, 2), np.int64)
    with pytest.raises(ValueError, match=r"x's batch, the offsets and patch_size give an output of shape "
                                         r"\(1, 1, 1099511627776, 1099511627776, 1\)"):
        atskern.extract_patches(x, offsets, 2**40)
    with pytest.raises(ValueError, match=r"grad's batch and spatial_shape give an output of shape "
                                         r"\(1, 1099511627776, 1099511627776, 1\)"):
        atskern.scatter_patches(np.zeros((1, 1, 2, 2, 1)), offsets, (2**40, 2**40))
