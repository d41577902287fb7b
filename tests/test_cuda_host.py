"""The CUDA patch kernels' own source, compiled for the host and run on the CPU (no GPU needed).

``tests/cuda_host`` shims the CUDA built-ins (threads of a block are fibers meeting at __syncthreads, run in
alternating order, CUB's BlockScan a shared-memory stand-in) so ``atskern/gpu/patches.cu`` compiles with g++. Each test builds
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atskern
from atskern import _validation as v
from atskern import reference
from atskern.gpu import patches as gp

from .cuda_host_build import build_host_library, call_host
from .emulated_device import device_array, install, placed
from .test_patches import images_shape, random_images
from .test_patches_layouts import KINDS, base_for, draw_geometry, view_of

OFFSET_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_host_library(tmp_path_factory.mktemp("cuda_host"), "patches_host")


def launch(lib, name, grid, block, args):
    call_host(lib, gp.SOURCE, name, grid, block, args)


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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), ndim=st.integers(1, 3), channels_first=st.booleans(),
       dtype=st.sampled_from([np.uint8, np.float16, np.float32, np.float64]), channels=st.integers(1, 4),
       unit_rows=st.sampled_from([1, 3, 8, 16]), threads=st.sampled_from([32, 64]), out_shift=st.integers(0, 15),
       seed=st.integers(0, 2**32 - 1))
def test_host_gather_fuzz(lib, monkeypatch, data, ndim, channels_first, dtype, channels, unit_rows, threads,
                          out_shift, seed):
    """Any layout, patch and offsets (inside, across and outside the image), rows per unit, block size and output
    alignment: the host-built gather equals the reference byte for byte. Rows a multiple of 16 bytes long (a chunk's
    place worked out once per unit: GATHER_PERIODIC) and rows that are not both come up. The output starts at any
    multiple of the item size inside a 16-byte line (the kernel's contract: a CUDA store of a T at another address
    faults, so the front end hands it element-aligned arrays only, ``atskern.gpu._alignment``)."""
    out_shift -= out_shift % np.dtype(dtype).itemsize
    rng = np.random.default_rng(seed)
    spatial = tuple(data.draw(st.lists(st.integers(1, 20), min_size=ndim, max_size=ndim)))
    patch = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    batch = data.draw(st.integers(1, 3))
    shape = (batch, channels) + spatial if channels_first else (batch,) + spatial + (channels,)
    x = rng.integers(0, 120, shape).astype(dtype)
    offsets = np.stack([rng.integers(-p - 3, s + 3, (batch, 5)) for s, p in zip(spatial, patch)], axis=-1)
    monkeypatch.setattr(gp, "GATHER_UNIT_ROWS", unit_rows)
    gp.clear_caches()
    try:
        expected = reference.extract_patches(x, offsets, patch, fill=9, channels_first=channels_first)
        layout, fill = v.check_gather(x, offsets, patch, 9, channels_first, None)
        raw = np.full(expected.nbytes + 32, 0xA5, np.uint8)
        out = raw[out_shift:out_shift + expected.nbytes].view(x.dtype).reshape(expected.shape)
        launch(lib, *gp.gather_launch(x, offsets, layout, fill, out, threads=threads))
    finally:
        gp.clear_caches()
    item = x.dtype.itemsize
    assert np.array_equal(out.view(f"u{item}"), expected.view(f"u{item}"))
    assert (raw[:out_shift] == 0xA5).all() and (raw[out_shift + expected.nbytes:] == 0xA5).all()


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


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), ndim=st.integers(1, 3), channels_first=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), channels=st.integers(1, 4),
       pixels=st.sampled_from([1, 2, 4, 8, 16]), chunk=st.integers(1, 256), count=st.integers(1, 12),
       seed=st.integers(0, 2**32 - 1))
def test_host_scatter_fuzz(lib, data, ndim, channels_first, dtype, channels, pixels, chunk, count, seed):
    """Any layout, patch, overlapping offsets (inside, across and outside the image), tile size and patch chunk of
    the deterministic scatter: the host build is bitwise the CPU kernel's sum in patch order; the atomic one
    equals it within rounding."""
    rng = np.random.default_rng(seed)
    spatial = tuple(data.draw(st.lists(st.integers(1, 24), min_size=ndim, max_size=ndim)))
    patch = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    batch = data.draw(st.integers(1, 3))
    offsets = np.stack([rng.integers(-p - 3, s + 3, (batch, count)) for s, p in zip(spatial, patch)], axis=-1)
    grad_shape = (batch, count) + ((channels,) + patch if channels_first else patch + (channels,))
    grad = rng.standard_normal(grad_shape).astype(dtype)
    expected = atskern.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
    got = host_scatter(lib, grad, offsets, spatial, channels_first, pixels=pixels, chunk=chunk)
    item = np.dtype(dtype).itemsize
    assert np.array_equal(got.view(f"u{item}"), expected.view(f"u{item}"))
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


@pytest.fixture
def unit_rows(request):
    """Run with ``GATHER_UNIT_ROWS`` = request.param (the plans are memoized: forget them before and after)."""
    saved = gp.GATHER_UNIT_ROWS
    gp.GATHER_UNIT_ROWS = request.param
    gp.clear_caches()
    yield request.param
    gp.GATHER_UNIT_ROWS = saved
    gp.clear_caches()


@pytest.mark.parametrize("unit_rows", [1, 3, 8], indirect=True)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_host_gather_long_rows_partial_units_and_fills(lib, dtype, unit_rows):
    """Rows of several 16-byte chunks per lane (``slots`` > 1), planes of 13 rows in units of 1, 3 and 8 rows
    (a partial last unit), rows and whole chunks outside the image (16-byte fill stores), partial rows."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 200, (2, 40, 90, 3)).astype(dtype)
    offsets = np.array([[[0, 0], [30, 20], [-5, 60], [35, -40]], [[-12, -69], [27, 89], [10, 10], [-13, 5]]], np.int64)
    patch = (13, 70)  # a row: 210 elements; float32/64: 54/107 chunks, 2/4 slots of 32 lanes
    layout, fill = v.check_gather(x, offsets, patch, 9, False, None)
    plan = gp.gather_plan(layout, x.dtype.itemsize, 64)
    assert int(plan.tail[1]) == unit_rows and (int(plan.tail[2]) >= 2 or x.dtype.itemsize < 4)
    expected = reference.extract_patches(x, offsets, patch, fill=9)
    for threads in (32, 64, 256):
        got = host_gather(lib, x, offsets, patch, 9, False, threads=threads)
        assert np.array_equal(got, expected), threads
    cf = np.ascontiguousarray(np.moveaxis(x, -1, 1))  # channels first: planes per channel row
    got = host_gather(lib, cf, offsets, patch, 9, True, threads=64)
    assert np.array_equal(got, reference.extract_patches(cf, offsets, patch, fill=9, channels_first=True))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=lambda d: np.dtype(d).name)
def test_host_gather_unaligned_starts_at_every_byte(lib, dtype):
    """Image and output starts at every (item-aligned) byte of a 16-byte line, rows of several chunks per lane:
    the funnel shift at every shift, the element-wise chunks at the ends; nothing written outside ``out``."""
    rng = np.random.default_rng(6)
    item = np.dtype(dtype).itemsize
    image = rng.integers(0, 2**(8 * item), (2, 7, 310, 1), dtype=np.uint64).astype(dtype)
    offsets = np.array([[[0, 0], [3, 1], [1, 290], [5, -30]], [[-1, 7], [2, 299], [6, 13], [0, 150]]], np.int32)
    patch = (3, 301)
    expected = reference.extract_patches(image, offsets, patch, fill=3)
    for shift in range(0, 16, item):
        raw = np.zeros(image.nbytes + 32, np.uint8)
        x = raw[shift:shift + image.nbytes].view(dtype).reshape(image.shape)
        x[...] = image
        layout, fill = v.check_gather(x, offsets, patch, 3, False, None)
        at = (3 * shift + item) % 16 // item * item
        raw_out = np.zeros(expected.nbytes + 32, np.uint8)
        out = raw_out[at:at + expected.nbytes].view(dtype).reshape(expected.shape)
        launch(lib, *gp.gather_launch(x, offsets, layout, fill, out, threads=64))
        assert np.array_equal(out, expected), shift
        assert not raw_out[:at].any() and not raw_out[at + expected.nbytes:].any(), shift


class GuardedPages:
    """A read-write page between two inaccessible ones: the host build segfaults on any access outside it."""

    def __init__(self):
        import mmap

        self.page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, 3 * self.page)
        self.bytes = np.frombuffer(self.map, np.uint8)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._protect(0)

    def _protect(self, mode):
        base = self.bytes.ctypes.data
        for start in (base, base + 2 * self.page):
            assert self.libc.mprotect(start, self.page, mode) == 0, ctypes.get_errno()

    def array(self, shape, dtype, at_end):
        """An array of ``shape`` that starts at the page's first byte, or ends at its last one."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert nbytes <= self.page
        start = 2 * self.page - nbytes if at_end else self.page
        return self.bytes[start:start + nbytes].view(dtype).reshape(shape)

    def close(self):
        self._protect(3)  # PROT_READ | PROT_WRITE, so the mapping can go


@pytest.fixture
def guarded():
    pages = GuardedPages()
    yield pages
    pages.close()


@pytest.mark.parametrize("at_end", [False, True], ids=["first_byte", "last_byte"])
def test_host_gather_reads_nothing_outside_the_image(lib, guarded, at_end):
    """The image starts (ends) at an inaccessible page: patches over its first and last elements, at every
    alignment of the image's end, read only its bytes (a stray 16-byte load would segfault here)."""
    rng = np.random.default_rng(7)
    for width in range(40, 56):  # the image's byte count, hence its start (or end) alignment, changes
        shape = (1, 20, width, 3)
        x = guarded.array(shape, np.uint8, at_end)
        x[...] = rng.integers(0, 256, shape)
        offsets = np.array([[[0, 0], [15, width - 9], [16, width - 10], [-2, -3], [18, width - 3]]], np.int32)
        expected = reference.extract_patches(x, offsets, (5, 11), fill=1)
        assert np.array_equal(host_gather(lib, x, offsets, (5, 11), 1, False, threads=64), expected), width


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("at", [0, 1], ids=["aligned", "shifted"])
@pytest.mark.parametrize("channels", [4, 3])
def test_host_scatter_zero_tiles(lib, dtype, at, channels):
    """Mostly untouched tiles: 16-byte zero stores where ``out`` and its rows are 16-byte aligned, element stores
    otherwise (``out`` one element off, rows of 3 * 50 elements); every element written, +0.0 where no patch
    lies, nothing outside ``out``; a few blocks taking many tiles across images (the boxes kept in registers
    reloaded per image and per chunk of patches)."""
    rng = np.random.default_rng(8 + at)
    spatial = (70, 50)
    offsets = np.array([[[3, 4], [60, 40], [-2, 45]], [[30, -3], [66, 20], [10, 10]]], np.int32)
    grad = rng.standard_normal((2, 3, 5, 6, channels)).astype(dtype)
    expected = atskern.scatter_patches(grad, offsets, spatial)
    layout, _ = v.check_scatter(grad, offsets, spatial, False, None)
    item = np.dtype(dtype).itemsize
    saved = gp.SCATTER_BLOCKS
    try:
        for blocks, pixels, chunk in [(saved, 16, 256), (3, 1, 256), (2, 4, 2), (5, 1, 1)]:
            gp.SCATTER_BLOCKS = blocks
            gp.clear_caches()
            raw = np.full(expected.nbytes // item + 2 + 8, np.nan, dtype)
            start = 8 - at  # raw is 64-byte aligned: out at 16-byte alignment or one element off it
            out = raw[start:start + expected.size].reshape(expected.shape)
            launch(lib, *gp.scatter_launch(np.ascontiguousarray(grad), offsets, layout, out, True, pixels=pixels,
                                           chunk=chunk))
            assert np.array_equal(out.view(f"u{item}"), expected.view(f"u{item}")), (blocks, pixels, chunk)
            assert np.isnan(raw[:start]).all() and np.isnan(raw[start + expected.size:]).all()
    finally:
        gp.SCATTER_BLOCKS = saved
        gp.clear_caches()


def test_host_scatter_writes_nothing_past_out(lib, guarded):
    """``out`` ends at an inaccessible page: the 16-byte zero stores of the last tile stay inside it."""
    grad = np.ones((1, 2, 3, 3, 4), np.float32)
    offsets = np.array([[[0, 0], [1, 1]]], np.int32)
    out = guarded.array((1, 16, 16, 4), np.float32, at_end=True)
    out[...] = np.nan
    layout, _ = v.check_scatter(grad, offsets, (16, 16), False, None)
    launch(lib, *gp.scatter_launch(grad, offsets, layout, out, True, pixels=1))
    expected = atskern.scatter_patches(grad, offsets, (16, 16))
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_host_scatter_few_blocks_step_through_every_axis(lib, channels_first, blocks):
    """A block's tile range crosses tile rows, slices (S0), channel rows (R) and images (B): the tiles' coordinates
    stepped tile by tile, the boxes reloaded per image; 3-D images, several chunks of patches."""
    rng = np.random.default_rng(9 + blocks)
    saved = gp.SCATTER_BLOCKS
    try:
        gp.SCATTER_BLOCKS = blocks
        gp.clear_caches()
        for trial in range(2):
            x, offsets, spatial, patch = random_case(rng, 3, channels_first, np.float32, np.int16, count=7)
            patches = atskern.extract_patches(x, offsets, patch, channels_first=channels_first)
            grad = rng.standard_normal(patches.shape).astype(np.float32)
            expected = atskern.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
            for pixels, chunk in [(1, 256), (1, 3), (4, 2)]:
                got = host_scatter(lib, grad, offsets, spatial, channels_first, pixels=pixels, chunk=chunk)
                assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (trial, pixels, chunk)
    finally:
        gp.SCATTER_BLOCKS = saved
        gp.clear_caches()


def test_launch_constants_match_the_kernel_source():
    """The host side's copies of the kernels' compile-time constants (block sizes the launch bounds and the block
    scan are compiled for, rows per batch) equal patches.cu's #defines."""
    import re

    from atskern.gpu._module import source

    defines = dict(re.findall(r"^#define (\w+) (\d+)", source("patches.cu"), re.M))
    for name in ("GATHER_BATCH", "GATHER_MAX_THREADS", "SCATTER_THREADS", "SCATTER_PIXELS", "SCATTER_STAGED",
                 "GATHER_PERIODIC"):
        assert int(defines[name]) == getattr(gp, name), name


def test_host_scatter_more_patches_than_staged(lib):
    """1100 patches per image: the first SCATTER_STAGED boxes come from shared memory, the rest from the offsets
    (read per tile); two images, so the staged boxes are replaced; still bitwise the CPU kernel."""
    rng = np.random.default_rng(10)
    count = 1100
    assert count > 1024  # patches.cu SCATTER_STAGED
    offsets = rng.integers(-3, 24, (2, count, 2)).astype(np.int32)
    grad = rng.standard_normal((2, count, 3, 2, 2)).astype(np.float32)
    expected = atskern.scatter_patches(grad, offsets, (24, 20))
    saved = gp.SCATTER_BLOCKS
    try:
        gp.SCATTER_BLOCKS = 1
        gp.clear_caches()
        for pixels, chunk in [(16, 256), (1, 200)]:
            got = host_scatter(lib, grad, offsets, (24, 20), False, pixels=pixels, chunk=chunk)
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (pixels, chunk)
    finally:
        gp.SCATTER_BLOCKS = saved
        gp.clear_caches()


@pytest.fixture
def device(lib, monkeypatch):
    """The public front ends on the emulated CuPy (``tests/emulated_device.py``), running this host build."""
    from atskern import _backend, patches
    from atskern.gpu import _alignment, _launch, _module

    emulated = install(monkeypatch, lib, gp.SOURCE, (_backend, gp, _launch, _alignment))
    monkeypatch.setattr(gp, "_handle", lambda name, device_id: emulated.names.index(name))
    monkeypatch.setattr(_module, "THREADS_PER_BLOCK", 64)
    gp.clear_caches()
    for memo in (patches._checked_gather, patches._checked_scatter):
        memo.clear()
    yield emulated
    gp.clear_caches()
    for memo in (patches._checked_gather, patches._checked_scatter):
        memo.clear()


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("offsets_dtype", [np.int32, np.int64])
def test_extract_patches_of_misaligned_device_arrays(device, monkeypatch, dtype, offsets_dtype):
    """CuPy arrays whose address or strides are not a multiple of their item size (a CUDA load or store of them
    would fault): the image, the offsets and ``out`` of ``atskern.extract_patches`` go to the kernel as aligned
    copies (and ``out`` is written back through its bytes), with the reference's patches; aligned arrays go as they
    are."""
    from atskern.gpu import _alignment

    rng = np.random.default_rng(4)
    x = rng.integers(0, 1000, (2, 11, 13, 3)).astype(dtype)
    offsets = rng.integers(-3, 12, (2, 5, 2)).astype(offsets_dtype)
    expected = reference.extract_patches(x, offsets, (4, 6), fill=7)
    seen = []
    launch_of = gp.gather_launch

    def recording(x_, offsets_, layout, fill_value, out_, threads=None):
        seen.append((x_.data.ptr, offsets_.data.ptr, out_.data.ptr))
        assert not any(_alignment.misaligned(a) for a in (x_, offsets_, out_))
        return launch_of(x_, offsets_, layout, fill_value, out_, threads)

    monkeypatch.setattr(gp, "gather_launch", recording)
    for x_shift, offsets_shift, out_shift, x_strides in [(0, 0, 0, None), (1, 3, 5, None), (2, 0, 0, (1, -2, 1, 1)),
                                                         (0, 1, 0, None), (0, 0, 3, None), (3, 0, 0, (-1, 1, 3, 1))]:
        image = x if x_strides is None else np.broadcast_to(x, x.shape)  # the same values, laid out as asked
        x_dev = placed(image, x_shift, x_strides)
        offsets_dev = placed(offsets, offsets_shift)
        out = placed(np.zeros(expected.shape, dtype), out_shift)
        got = atskern.extract_patches(x_dev, offsets_dev, (4, 6), fill=7, out=out)
        assert got is out
        assert np.array_equal(np.asarray(out).view(np.uint8), expected.view(np.uint8))
        if (x_shift, offsets_shift, out_shift, x_strides) == (0, 0, 0, None):
            assert seen[-1] == (x_dev.data.ptr, offsets_dev.data.ptr, out.data.ptr)  # no copies


@pytest.mark.parametrize("grad_dtype, out_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                                   (np.float16, np.float32)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_scatter_patches_of_misaligned_device_arrays(device, monkeypatch, grad_dtype, out_dtype, deterministic):
    """As for the gather: misaligned gradients, offsets and ``out`` reach the kernel as aligned arrays and give the
    CPU kernel's images (bitwise where deterministic)."""
    from atskern.gpu import _alignment

    launch_of = gp.scatter_launch

    def checked(grad_, offsets_, layout, out_, *args, **kwargs):
        assert not any(_alignment.misaligned(a) for a in (grad_, offsets_, out_))
        return launch_of(grad_, offsets_, layout, out_, *args, **kwargs)

    monkeypatch.setattr(gp, "scatter_launch", checked)
    rng = np.random.default_rng(5)
    grad = rng.standard_normal((2, 4, 3, 5, 2)).astype(grad_dtype)
    offsets = rng.integers(-2, 9, (2, 4, 2)).astype(np.int64)
    expected = atskern.scatter_patches(grad, offsets, (9, 10))
    assert expected.dtype == out_dtype
    for grad_shift, offsets_shift, out_shift in [(0, 0, 0), (1, 2, 3), (0, 4, 0), (2, 0, 6)]:
        out = placed(np.full(expected.shape, np.nan, out_dtype), out_shift)
        got = atskern.scatter_patches(placed(grad, grad_shift), placed(offsets, offsets_shift), (9, 10), out=out,
                                      deterministic=deterministic)
        assert got is out
        if deterministic:
            assert np.array_equal(np.asarray(out).view(np.uint8), expected.view(np.uint8))
        else:
            np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_misaligned_arrays_by_address_or_stride(device):
    """``misaligned`` reads the address and every stride (one byte elements are never misaligned); ``aligned_copy``
    holds the same elements at an aligned address; ``write_through_bytes`` writes them back to any address."""
    from atskern.gpu import _alignment

    from .emulated_device import at_address

    memory = placed(np.arange(64, dtype=np.uint8))
    ptr = memory.data.ptr
    assert not _alignment.misaligned(at_address((4, 3), np.float32, ptr, (24, 4)))
    assert _alignment.misaligned(at_address((4, 3), np.float32, ptr, (22, 4)))  # a row stride of 22 bytes
    assert _alignment.misaligned(at_address((4, 3), np.float32, ptr + 2, (-24, 4)))
    assert not _alignment.misaligned(at_address((4, 3), np.float64, ptr + 8, (-24, 8)))
    assert not _alignment.misaligned(at_address((4, 3), np.uint8, ptr + 1, (5, 1)))
    odd = at_address((4, 3), np.float32, ptr + 1, (13, 4))
    copy = _alignment.aligned_copy(odd)
    assert copy.data.ptr % 256 == 0 and copy.flags.c_contiguous and not _alignment.misaligned(copy)
    assert np.array_equal(np.asarray(copy).view(np.uint32), np.asarray(odd).view(np.uint32))
    target = at_address((4, 3), np.float32, ptr + 3, (13, 4))
    _alignment.write_through_bytes(target, copy + 1)
    assert np.array_equal(np.asarray(target), np.asarray(copy) + 1)


def test_gpu_smoke_patch_workout_on_the_host_build(device):
    """``bench.gpu_smoke``'s patch part (what compute-sanitizer runs on a GPU) on the emulated device: every case
    equals the CPU kernel, the misaligned arrays included (a mistake in the script would cost a GPU session)."""
    from bench import gpu_smoke

    gpu_smoke.patches(device.module, atskern, np.random.default_rng(0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_front_end_patch_fuzz_equals_the_cpu(device, data):
    """``atskern.extract_patches`` and ``scatter_patches`` on the emulated device (checks, copies of views and of
    misaligned arrays, launch, ``out``) against the CPU path, for every layout kind of
    ``tests/test_patches_layouts.py``, offsets of every integer dtype in any layout, and ``out`` at any address:
    the gather bit for bit, the deterministic scatter bit for bit (the CPU kernel's sums in its order)."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    dtype = np.dtype(data.draw(st.sampled_from([np.uint8, np.int16, np.float16, np.float32, np.float64]),
                               label="dtype"))
    channels_first, spatial, patch, batch, count, channels, rng = draw_geometry(data)
    base = base_for(kind, random_images(rng, images_shape(batch, spatial, channels, channels_first), dtype))
    x = view_of(base, kind, 1 if channels_first else -1)
    offsets_dtype = data.draw(st.sampled_from(OFFSET_DTYPES), label="offsets_dtype")
    low = -3 if np.issubdtype(offsets_dtype, np.signedinteger) else 0
    offsets = np.stack([rng.integers(low, s + 3, size=(batch, count)) for s in spatial], -1).astype(offsets_dtype)
    offsets_view = view_of(offsets, data.draw(st.sampled_from(["contiguous", "reversed", "misaligned"]),
                                              label="offsets_kind"), -1)
    fill = int(data.draw(st.integers(0, 9), label="fill"))
    want = atskern.extract_patches(x, offsets_view, patch, fill=fill, channels_first=channels_first)
    out = placed(np.zeros(want.shape, dtype), data.draw(st.sampled_from([0, 1, 16]), label="out_shift")) \
        if data.draw(st.booleans(), label="out") else None
    got = atskern.extract_patches(device_array(x), device_array(offsets_view), patch, fill=fill,
                                  channels_first=channels_first, out=out)
    assert out is None or got is out
    assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
    if dtype.kind != "f":
        return
    grad_base = base_for(kind, rng.standard_normal(want.shape).astype(dtype))
    grad = view_of(grad_base, kind, 2 if channels_first else -1)
    want_back = atskern.scatter_patches(grad, offsets_view, spatial, channels_first=channels_first)
    got_back = atskern.scatter_patches(device_array(grad), device_array(offsets_view), spatial,
                                       channels_first=channels_first)
    assert np.array_equal(np.asarray(got_back).view(np.uint8), want_back.view(np.uint8))
