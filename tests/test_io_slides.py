"""atskern.io: patches read on demand from tiled slide pyramids, against full reads and OpenSlide."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

import atskern  # noqa: E402
from atskern import io as aio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 700
TILE = 128


def _slide(tmp_path_factory, layout, compression, size=SIZE, **kw):
    path = tmp_path_factory.mktemp("slides") / f"{layout}-{compression}.tif"
    aio.write_synthetic_slide(path, size, label=1, seed=3, tile=TILE, factor=2, min_side=200, layout=layout,
                              compression=compression, tissue_scale=0.35, **kw)
    return path


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    return _slide(tmp_path_factory, "tiff", "jpeg")


def _full_level(path, level):
    """An independent oracle: tifffile decodes the whole level (its own code path)."""
    data = tifffile.imread(path, series=0, level=level)
    return data[0] if data.ndim == 4 else data


def _expected(full, offsets, patch, fill):
    """Patches cut by padding the full level with ``fill`` (no tile arithmetic)."""
    pad = 2 * max(patch) + int(np.abs(offsets).max())
    padded = np.pad(full, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    return np.stack([padded[y + pad:y + pad + patch[0], x + pad:x + pad + patch[1]] for y, x in offsets])


def _random_offsets(rng, shape, patch, k=24):
    lo = -np.array(patch) // 2
    hi = np.array(shape[:2]) - np.array(patch) // 2
    return np.stack([rng.integers(lo[0], hi[0], k), rng.integers(lo[1], hi[1], k)], axis=1)


@pytest.mark.parametrize("layout,compression", [
    ("tiff", "jpeg"), ("tiff", "lzw"), ("bigtiff", "zstd"), ("bigtiff", "jpeg"), ("ome", "deflate"),
    ("ome", "jpeg"), ("subifds", "jpeg2000"), ("svs", "jpeg"), ("svs", "zstd"),
])
def test_patches_equal_full_read_every_layout(tmp_path_factory, layout, compression):
    path = _slide(tmp_path_factory, layout, compression)
    rng = np.random.default_rng(0)
    with aio.open_slide(path, threads=2) as slide:
        assert slide.level_count >= 2
        assert slide.kind == {"ome": "ome", "svs": "svs"}.get(layout, "generic")
        for level in range(slide.level_count):
            full = _full_level(path, level)
            assert slide.levels[level].shape == full.shape
            patch = (48, 80)
            offsets = _random_offsets(rng, full.shape, patch)
            got = slide.read_patches(offsets, patch, level=level, fill=9)
            np.testing.assert_array_equal(got, _expected(full, offsets, patch, 9))
        assert slide.levels[1].downsample == pytest.approx(SIZE / slide.levels[1].shape[0])


def test_outside_tiles_take_the_fill(jpeg_slide):
    slide = aio.open_slide(jpeg_slide)
    offsets = np.array([[-500, -500], [SIZE, 0], [0, SIZE + 3], [-40, -40], [SIZE - 10, SIZE - 20]])
    got = slide.read_patches(offsets, 64, fill=200)
    assert (got[:3] == 200).all()
    assert (got[3, :40] == 200).all() and (got[3, :, :40] == 200).all()
    assert (got[4, 10:] == 200).all() and (got[4, :, 20:] == 200).all()
    full = _full_level(jpeg_slide, 0)
    np.testing.assert_array_equal(got[3, 40:, 40:], full[:24, :24])
    np.testing.assert_array_equal(got[4, :10, :20], full[SIZE - 10:, SIZE - 20:])
    empty = slide.read_patches(np.zeros((0, 2), np.int64), 8)
    assert empty.shape == (0, 8, 8, 3)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fuzz_patches_against_padded_full_read(jpeg_slide, data):
    slide = aio.open_slide(jpeg_slide, threads=2, cache_bytes=3 * TILE * TILE * 3)
    level = data.draw(st.integers(0, slide.level_count - 1))
    full = _full_level_cached(str(jpeg_slide), level)
    h, w = data.draw(st.integers(1, 150)), data.draw(st.integers(1, 150))
    k = data.draw(st.integers(1, 6))
    H, W = full.shape[:2]
    offsets = np.array([[data.draw(st.integers(-h - 5, H + 5)), data.draw(st.integers(-w - 5, W + 5))] for _ in range(k)])
    fill = data.draw(st.integers(0, 255))
    np.testing.assert_array_equal(slide.read_patches(offsets, (h, w), level, fill=fill),
                                  _expected(full, offsets, (h, w), fill))
    region = slide.read_region(offsets[0], (h, w), level, fill=fill)
    np.testing.assert_array_equal(region, _expected(full, offsets[:1], (h, w), fill)[0])


_FULL = {}


def _full_level_cached(path, level):
    if (path, level) not in _FULL:
        _FULL[path, level] = _full_level(path, level)
    return _FULL[path, level]


def test_lazy_level_indexing(jpeg_slide):
    slide = aio.open_slide(jpeg_slide)
    level = slide.levels[1]
    full = _full_level(jpeg_slide, 1)
    np.testing.assert_array_equal(level[10:90, 200:260], full[10:90, 200:260])
    np.testing.assert_array_equal(level[5, 7:9, 1], full[5, 7:9, 1])
    np.testing.assert_array_equal(np.asarray(level), full)
    assert level.dtype == np.uint8 and level.ndim == 3 and len(level) == full.shape[0]


def test_cache_eviction_under_a_small_budget(jpeg_slide):
    tile_bytes = TILE * TILE * 3
    slide = aio.open_slide(jpeg_slide, cache_bytes=2 * tile_bytes + 1, threads=1)
    full = _full_level(jpeg_slide, 0)
    offsets = np.array([[100, 100], [300, 300], [500, 100], [100, 500]])  # each spans 4 tiles
    np.testing.assert_array_equal(slide.read_patches(offsets, 100), _expected(full, offsets, (100, 100), 0))
    cache = slide.cache
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes and cache.evictions > 0
    hits = cache.hits
    slide.read_patches([[150, 520]], 10)  # tile (1, 4), the last one decoded, is still cached
    assert cache.hits > hits
    unit = aio.TileCache(100)
    unit.put("a", np.zeros(60, np.uint8))
    unit.put("b", np.zeros(30, np.uint8))
    unit.get("a")
    unit.put("c", np.zeros(30, np.uint8))  # evicts "b", the least recently used
    assert "a" in unit and "c" in unit and "b" not in unit and unit.nbytes == 90
    unit.put("big", np.zeros(101, np.uint8))  # over the whole budget: not stored
    assert "big" not in unit
    with pytest.raises(ValueError, match="max_bytes"):
        aio.TileCache(-1)
    with pytest.raises(ValueError, match="max_bytes"):
        aio.TileCache(True)
    assert aio.TileCache(np.int64(100)).max_bytes == 100  # a NumPy integer, as the slides' threads take
    with pytest.raises(ValueError, match=r"origin must be \(row, column\), got \[1, 2, 3\]"):
        slide.read_region((1, 2, 3), 4)  # "cannot reshape array of size 3" once
    with pytest.raises(TypeError, match="origin must hold integers"):
        slide.read_region((1.5, 2), 4)
    for huge in ((2**20, 2**20), (2**40, 2**40)):  # a bare MemoryError (or NumPy's ValueError) once
        with pytest.raises(ValueError, match="offsets and patch_size give an output of shape"):
            slide.read_patches([[0, 0]], huge)


def test_concurrent_readers_from_threads(jpeg_slide):
    slide = aio.open_slide(jpeg_slide, threads=2, cache_bytes=4 * TILE * TILE * 3)
    full = _full_level(jpeg_slide, 0)
    rng = np.random.default_rng(1)
    jobs = [_random_offsets(rng, full.shape, (64, 64), 16) for _ in range(24)]
    errors, results = [], {}

    def worker(i):
        try:
            for j in range(i, len(jobs), 6):
                results[j] = slide.read_patches(jobs[j], 64, fill=1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for j, offsets in enumerate(jobs):
        np.testing.assert_array_equal(results[j], _expected(full, offsets, (64, 64), 1))


def _read_in_child(slide, offsets, queue):
    queue.put(slide.read_patches(offsets, 32))


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_forked_child_and_pickled_slide_read_the_same(jpeg_slide):
    slide = aio.open_slide(jpeg_slide, threads=2)
    offsets = np.array([[10, 20], [300, 400], [650, 650]])
    parent = slide.read_patches(offsets, 32)  # opens the descriptor and the pool in the parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(slide, offsets, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, parent)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.threads == 2 and clone.path == slide.path
    np.testing.assert_array_equal(clone.read_patches(offsets, 32), parent)


def test_multiscale_read_maps_grid_cells_like_patch_offsets(jpeg_slide):
    slide = aio.open_slide(jpeg_slide)
    grid = (25, 25)
    samples = np.array([[0, 0], [12, 12], [24, 3]], np.int32)
    hi, lo = slide.read_multiscale(samples, grid, [(50, 50), (20, 20)], levels=(0, 1))
    # independent mapping: the cell centre c = L (s + 0.5) / G, patch start rint(c - P / 2)
    for level, got, p in ((0, hi, 50), (1, lo, 20)):
        L = np.array(slide.levels[level].shape[:2])
        starts = np.rint(L * (samples + 0.5) / np.array(grid) - p / 2).astype(np.int64)
        np.testing.assert_array_equal(got, slide.read_patches(starts, p, level=level))
    assert hi.shape == (3, 50, 50, 3) and lo.shape == (3, 20, 20, 3)
    offsets = atskern.patch_offsets(samples[None], grid, slide.levels[0].shape[:2], (50, 50), margin=0.1)[0]
    (with_margin,) = slide.read_multiscale(samples, grid, 50, margin=0.1)
    np.testing.assert_array_equal(with_margin, slide.read_patches(offsets, 50))


def test_sparse_large_slide_costs_little_disk_and_memory(tmp_path):
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "huge.tif"
    side = 60_000
    aio.write_synthetic_slide(path, side, label=1, seed=0, tile=512, min_side=1024, tissue_regions=1,
                              tissue_scale=0.004, lesions=(1, 1), decoys=(0, 0))
    assert os.path.getsize(path) < 8 << 20  # 10.8 GB of pixels at level 0
    slide = aio.open_slide(path, threads=2)
    assert slide.levels[0].shape == (side, side, 3) and slide.levels[0].nbytes > 10e9
    rss = psutil.Process().memory_info().rss
    rng = np.random.default_rng(0)
    for _ in range(5):
        patches = slide.read_patches(rng.integers(0, side - 256, (64, 2)), 256)
    low = slide.read_level(slide.level_count - 1)
    growth = psutil.Process().memory_info().rss - rss
    assert growth < 256 << 20, growth
    assert patches.shape == (64, 256, 256, 3) and low.shape[0] <= 1024


def test_clear_errors(tmp_path, jpeg_slide):
    with pytest.raises(FileNotFoundError, match="no slide at"):
        aio.open_slide(tmp_path / "missing.svs")
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, np.zeros((64, 64, 3), np.uint8), rowsperstrip=8)
    with pytest.raises(aio.SlideFormatError, match="strip-based.*tiled pyramid.*vips tiffsave"):
        aio.open_slide(strips, backend="tifffile")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((64, 64, 3), np.uint8), tile=(16, 16))
    with pytest.raises(aio.SlideFormatError, match="single-level.*pyramid"):
        aio.open_slide(flat, backend="tifffile")
    assert aio.open_slide(flat, require_pyramid=False).level_count == 1
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(aio.SlideFormatError, match="not a TIFF"):
        aio.open_slide(junk, backend="tifffile")
    slide = aio.open_slide(jpeg_slide)
    with pytest.raises(ValueError, match="level 7 is out of range.*3 levels"):
        slide.read_patches([[0, 0]], 8, level=7)
    with pytest.raises(ValueError, match=r"offsets must be \(K, 2\)"):
        slide.read_patches([0, 0], 8)
    with pytest.raises(ValueError, match="patch_size"):
        slide.read_patches([[0, 0]], 0)
    with pytest.raises(ValueError, match="fill=300 cannot be represented in the images' dtype uint8"):
        slide.read_patches([[0, 0]], 8, fill=300)
    with pytest.raises(TypeError, match="offsets must hold integers"):
        slide.read_patches([[0.5, 0]], 8)
    with pytest.raises(ValueError, match="out must be a NumPy array of shape"):
        slide.read_patches([[0, 0]], 8, out=np.empty((1, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="backend"):
        aio.open_slide(jpeg_slide, backend="pillow")
    with pytest.raises(ValueError, match="threads"):
        aio.open_slide(jpeg_slide, threads=0)
    with pytest.raises(TypeError, match="series must be an integer.*'0'"):
        aio.open_slide(jpeg_slide, series="0")


@pytest.mark.parametrize("layout,compression", [("tiff", "jpeg"), ("bigtiff", "jpeg"), ("svs", "jpeg"),
                                                ("tiff", "zstd"), ("bigtiff", "deflate"), ("svs", "lzw")])
def test_level0_pixels_equal_openslide(tmp_path_factory, layout, compression):
    openslide = pytest.importorskip("openslide")
    path = _slide(tmp_path_factory, layout, compression)
    reference = openslide.OpenSlide(str(path))
    assert reference.properties["openslide.vendor"] == ("aperio" if layout == "svs" else "generic-tiff")
    slide = aio.open_slide(path)
    rng = np.random.default_rng(2)
    offsets = rng.integers(0, SIZE - 96, (16, 2))
    ours = slide.read_patches(offsets, 96)
    theirs = np.stack([np.asarray(reference.read_region((int(x), int(y)), 0, (96, 96)))[..., :3] for y, x in offsets])
    np.testing.assert_array_equal(ours, theirs)
    via_openslide = aio.open_slide(path, backend="openslide")
    np.testing.assert_array_equal(via_openslide.read_patches(offsets - 40, 96, fill=3), slide.read_patches(offsets - 40, 96, fill=3))
    if layout != "svs":  # generic TIFF: the reduced levels too (OpenSlide's Aperio driver renders its own)
        np.testing.assert_array_equal(via_openslide.read_level(1), slide.read_level(1))


def test_import_without_the_optional_packages(jpeg_slide):
    code = (
        "import sys; sys.modules['tifffile'] = None; sys.modules['imagecodecs'] = None\n"
        "import atskern, atskern.io\n"
        "try:\n"
        f"    atskern.io.open_slide({str(jpeg_slide)!r}, backend='tifffile')\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install 'atskern[slides]'" in out.stdout


def test_every_slide_keeps_a_cell_of_the_grid():
    """A cell is valid where its centre lies inside the slide's low view; a slide shorter than half a cell along an
    axis keeps that axis's first cell (it had none: an all-zero attention row, refused by sampling)."""
    from atskern.io import grid

    mask = grid.valid_cells((4, 4), (64, 64), [[64, 64], [40, 8], [1, 1], [20, 0]])
    assert mask[0].all()
    assert mask[1].tolist() == [[True, False, False, False]] * 2 + [[False] * 4] * 2  # centres 8, 24, 40, 56
    assert mask[2].tolist() == [[True, False, False, False]] + [[False] * 4] * 3
    assert not mask[3].any()  # an empty slide has no cell


def test_auto_backend_keeps_tifffile_hint_when_openslide_also_refuses(tmp_path):
    """With OpenSlide installed, "auto" tries it after tifffile; a file neither reads gets tifffile's error, with
    its conversion hint (OpenSlide's own said "Unsupported or missing image file"), as a SlideFormatError."""
    from atskern.io._deps import available

    if not available("openslide"):
        pytest.skip("OpenSlide is not installed")
    strips = tmp_path / "strips.tif"
    with tifffile.TiffWriter(strips) as writer:
        writer.write(np.zeros((200, 300), np.uint8), metadata=None)
        writer.write(np.zeros((100, 150), np.uint8), subfiletype=1, metadata=None)
    with pytest.raises(aio.SlideFormatError, match="strip-based.*vips tiffsave.*OpenSlide cannot read it either"):
        aio.open_slide(strips)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a TIFF.*OpenSlide cannot read it either"):
        aio.open_slide(junk)


def test_close_waits_for_reads_in_flight_and_slides_do_not_leak_descriptors(tmp_path):
    """close() in one thread while others read: every read returns the right pixels or none (a closed descriptor's
    number, reused by another open file mid-read, once returned that file's pixels); a collected slide closes its
    descriptor (open_cached's evictions and dropped slides leaked one each)."""
    import gc

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    path = aio.write_pyramid(tmp_path / "a.tif", image, tile=64, compression="none")
    other = aio.write_pyramid(tmp_path / "b.tif", 255 - image, tile=64, compression="none")
    slide = aio.open_slide(path, cache_bytes=0, threads=2)
    offsets = np.array([[0, 0], [100, 120], [190, 64]])
    want = np.stack([image[r:r + 64, c:c + 64] for r, c in offsets])
    stop, wrong, failures = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                if not np.array_equal(slide.read_patches(offsets, 64), want):
                    wrong.append(1)
            except Exception as error:  # noqa: BLE001 (any failure is counted)
                failures.append(repr(error))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for _ in range(300):
        slide.close()
        fd = os.open(other, os.O_RDONLY)
        os.close(fd)
    stop.set()
    for thread in readers:
        thread.join()
    assert not wrong and not failures, (len(wrong), failures[:3])

    if not os.path.isdir("/proc/self/fd"):
        return
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        dropped = aio.open_slide(path)
        dropped.read_patches(offsets, 8)
        del dropped
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before <= 1


@pytest.mark.parametrize("layout", ["tiff", "ome", "subifds", "svs"])
def test_write_pyramid_keeps_any_number_of_channels(tmp_path, layout):
    """2, 4 or 5 channels in lossless codecs (tifffile read (H, W, C) as H planes of (W, C) without a contiguous
    planar configuration: "tile is too large" or a negative index)."""
    rng = np.random.default_rng(1)
    for channels in (2, 4, 5):
        image = rng.integers(0, 60000, (72, 40, channels), dtype=np.uint16)
        path = aio.write_pyramid(tmp_path / f"c{channels}.tif", image, tile=16, compression="zstd", layout=layout)
        slide = aio.open_slide(path)
        assert np.array_equal(slide.read_level(0), image), (layout, channels)
        assert slide.levels[1].shape == (36, 20, channels)


def test_write_pyramid_refuses_what_it_would_write_wrong(tmp_path):
    """JPEG holds uint8 images of 1 or 3 channels (tifffile wrote uint16 as 12-bit JPEG: values over 4095 lost);
    factors are the level ratios readers recognize (a factor of 8 gave a file open_slide saw as one level); a
    narrow image's pyramid stops before a 1-pixel side, so every written level is found."""
    u16 = np.random.default_rng(0).integers(0, 60000, (128, 128, 3), dtype=np.uint16)
    with pytest.raises(ValueError, match="compression='jpeg' holds uint8 images of 1 or 3 channels, got uint16"):
        aio.write_pyramid(tmp_path / "u.tif", u16, tile=64)
    with pytest.raises(ValueError, match="got uint8 with 4 channels"):
        aio.write_pyramid(tmp_path / "rgba.tif", np.zeros((128, 128, 4), np.uint8), tile=64)
    path = aio.write_pyramid(tmp_path / "u.tif", u16, tile=64, compression="zstd")
    assert np.array_equal(aio.open_slide(path).read_level(0), u16)
    with pytest.raises(ValueError, match=r"factor must be one of \(2, 3, 4\)"):
        aio.write_pyramid(tmp_path / "f8.tif", np.zeros((512, 512), np.uint8), tile=64, factor=8)
    for shape, factor in [((1006, 6), 2), ((1150, 79), 4), ((700, 3), 2)]:
        path = aio.write_pyramid(tmp_path / "narrow.tif", np.zeros(shape, np.uint8), tile=16, factor=factor,
                                 compression="none")
        levels = [level.shape[:2] for level in aio.open_slide(path, require_pyramid=False).levels]
        want = [shape]
        while max(want[-1]) > 16 and min(-(-s // factor) for s in want[-1]) >= 2:
            want.append(tuple(-(-s // factor) for s in want[-1]))
        assert levels == want, (shape, factor)


def test_offsets_past_int64_read_as_fill(jpeg_slide):
    """uint64 offsets past 2**63 (and huge float offsets) are far outside the level: all fill (a cast wrapped
    2**64 - 1 round to -1, the slide's corner)."""
    slide = aio.open_slide(jpeg_slide)
    for offsets in (np.array([[2**64 - 1, 0], [0, 2**63]], np.uint64), np.array([[1e30, 0.0], [-1e30, 0.0]])):
        assert np.all(slide.read_patches(offsets, 4, fill=7) == 7)
