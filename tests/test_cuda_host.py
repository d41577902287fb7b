"""The CUDA patch kernels' own source, compiled for the host and run on the CPU (no GPU needed).

``tests/cuda_host`` shims the CUDA built-ins (threads of a block are std::threads meeting at __syncthreads,
CUB's BlockScan a shared-memory stand-in) so ``atskern/gpu/patches.cu`` compiles with g++. Each test builds
the launch with ``atskern.gpu.patches.gather_launch`` / ``scatter_launch`` -- the exact kernel name, grid,
block and argument list a CuPy launch gets -- runs it on NumPy arrays and compares with the reference and the
CPU kernels. This checks the kernels' index arithmetic, the host/kernel argument order, the 16-byte path at
every alignment and the scatter's barriers and ordering; the ``gpu`` tests check the device build.
"""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest

import atskern
from atskern import _validation as v
from atskern import reference
from atskern.gpu import patches as gp

from .cuda_host_build import build_host_library, ctype

OFFSET_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_host_library(tmp_path_factory.mktemp("cuda_host"), "patches_host")


def launch(lib, name, grid, block, args):
    assert len(grid) == len(block) == 1
    getattr(lib, "host_" + name)(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *map(ctype, args))


def host_gather(lib, x, offsets, patch, fill, channels_first, threads=32):
    layout, fill_value = v.check_gather(x, offsets, patch, fill, channels_first, None)
    out = np.full(layout.patches_shape, 0xA5, np.uint8).view(x.dtype) if x.dtype.itemsize == 1 else \
        np.zeros(layout.patches_shape, x.dtype)
    launch(lib, *gp.gather_launch(x, offsets, layout, fill_value, out, threads=threads))
    return out


def host_scatter(lib, grad, offsets, spatial, channels_first, deterministic=True, pixels=None, chunk=None):
    layout, dtype = v.check_scatter(grad, offsets, spatial, channels_first, None)
    out = np.full(layout.image_shape, np.nan, dtype) if deterministic else np.zeros(layout.image_shape, dtype)
    launch(lib, *gp.scatter_launch(np.ascontiguousarray(grad, dtype), offsets, layout, out, deterministic,
                                   threads=32, pixels=pixels, chunk=chunk))
    return out


def random_case(rng, ndim, channels_first, dtype, offsets_dtype, count=6):
    spatial = tuple(int(s) for s in rng.integers(1, 14, ndim))
    patch = tuple(int(p) for p in rng.integers(1, 8, ndim))
    batch, channels = (int(c) for c in rng.integers(1, 4, 2))
    shape = (batch, channels) + spatial if channels_first else (batch,) + spatial + (channels,)
    x = rng.integers(0, 120, shape).astype(dtype)
    offsets = np.stack([rng.integers(-p - 2, s + 2, (batch, count)) for s, p in zip(spatial, patch)], axis=-1)
    if np.dtype(offsets_dtype).kind == "u":
        offsets = np.abs(offsets)
    return x, offsets.astype(offsets_dtype), spatial, patch


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_host_gather_equals_reference(lib, dtype, channels_first, index_width):
    rng = np.random.default_rng(1 + channels_first)
    for trial in range(6):
        ndim = 1 + trial % 3
        x, offsets, _, patch = random_case(rng, ndim, channels_first, dtype, OFFSET_DTYPES[trial + 2])
        strided = np.repeat(offsets, 2, axis=1)[:, ::-2]  # reversed and strided, read as it is
        expected = reference.extract_patches(x, strided, patch, fill=7, channels_first=channels_first)
        got = host_gather(lib, x, strided, patch, 7, channels_first)
        item = x.dtype.itemsize
        assert np.array_equal(got.view(f"u{item}"), expected.view(f"u{item}")), trial


def test_host_gather_at_every_alignment(lib):
    """Images and outputs at every byte offset of a 16-byte line: the funnel-shifted 16-byte path and the
    element-wise chunks at the image's first and last bytes."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (2, 9, 101, 3)).astype(np.uint8)
    offsets = np.array([[[0, 0], [8, 90], [3, 17], [-2, 50]], [[7, 1], [4, 99], [8, -3], [1, 33]]], np.int32)
    expected = reference.extract_patches(image, offsets, (3, 23), fill=4)
    for shift in range(16):
        raw = np.zeros(image.nbytes + 32, np.uint8)
        x = raw[shift:shift + image.nbytes].reshape(image.shape)
        x[...] = image
        layout, fill = v.check_gather(x, offsets, (3, 23), 4, False, None)
        raw_out = np.zeros(expected.nbytes + 32, np.uint8)
        out = raw_out[(5 * shift) % 16:(5 * shift) % 16 + expected.nbytes].reshape(expected.shape)
        launch(lib, *gp.gather_launch(x, offsets, layout, fill, out, threads=64))
        assert np.array_equal(out, expected), shift
        assert not raw_out[:(5 * shift) % 16].any() and not raw_out[(5 * shift) % 16 + expected.nbytes:].any()


def test_host_gather_huge_offsets_of_every_dtype(lib):
    x = np.arange(2 * 13 * 17, dtype=np.float32).reshape(1, 13, 17, 2)
    for dtype in OFFSET_DTYPES:
        info = np.iinfo(dtype)
        offsets = np.array([[[info.min, info.max], [info.max, 3], [2, info.min], [1, 2]]], dtype=dtype)
        got = host_gather(lib, x, offsets, (4, 5), -1.0, False)
        assert np.array_equal(got, reference.extract_patches(x, offsets, (4, 5), fill=-1.0)), dtype


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pixels, chunk", [(16, 256), (1, 3), (2, 1)])
def test_host_scatter_is_bitwise_the_cpu_kernel(lib, dtype, channels_first, pixels, chunk, index_width):
    rng = np.random.default_rng(3 + pixels)
    for trial in range(3):
        ndim = 1 + trial
        x, offsets, spatial, patch = random_case(rng, ndim, channels_first, dtype, OFFSET_DTYPES[trial * 3],
                                                 count=int(rng.integers(1, 13)))
        patches = atskern.extract_patches(x, offsets, patch, channels_first=channels_first)
        grad = rng.standard_normal(patches.shape).astype(dtype)
        expected = atskern.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
        got = host_scatter(lib, grad, offsets, spatial, channels_first, pixels=pixels, chunk=chunk)
        item = np.dtype(dtype).itemsize
        assert np.array_equal(got.view(f"u{item}"), expected.view(f"u{item}")), trial
        atomic = host_scatter(lib, grad, offsets, spatial, channels_first, deterministic=False)
        np.testing.assert_allclose(atomic, expected, rtol=1e-5, atol=1e-5)


def test_host_scatter_many_overlapping_patches(lib):
    """300 patches (two passes of the tile scan) piled on a small image, in tiles of one and many rows."""
    rng = np.random.default_rng(4)
    offsets = rng.integers(-4, 30, (1, 300, 2))
    grad = rng.standard_normal((1, 300, 6, 5, 2)).astype(np.float32)
    expected = atskern.scatter_patches(grad, offsets, (30, 40))
    for pixels in (1, 16):
        got = host_scatter(lib, grad, offsets, (30, 40), False, pixels=pixels)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), pixels
