"""atskern.io at its edges: OpenSlide's handle under close, levels OpenSlide maps with one downsample, files that
must be refused rather than misread, strided slicing, file handles, argument checks."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

from atskern import io as aio  # noqa: E402
from atskern.io._deps import available  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_openslide = pytest.mark.skipif(not available("openslide"), reason="OpenSlide is not installed")


def _random_image(shape, dtype=np.uint8, seed=0):
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _page(path, index):
    """An independent oracle: tifffile decodes one page of the file."""
    with tifffile.TiffFile(path) as tif:
        return tif.pages[index].asarray()


def _open_files(paths) -> int:
    """How many descriptors of this process are open on ``paths`` (Linux)."""
    targets = {os.path.realpath(p) for p in paths}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") in targets
        except OSError:
            pass
    return count


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")

# -- OpenSlide -----------------------------------------------------------------------------------------------------

CLOSE_RACE = """
    import sys, threading
    import numpy as np
    from atskern.io import open_slide

    slide = open_slide(sys.argv[1], backend="openslide", threads=1, cache_bytes=0)
    want = slide.read_patches([[0, 0], [100, 200], [300, 40]], 48)
    wrong = []

    def reader():
        for _ in range(150):
            if not np.array_equal(slide.read_patches([[0, 0], [100, 200], [300, 40]], 48), want):
                wrong.append(1)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    while any(thread.is_alive() for thread in readers):
        slide.close()
    print("OK", len(wrong))
"""


@needs_openslide
def test_openslide_close_waits_for_reads_in_flight(tmp_path):
    """close() while other threads read through OpenSlide: every read finishes with the right pixels (OpenSlide's
    handle was closed under a running read_region: the process aborted, tc->outstanding == 0)."""
    path = aio.write_pyramid(tmp_path / "a.tif", _random_image((384, 512, 3)), tile=64, compression="deflate")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CLOSE_RACE), str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OK", "0"]


@needs_openslide
def test_openslide_levels_read_where_openslide_maps_them(tmp_path):
    """A level whose per-axis downsamples differ (67 -> 34 rows, 2000 -> 1000 columns): OpenSlide maps level-0
    locations with its one mean downsample, 135 / 68, so the location must be computed with it (the per-axis
    factor put a patch at column 952 of level 1 seven columns off). Where that downsample makes the location exact,
    the pixels are the stored level's; elsewhere they lie within a fraction of a pixel (OpenSlide interpolates)."""
    image = _random_image((67, 2000, 3))
    path = aio.write_pyramid(tmp_path / "wide.tif", image, tile=64, compression="deflate", min_side=400)
    stored = _page(path, 1)
    slide = aio.open_slide(path, backend="openslide")
    assert slide.levels[1].shape == stored.shape == (34, 1000, 3)
    exact = slide.read_patches([[0, 952], [0, 340]], (16, 24), level=1)  # 952 and 340: multiples of 68
    np.testing.assert_array_equal(exact[0], stored[:16, 952:976])
    np.testing.assert_array_equal(exact[1], stored[:16, 340:364])
    for y, x in [(10, 900), (3, 801), (17, 123)]:
        got = slide.read_patches([[y, x]], 16, level=1)[0].astype(int)
        errors = {(dy, dx): np.abs(got - stored[y + dy:y + dy + 16, x + dx:x + dx + 16]).mean()
                  for dy in (-1, 0, 1) for dx in range(-9, 10)}
        assert min(errors, key=errors.get) == (0, 0), (y, x, errors[0, 0], min(errors.values()))


@needs_openslide
def test_openslide_refuses_a_single_level_slide_unless_asked(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _random_image((128, 160, 3)), tile=(32, 32), photometric="rgb")
    with pytest.raises(aio.SlideFormatError, match="single-level.*require_pyramid=False"):
        aio.open_slide(path, backend="openslide")
    assert aio.open_slide(path, backend="openslide", require_pyramid=False).level_count == 1


def _planar_pyramid(path, image):
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(32, 32), photometric="rgb", planarconfig="separate", compression="zlib")
        writer.write(image[:, ::2, ::2], tile=(32, 32), photometric="rgb", planarconfig="separate", subfiletype=1,
                     compression="zlib")
    return path


@needs_openslide
def test_auto_falls_back_to_openslide_only_where_it_reads_the_files_values(tmp_path):
    """A 16-bit file tifffile's backend refuses is not handed to OpenSlide (8-bit RGB: values divided by 257 were
    returned as the slide's); an 8-bit one still is, and reads the file's values."""
    u16 = _random_image((3, 128, 160), np.uint16)
    path = _planar_pyramid(tmp_path / "planar16.tif", u16)
    with pytest.raises(aio.SlideFormatError, match="axes 'SYX'.*does not fall back to OpenSlide"):
        aio.open_slide(path)
    u8 = _random_image((3, 128, 160))
    slide = aio.open_slide(_planar_pyramid(tmp_path / "planar8.tif", u8))
    assert slide.backend == "openslide"
    np.testing.assert_array_equal(slide.read_level(0), np.moveaxis(u8, 0, -1))


# -- files refused rather than misread -----------------------------------------------------------------------------

def test_a_level_over_several_pages_is_refused(tmp_path):
    """An OME-TIFF stored CYX (one page per channel, the fluorescence layout) was read as its first page, shape
    (H, W, 1): channels 1 and 2 silently dropped."""
    image = _random_image((3, 96, 128), np.uint16)
    path = tmp_path / "cyx.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        writer.write(image, tile=(32, 32), subifds=1, metadata={"axes": "CYX"}, photometric="minisblack")
        writer.write(image[:, ::2, ::2], tile=(32, 32), subfiletype=1, photometric="minisblack")
    with pytest.raises(aio.SlideFormatError, match=r"series 0 has axes 'CYX' \(level 0: shape \(3, 96, 128\) in 3 "
                                                   r"pages\).*YX or YXS"):
        aio.open_slide(path, backend="tifffile")
    with pytest.raises(aio.SlideFormatError, match="axes 'CYX'"):
        aio.open_slide(path)


def test_uint64_levels_have_numpys_own_uint64(tmp_path):
    """tifffile's page dtype for uint64 is 'Q' (numpy.ulonglong), a type torch.from_numpy refuses; the levels and
    the patches are numpy.uint64."""
    image = _random_image((96, 80, 1), np.uint64)
    path = aio.write_pyramid(tmp_path / "u64.tif", image, tile=32, compression="zstd", min_side=40)
    slide = aio.open_slide(path)
    assert slide.levels[0].dtype.type is np.uint64
    patches = slide.read_patches([[0, 0], [50, 40]], 8)
    assert patches.dtype.type is np.uint64
    np.testing.assert_array_equal(patches[1], image[50:58, 40:48])
    torch = pytest.importorskip("torch")
    assert torch.from_numpy(patches).dtype == torch.uint64


# -- strided slicing -----------------------------------------------------------------------------------------------

STRIDED_KEYS = [np.s_[::64, ::64], np.s_[::7, ::5], np.s_[3:900:16, 1::9], np.s_[::40, 10:200], np.s_[5, ::3],
                np.s_[::2, 17, 1:], np.s_[200:10:3, ::4], np.s_[::300, ::300]]


def _peak_bytes(fn):
    """``fn()`` and the peak of the memory NumPy (and Python) allocated meanwhile."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("reader", ["tifffile", pytest.param("openslide", marks=needs_openslide)])
def test_strided_slices_read_the_selected_pixels_not_the_spanned_region(tmp_path, reader):
    """level[::64, ::64] of a 1024 x 1536 level (4.5 MiB decoded) read and allocated the whole level, then
    subsampled; it now decodes a band of tiles at a time (OpenSlide: a row at a time), equal to NumPy's slicing."""
    image = _random_image((1024, 1536, 3), seed=6)
    path = aio.write_pyramid(tmp_path / "big.tif", image, tile=32, compression="deflate")
    level = aio.open_slide(path, backend=reader, cache_bytes=0, threads=1).levels[0]
    for key in STRIDED_KEYS:
        got, peak = _peak_bytes(lambda key=key: level[key])
        np.testing.assert_array_equal(got, image[key])
        if key == STRIDED_KEYS[0]:
            assert peak < 1 << 20, peak  # one band of 48 tiles is 144 KiB; the level is 4.5 MiB


# -- file handles --------------------------------------------------------------------------------------------------

@needs_proc
def test_a_dropped_slide_closes_its_file_without_a_gc_pass(tmp_path):
    """Slide <-> SlideLevel was a reference cycle: a dropped slide kept its descriptor until the cyclic GC ran. A
    level still reads after its slide is dropped."""
    image = _random_image((128, 96, 3))
    path = aio.write_pyramid(tmp_path / "a.tif", image, tile=32, compression="none")
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            slide = aio.open_slide(path)
            slide.read_patches([[0, 0]], 8)
            del slide
        assert _open_files([path]) == 0
        level = aio.open_slide(path).levels[1]
        np.testing.assert_array_equal(level[:], _page(path, 1))
        del level
        assert _open_files([path]) == 0
    finally:
        gc.enable()


def _copies(tmp_path, count):
    image = _random_image((64, 48, 3), seed=7)
    first = aio.write_pyramid(tmp_path / "c0.tif", image, tile=16, compression="none")
    data = Path(first).read_bytes()
    paths = [str(first)]
    for i in range(1, count):
        paths.append(str(tmp_path / f"c{i}.tif"))
        Path(paths[-1]).write_bytes(data)
    return image, paths


@needs_proc
def test_open_slides_closes_what_it_evicts_and_an_evicted_slide_still_reads(tmp_path):
    """OpenSlides (the adapters' cache of open slides) closes the slides it evicts, while another thread reading one
    of them gets the right pixels throughout (a read after the close opens the file again)."""
    from atskern.io._cache import OpenSlides

    image, paths = _copies(tmp_path, 12)
    cache = OpenSlides(4)
    first = cache.get(paths[0], lambda: aio.open_slide(paths[0], cache_bytes=0, threads=2))
    offsets = np.array([[0, 0], [10, 20], [40, 30]])
    want = np.stack([image[y:y + 16, x:x + 16] for y, x in offsets])
    results = []
    reader = threading.Thread(target=lambda: results.extend(
        np.array_equal(first.read_patches(offsets, 16), want) for _ in range(300)))
    reader.start()
    for path in paths[1:]:
        cache.get(path, lambda path=path: aio.open_slide(path)).read_patches([[0, 0]], 8)
    reader.join()
    assert len(results) == 300 and all(results)
    assert len(cache) == 4 and _open_files(paths[1:]) == 4
    del first  # it reopened its file for the reads after its eviction: closed as it is dropped
    assert _open_files(paths) == 4
    cache.clear()
    assert _open_files(paths) == 0
    with pytest.raises(ValueError, match="maxsize must be an int >= 1"):
        OpenSlides(0)


# -- arguments -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "small.tif"
    return aio.write_pyramid(path, _random_image((128, 96, 3), seed=8), tile=32, compression="zstd")


def test_fill_is_checked_against_the_slides_dtype(tmp_path):
    """fill=1e40 became inf on a float32 slide, 2**70 (a float32) was refused as 'not a number', and 2**70 on
    uint16 raised a raw OverflowError: the check is atskern's own (atskern.extract_patches')."""
    f32 = aio.write_pyramid(tmp_path / "f.tif", np.zeros((64, 64), np.float32), tile=16, compression="zstd")
    u16 = aio.write_pyramid(tmp_path / "u.tif", np.zeros((64, 64), np.uint16), tile=16, compression="zstd")
    f32, u16 = aio.open_slide(f32), aio.open_slide(u16)
    with pytest.raises(ValueError, match=r"fill=1e\+40 cannot be represented in the images' dtype float32"):
        f32.read_patches([[-100, 0]], 2, fill=1e40)
    assert np.all(f32.read_patches([[-100, 0]], 2, fill=2**70) == np.float32(2**70))
    with pytest.raises(ValueError, match="fill=1180591620717411303424 cannot be represented in the images' dtype "
                                         "uint16"):
        u16.read_patches([[-100, 0]], 2, fill=2**70)
    with pytest.raises(ValueError, match="fill=-1 cannot be represented"):
        u16.read_region((0, 0), 2, fill=-1)


@pytest.mark.parametrize("reader", ["tifffile", pytest.param("openslide", marks=needs_openslide)])
def test_bytes_paths_open_and_survive_pickling(small_slide, reader):
    path = os.fsencode(small_slide)
    slide = aio.open_slide(path, backend=reader)
    assert slide.path == str(small_slide)
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read_patches([[5, 6]], 8), slide.read_patches([[5, 6]], 8))
    with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike.*got int"):
        aio.open_slide(3)


def test_errors_name_the_argument(small_slide):
    with pytest.raises(ValueError, match=r"cache_bytes must be an int >= 0.*got -1"):
        aio.open_slide(small_slide, cache_bytes=-1)
    slide = aio.open_slide(small_slide)
    with pytest.raises(TypeError, match="origin must hold integers, got dtype float64"):
        slide.read_region((1.5, 2), 4)
    with pytest.raises(TypeError, match="max_side must be an int.*'512'"):
        slide.best_level("512")
    assert slide.best_level(np.int64(64)) == 1
    level = slide.levels[0]
    for key in (True, (0, np.False_), (0, 0, True)):
        with pytest.raises(IndexError, match="bool"):
            level[key]
    np.testing.assert_array_equal(level[1], _page(small_slide, 0)[1])


def test_write_pyramid_refuses_min_side_0_and_keeps_complex_levels(tmp_path):
    with pytest.raises(ValueError, match="min_side must be an int >= 1"):
        aio.write_pyramid(tmp_path / "z.tif", np.zeros((64, 64), np.uint8), tile=16, min_side=0)
    rng = np.random.default_rng(9)
    image = (rng.normal(size=(64, 48, 2)) + 1j * rng.normal(size=(64, 48, 2))).astype(np.complex64)
    path = aio.write_pyramid(tmp_path / "c.tif", image, tile=16, compression="zstd", min_side=20)
    level1 = aio.open_slide(path).read_level(1)
    means = image.astype(np.complex128).reshape(32, 2, 24, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(level1, means, rtol=1e-6)
    assert np.abs(level1.imag).max() > 1


def test_a_progress_bar_without_tqdm_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r"'tqdm'.*pip install 'atskern\[slides\]'"):
        aio.write_synthetic_slide(tmp_path / "s.tif", 512, tile=128, min_side=128, progress=True)


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_a_read_guard_unpickles_fresh_under_every_pickle_protocol(protocol):
    from atskern.io._guard import ReadGuard

    guard = pickle.loads(pickle.dumps(ReadGuard(), protocol))
    with guard.reading(lambda: "handle") as handle:
        assert handle == "handle" and guard.reads == 1
    with guard.idle():
        assert guard.reads == 0


def _two_level_tiff(path, image):
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(16, 16), photometric="rgb", compression="zlib", metadata=None)
        writer.write(image[::2, ::2], tile=(16, 16), photometric="rgb", compression="zlib", subfiletype=1,
                     metadata=None)


def test_a_relative_path_keeps_naming_the_file_opened(tmp_path, monkeypatch):
    """A slide opened as "slide.tif" opened its descriptor lazily by that relative path: after a chdir it read another
    directory's slide.tif at the first file's tile offsets (silently wrong pixels), and the per-process caches of
    the torch and Keras slide paths handed back the first directory's slide for the second's path."""
    images = {}
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        images[name] = _random_image((64, 64, 3), seed=seed)
        _two_level_tiff(tmp_path / name / "slide.tif", images[name])
    monkeypatch.chdir(tmp_path / "a")
    slide = aio.open_slide("slide.tif")
    monkeypatch.chdir(tmp_path / "b")
    np.testing.assert_array_equal(slide.read_patches([[0, 0]], 16)[0], images["a"][:16, :16])
    slide.close()
    np.testing.assert_array_equal(slide.read_patches([[16, 16]], 16)[0], images["a"][16:32, 16:32])
    torch_slides = pytest.importorskip("ats.torch.slides")
    monkeypatch.chdir(tmp_path / "a")
    first = torch_slides.open_cached("slide.tif")
    monkeypatch.chdir(tmp_path / "b")
    second = torch_slides.open_cached("slide.tif")
    assert first is not second
    np.testing.assert_array_equal(second.read_patches([[0, 0]], 16)[0], images["b"][:16, :16])
    keras_slides = pytest.importorskip("ats.slides")
    monkeypatch.chdir(tmp_path / "a")
    keras_slides._slide("slide.tif", None, 1 << 20)  # the per-process cache now holds a/slide.tif
    monkeypatch.chdir(tmp_path / "b")
    np.testing.assert_array_equal(keras_slides._slide("slide.tif", None, 1 << 20).read_patches([[0, 0]], 16)[0],
                                  images["b"][:16, :16])


@pytest.mark.parametrize("reader", ["tifffile", pytest.param("openslide", marks=needs_openslide)])
def test_a_file_replaced_after_opening_is_refused_not_misread(tmp_path, reader):
    """A read that opens the file again (after close(), in a forked worker) took the new file's bytes at the old
    file's tile offsets (OpenSlide: levels other than the slide's); now it refuses a file whose size or modification
    time changed."""
    path = tmp_path / "slide.tif"
    image = _random_image((64, 64, 3), seed=3)
    _two_level_tiff(path, image)
    slide = aio.open_slide(path, backend=reader)
    np.testing.assert_array_equal(slide.read_patches([[0, 0]], 16)[0], image[:16, :16])
    slide.close()
    _two_level_tiff(tmp_path / "other.tif", _random_image((96, 96, 3), seed=4))
    os.replace(tmp_path / "other.tif", path)
    with pytest.raises(OSError, match="changed since the slide was opened"):
        slide.read_patches([[32, 32]], 16)  # tiles not in the cache


def test_padding_cells_centred_exactly_on_the_edge_are_not_valid():
    """``valid_cells`` took a cell's centre in floats: 3.5 * 122 / 7 = 60.99999999999999 < 61 kept cell 3 of a
    7-cell grid over 122 padded pixels, while ``slide_offsets`` (integers) found its centre on the edge, outside,
    and read the slide's middle. Both now decide on integers; every cell of small grids agrees with Fractions."""
    from fractions import Fraction

    from atskern.io import grid

    assert grid.valid_cells((7, 7), (122, 122), [[61, 61]])[0, 3].tolist() == [False] * 7
    for cells in range(1, 24):
        for padded in range(cells, 60):
            sizes = np.arange(1, padded + 1)
            mask = grid.valid_cells((cells, 1), (padded, 1), np.stack([sizes, np.ones_like(sizes)], axis=1))[:, :, 0]
            want = np.array([[Fraction(2 * s + 1, 2) * Fraction(padded, cells) < h or (s == 0 and h > 0)
                              for s in range(cells)] for h in sizes])
            np.testing.assert_array_equal(mask, want)


def test_write_pyramid_refuses_a_float_factor(tmp_path):
    with pytest.raises(ValueError, match=r"factor must be one of \(2, 3, 4\).*got 2.0"):
        aio.write_pyramid(tmp_path / "s.tif", np.zeros((64, 64, 3), np.uint8), tile=16, factor=2.0)
