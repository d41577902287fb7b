"""The GPU patch kernels' host side, on the CPU: launch plans, argument packing and NumPy emulations of the
kernels (tests/gpu_emulation.py) against the reference. The CUDA code itself runs in the ``gpu`` tests."""

from __future__ import annotations

import re
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atskern
from atskern import _validation as v
from atskern import reference
from atskern.gpu import patches as gp

from . import gpu_emulation as emu

OFFSET_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def layout_of(x_shape, k, patch, channels_first=False):
    x = np.zeros(x_shape, np.uint8)
    layout, _ = v.check_gather(x, np.zeros((x_shape[0], k, len(x_shape) - 2), np.int32), patch, 0, channels_first, None)
    return layout


def test_geometry_pads_dims_and_folds_channels():
    assert gp.geometry(layout_of((2, 13, 17, 3), 5, (4, 6))) == gp.Geometry(5, 1, 1, 4, 6, 3, 1, 13, 17, 2)
    g = gp.geometry(layout_of((2, 3, 13, 17), 5, (4, 6), channels_first=True))
    assert g == gp.Geometry(5, 3, 1, 4, 6, 1, 1, 13, 17, 2)
    g = gp.geometry(layout_of((1, 5, 7, 9, 2), 4, (3, 2, 4)))
    assert (g.p0, g.p1, g.p2, g.s0, g.s1, g.s2, g.width, g.image_width, g.dims) == (3, 2, 4, 5, 7, 9, 8, 18, 3)
    assert gp.geometry(layout_of((1, 23, 2), 4, (6,)))[2:] == (1, 1, 6, 2, 1, 1, 23, 1)
    args = g.args()
    assert args == tuple(g) and all(type(a) is int for a in args)  # plain integers: atskern.gpu._launch packs them


@pytest.mark.parametrize("dtype", OFFSET_DTYPES)
def test_offset_args_pass_dtype_code_and_byte_strides(dtype):
    base = np.zeros((3, 4, 2, 5), dtype)
    offsets = base[:, ::-1, :, 2].transpose(0, 1, 2)  # reversed, strided: passed as is
    array, sb, sk, sd, kind = gp.offset_args(offsets)
    assert array is offsets
    assert (int(sb), int(sk), int(sd)) == offsets.strides and int(sk) < 0
    assert emu._INT_DTYPES[int(kind)] == np.dtype(dtype)


@pytest.mark.parametrize("dtype, fill", [(np.uint8, 7), (np.int16, -2), (np.float16, -1.5), (np.float32, np.pi),
                                         (np.float64, -0.0), (np.int64, -1), (ml_dtypes.bfloat16, 3.25),
                                         (np.complex64, 1 - 2j)])
def test_fill_bits_truncate_to_the_fill(dtype, fill):
    value = v.check_fill(fill, np.dtype(dtype))
    bits = int(gp.fill_bits(value))
    size = np.dtype(dtype).itemsize
    assert bits < 2 ** (8 * size)  # the kernel's (T)fill_bits keeps exactly the low bytes
    assert bits.to_bytes(size, "little") == value.tobytes()


def test_index_suffix():
    assert gp.index_suffix(10, 2**31 - 2) == "i32"
    assert gp.index_suffix(2**31 - 1) == "i64"
    assert gp.index_suffix(2**31 - 100, headroom=100) == "i64"


@pytest.mark.parametrize("x_shape, k, patch, cf", [((8, 2048, 2048, 3), 64, 32, False), ((8, 1, 1500, 1500), 10, 50, True),
                                                   ((2, 9, 1), 3, 1, False), ((1, 3, 40000), 2, 40000, True)])
@pytest.mark.parametrize("threads", [32, 256])
def test_gather_plan(x_shape, k, patch, cf, threads):
    layout = layout_of(x_shape, k, patch, cf)
    g = gp.geometry(layout)
    plan = gp.gather_plan(layout, 4, threads)
    units, lanes = int(plan.args[0]), 1 << int(plan.tail[0])
    unit_rows, slots = int(plan.tail[1]), int(plan.tail[2])
    assert 1 <= unit_rows <= min(g.p1, gp.GATHER_UNIT_ROWS)
    assert units == layout.batch * k * g.rows * g.p0 * -(-g.p1 // unit_rows), "every row in one unit"
    assert lanes <= min(32, threads) and threads % lanes == 0
    assert lanes * slots * 16 >= g.width * 4 + 16, "enough lane slots for every 16-byte chunk of a row"
    assert lanes == 32 or slots == 1
    assert plan.grid[0] * (threads // lanes) >= units or plan.grid[0] == gp.MAX_BLOCKS
    assert plan.block == (threads,) and plan.kernel == "gather_u32_i32"
    assert gp.gather_plan(layout_of((40, 2**14, 2**14, 1), 1, 1), 1, 256).kernel == "gather_u8_i64"


@pytest.mark.parametrize("s1, width", [(1, 23), (1, 10**6), (2048, 6144), (3, 5), (5000, 7), (40, 150)])
@pytest.mark.parametrize("pixels", [1, 4, 16])
def test_scatter_tiles(s1, width, pixels):
    tile_h, tile_w = gp.scatter_tile(s1, width, pixels)
    assert tile_h * tile_w == pixels * gp.SCATTER_THREADS
    assert tile_w & (tile_w - 1) == 0 and tile_w >= 32
    if s1 >= tile_h and width >= tile_w:
        assert tile_w == 256 or tile_h == 1 or tile_w == pixels * gp.SCATTER_THREADS
    if s1 == 1:
        assert tile_w >= min(pixels * gp.SCATTER_THREADS, width), "1-D images: no idle rows"


def test_scatter_plan_checks_its_tuning():
    layout = layout_of((1, 9, 9, 1), 2, 3)
    with pytest.raises(ValueError, match="pixels must be a power of two"):
        gp.scatter_plan(layout, pixels=3)
    with pytest.raises(ValueError, match="chunk in 1..256"):
        gp.scatter_plan(layout, chunk=0)
    plan = gp.scatter_plan(layout_of((8, 2048, 2048, 3), 512, 32))
    assert plan.block == (256,) and plan.kernel == "{float}_i32"
    tiles, tiles_w, tiles_h = (int(a) for a in plan.args[10:13])
    assert tiles == 8 * tiles_w * tiles_h and tiles_w * 256 >= 6144 and tiles_h * 16 >= 2048
    assert plan.grid == (min(gp.SCATTER_BLOCKS, tiles),), "blocks take contiguous tile ranges"
    assert gp.scatter_plan(layout_of((1, 9, 9, 1), 2, 3)).grid == (1,)


def _random_case(rng, ndim, channels_first, offsets_dtype=np.int32, max_count=3):
    spatial = tuple(int(s) for s in rng.integers(1, 12, ndim))
    patch = tuple(int(p) for p in rng.integers(1, 7, ndim))
    batch, channels = (int(c) for c in rng.integers(1, 4, 2))
    count = int(rng.integers(1, max_count + 1))
    shape = (batch, channels) + spatial if channels_first else (batch,) + spatial + (channels,)
    offsets = np.stack([rng.integers(-p - 2, s + 2, (batch, count)) for s, p in zip(spatial, patch)], axis=-1)
    return shape, patch, offsets.astype(offsets_dtype)


@pytest.mark.parametrize("channels_first", [False, True], ids=["last", "first"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_emulated_gather_equals_reference(dtype, ndim, channels_first):
    rng = np.random.default_rng(ndim * 10 + channels_first)
    for trial in range(3):
        shape, patch, offsets = _random_case(rng, ndim, channels_first, OFFSET_DTYPES[trial * 3 % 8])
        offsets = offsets.astype(np.int64)[:, ::-1].astype(offsets.dtype) if trial == 1 else offsets
        x = rng.integers(0, 200, shape).astype(dtype)
        layout, fill = v.check_gather(x, offsets, patch, 5, channels_first, None)
        expected = reference.extract_patches(x, offsets, patch, fill=5, channels_first=channels_first)
        for x_address, out_address in [(0x1000, 0x2000), (0x1000 + 8, 0x2000 + 8 * trial), (0x1008, 0x2000)]:
            item = np.dtype(dtype).itemsize
            got = emu.gather(x, offsets, layout, fill, x_address=x_address // item * item,
                             out_address=out_address // item * item, threads=32)
            assert np.array_equal(got.view(f"u{item}"), expected.view(f"u{item}"))


def test_emulated_gather_unaligned_byte_runs():
    """Every source/destination alignment pair of the 16-byte path, on long uint8 rows."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (1, 3, 100, 1)).astype(np.uint8)
    offsets = np.array([[[0, 3], [1, -5], [2, 60], [1, 17]]], np.int16)
    layout, fill = v.check_gather(x, offsets, (2, 45), 9, False, None)
    expected = reference.extract_patches(x, offsets, (2, 45), fill=9)
    for shift_x in range(16):
        for shift_out in (0, 5, 11):
            got = emu.gather(x, offsets, layout, fill, x_address=0x100 + shift_x, out_address=0x400 + shift_out)
            assert np.array_equal(got, expected), (shift_x, shift_out)


def test_emulated_gather_huge_offsets_of_every_dtype():
    x = np.arange(2 * 13 * 17, dtype=np.float32).reshape(1, 13, 17, 2)
    for dtype in OFFSET_DTYPES:
        info = np.iinfo(dtype)
        offsets = np.array([[[info.min, info.max], [info.max, 3], [2, info.min], [1, 2]]], dtype=dtype)
        layout, fill = v.check_gather(x, offsets, (4, 5), 0, False, None)
        got = emu.gather(x, offsets, layout, fill)
        assert np.array_equal(got, reference.extract_patches(x, offsets, (4, 5))), dtype


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), ndim=st.integers(1, 3), channels_first=st.booleans(),
       pixels=st.sampled_from([1, 2, 16]), chunk=st.sampled_from([1, 3, 256]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_emulated_scatter_is_bitwise_the_cpu_kernel(seed, ndim, channels_first, pixels, chunk, dtype):
    """Same sums in the same order as the CPU kernel, each element written once, for any tiling and chunking."""
    rng = np.random.default_rng(seed)
    shape, patch, offsets = _random_case(rng, ndim, channels_first, OFFSET_DTYPES[seed % 8], max_count=12)
    spatial = shape[2:] if channels_first else shape[1:-1]
    channels = shape[1] if channels_first else shape[-1]
    grad_shape = (shape[0], offsets.shape[1]) + ((channels,) + patch if channels_first else patch + (channels,))
    grad = rng.standard_normal(grad_shape).astype(dtype)
    layout, _ = v.check_scatter(grad, offsets, spatial, channels_first, None)
    expected = atskern.scatter_patches(grad, offsets, spatial, channels_first=channels_first)
    got = emu.scatter(grad, offsets, layout, pixels=pixels, chunk=chunk)
    assert np.array_equal(got.view(f"u{grad.itemsize}"), expected.view(f"u{grad.itemsize}"))


# --- sampling launch plans (atskern.gpu.sampling) ---------------------------------------------


def test_sampling_plan_selects_up_to_2048_in_shared_memory():
    """n <= MAX_SELECTION_N is selected in shared memory at every block size; beyond it every key is sorted;
    block sizes other than the compiled ones are refused."""
    from atskern.gpu import sampling as gs

    assert gs.max_selection_n() == gs.MAX_SELECTION_N == 2048
    for threads in gs.SELECT_THREADS:
        assert gs.selection_capacity(threads) * 12 <= 48 * 1024  # 8-byte key bits + 4-byte values per entry
        small = gs.plan(2, 10_000, 2048, False, threads, multiprocessors=132)
        assert not small.sort and small.threads == threads
        assert gs.compile_options(threads)[0] == f"-DATS_SELECT_THREADS={threads}"
    assert gs.plan(2, 10_000, 2049, False, 256, multiprocessors=132).sort
    replace = gs.plan(2, 10_000, 5000, True, 256, multiprocessors=132)
    assert not replace.sort and replace.threads == 256
    with pytest.raises(ValueError, match="threads must be one of"):
        gs.plan(2, 10_000, 10, False, 512, multiprocessors=132)


def test_sampling_plan_keeps_chunk_positions_and_slots_in_32_bits():
    from atskern.gpu import sampling as gs

    huge = gs.plan(1, 2**33, 10, False, 256, multiprocessors=132)
    assert huge.chunk < gs.MAX_SLOTS and huge.chunk % (gs.PER_THREAD * 256) == 0
    many = gs.plan(1, 2**40, 2048, False, 256, multiprocessors=1, chunk=gs.MIN_CHUNK)
    assert many.nchunks * 2048 < gs.MAX_SLOTS and many.chunk % (gs.PER_THREAD * 256) == 0
    # the streaming loops' 32-bit offsets stay below 2^31 however far a thread steps past the chunk's end:
    # 4 positions x 512 threads x 8 unrolled tiles (the largest block and knob values) from a chunk's last offset
    rows_of_huge_chunks = gs.plan(10_000, 2**31, 10, False, 256, multiprocessors=132)
    assert rows_of_huge_chunks.chunk <= gs.MAX_CHUNK
    assert gs.MAX_CHUNK - 1 + gs.PER_THREAD * 512 * 8 < 2**31


def test_sampling_chunks_fill_the_device_in_whole_tiles():
    from atskern.gpu import sampling as gs

    for rows, size, threads in [(1, 4096 * 4096, 256), (32, 1024 * 1024, 256), (256, 256 * 256, 128), (1, 10, 32)]:
        chunk = gs.chunk_size(rows, size, threads, multiprocessors=132)
        assert chunk % (gs.PER_THREAD * threads) == 0 and chunk >= gs.MIN_CHUNK
        nchunks = -(-size // chunk)
        assert nchunks == 1 or rows * nchunks <= 2 * gs.BLOCKS_PER_SM * 132


def test_sampling_chunks_never_spill_into_a_second_wave():
    """Rows cut into pieces take at most one wave of resident blocks: 32 rows of 1024² on 132 SMs had 9 pieces a
    row, 288 blocks for 264 slots, and the last 24 blocks doubled the time on the H100."""
    from atskern.gpu import sampling as gs

    slots = gs.BLOCKS_PER_SM * 132
    for rows in (1, 7, 32, 100, 131, 264):
        nchunks = -(-1024 * 1024 // gs.chunk_size(rows, 1024 * 1024, 256, multiprocessors=132))
        assert rows * nchunks <= slots, rows
        assert rows * (nchunks + 1) > slots or nchunks * gs.MIN_CHUNK >= 1024 * 1024  # and no fewer pieces than fit
    assert -(-1024 * 1024 // gs.chunk_size(32, 1024 * 1024, 256, multiprocessors=132)) == 8


def sampling_step_names(dtype, n, replace, logits):
    """The steps of a sampling call on 3 rows of 5000 weights: kernel names, ``ZERO_STEP`` and ``SORT_STEP``."""
    from atskern.gpu import sampling as gs

    weights = np.zeros((3, 5000), dtype)
    p = gs.plan(3, 5000, n, replace, 256, multiprocessors=4, chunk=1024)
    ws = gs.workspace(np.empty, 3, 5000, n, p, replace, logits)
    steps = gs.launches(weights, n, (50, 100), 1, replace, logits, ws, p, np.empty((3, n, 2), np.int32),
                        np.empty((3, n)))
    return [s if s in (gs.SORT_STEP, gs.ZERO_STEP) else s[0] for s in steps]


def _kernels_defined(tmp_path, group: int) -> set:
    """The kernels sampling.cu defines with ``-DATS_GROUP=group``, from its preprocessed text (nvcc -E)."""
    from atskern.gpu import sampling as gs
    from atskern.gpu._module import source

    inlined = tmp_path / "sampling.cu"
    inlined.write_text(source("sampling.cu"))
    result = subprocess.run(["nvcc", "-E", "--std=c++17", *gs.compile_options(256), f"-DATS_GROUP={group}",
                             str(inlined), "-o", str(tmp_path / f"group{group}.ii")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / f"group{group}.ii").read_text()
    return set(re.findall(r'extern "C" __attribute__\(\(global\)\) void '
                          r'(?:__attribute__\(\(\w+\(.*?\)\)\)\s*)*(\w+)\s*\(', text))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_every_launched_kernel_is_in_the_module_of_its_group(tmp_path, monkeypatch):
    """A call compiles only the module of each kernel's group (``kernel_group``: one dtype's kernels, select_rows,
    sample_rows and sample_cluster_rows apart): every kernel of every path (float32/float64, logits, with
    replacement, the sort fallback, the four finishes) is defined in its group's module, the groups split the
    default module's kernels without overlap, and each group holds a kernel some path launches."""
    from atskern.gpu import sampling as gs

    defined = {group: _kernels_defined(tmp_path, group) for group in range(9)}
    assert len(defined[0]) == 18, defined[0]
    launched = set()
    for fused, whole, cluster in ((False, 0, 0), (True, 0, 0), (False, 1 << 30, 0), (False, 1 << 30, 4)):
        monkeypatch.setattr(gs, "FUSED_FINISH", fused)
        monkeypatch.setattr(gs, "WHOLE_ROWS", whole)
        monkeypatch.setattr(gs, "ROW_CLUSTER", cluster)
        for dtype in (np.float32, np.float64):
            for n in (10, 2049):
                for replace in (False, True):
                    for logits in (False, True):
                        launched |= set(sampling_step_names(dtype, n, replace, logits)) - {gs.ZERO_STEP, gs.SORT_STEP}
    for name in sorted(launched):
        assert name in defined[gs.kernel_group(name)], (name, gs.kernel_group(name))
    groups = [defined[group] for group in range(1, 9)]
    assert set().union(*groups) == defined[0]
    assert sum(len(group) for group in groups) == len(defined[0])
    assert all(group & launched for group in groups)
    with pytest.raises(ValueError, match="not a kernel"):
        gs.kernel_group("gather_u8_i32")


def test_sampling_launch_sequence(monkeypatch):
    """The launches of each path, in order, and their work space: the statistics (with each row's plan), the
    screening or selecting pass, the rescaling passes only for float64 (and logits), the sort fallback, the
    block-per-draw scan with replacement; the summary row is written by the first finish_rows (no launch of its
    own). Rows sampled by the chunked plan (WHOLE_ROWS off)."""
    from atskern.gpu import sampling as gs

    monkeypatch.setattr(gs, "WHOLE_ROWS", 0)

    names = sampling_step_names
    assert names(np.float32, 10, False, False) == [gs.ZERO_STEP, "chunk_stats_f32", "chunk_topn_f32", "finish_rows_f32"]
    assert names(np.float64, 10, False, False) == [gs.ZERO_STEP, "chunk_stats_f64", "chunk_topn_f64", "finish_rows_f64",
                                                   "chunk_stats_f64", "chunk_topn_f64", "finish_rows_f64"]
    assert names(np.float32, 10, False, True)[:4] == [gs.ZERO_STEP, "row_max_f32", "chunk_stats_f32", "chunk_topn_f32"]
    assert names(np.float32, 10, True, False) == [gs.ZERO_STEP, "chunk_stats_f32", "finish_rows_f32",
                                                  "replacement_draws_f32"]
    assert names(np.float64, 10, True, False) == [gs.ZERO_STEP, "chunk_stats_f64", "finish_rows_f64", "chunk_stats_f64",
                                                  "replacement_draws_f64"]
    assert gs.SORT_STEP not in names(np.float32, 2048, False, False)
    assert gs.SORT_STEP in names(np.float32, 2049, False, False)


def test_whole_rows_plan_and_launch_sequence(monkeypatch):
    """Rows of at most ``WHOLE_ROWS`` positions, without replacement and with n up to MAX_SELECTION_N, are one
    ``sample_rows`` launch (a block per row), after the memset of the count that elects the summary's block, or
    alone for one row (nothing to zero); its work space holds no statistics, counters, plans or candidate lists,
    and logits need no row_max launch."""
    from atskern.gpu import sampling as gs

    monkeypatch.setattr(gs, "WHOLE_ROWS", 5000)
    assert names_whole(3, np.float64, 10, False, True) == [gs.ZERO_STEP, "sample_rows_f64"]
    assert names_whole(1, np.float32, 10, False, False) == ["sample_rows_f32"]
    assert names_whole(3, np.float32, 2048, False, False)[1] == "chunk_stats_f32"  # no screening buffer at n
    monkeypatch.setattr(gs, "WHOLE_ROWS_UNSCREENED", True)
    assert names_whole(3, np.float32, 2048, False, False) == [gs.ZERO_STEP, "sample_rows_f32"]
    assert gs.SORT_STEP in names_whole(3, np.float32, 2049, False, False)  # n too large: every key sorted
    assert "replacement_draws_f32" in names_whole(3, np.float32, 10, True, False)
    p = gs.plan(3, 5000, 10, False, 256, multiprocessors=4, chunk=1024)
    assert p.whole_rows and p.nchunks == 1 and p.capacity == gs.screen_capacity(10, 5000, 256) and not p.fused
    specs = gs.workspace_specs(3, 5000, 10, p, False, True)
    assert {name for name, spec in specs.items() if spec is not None} == {"row_bound", "status", "screen_keys",
                                                                           "screen_idx"}
    assert not gs.plan(3, 5001, 10, False, 256, multiprocessors=4).whole_rows  # a longer row: chunks
    assert gs.plan(3, 5001, 10, False, 256, multiprocessors=4, whole_rows=True).whole_rows
    assert not gs.plan(3, 100, 10, False, 256, multiprocessors=4, whole_rows=False).whole_rows
    assert not gs.plan(1, gs.MAX_CHUNK, 10, False, 256, multiprocessors=4, whole_rows=True).whole_rows  # 2^31: chunks
    monkeypatch.setattr(gs, "WHOLE_ROWS", 0)  # off, the filled rule too
    assert not gs.plan(1, 1, 1, False, 256, multiprocessors=4).whole_rows
    assert not gs.plan(8, 1, 1, False, 256, multiprocessors=4).whole_rows


def test_whole_rows_defaults_follow_the_row_size_and_count(monkeypatch):
    """The default rule: rows up to WHOLE_ROWS positions always go whole; up to WHOLE_ROWS_FILLED only with at
    least one row per multiprocessor; only where n leaves a screening buffer (asked for, up to MAX_SELECTION_N);
    never with replacement or a sorted n."""
    from atskern.gpu import sampling as gs

    monkeypatch.setattr(gs, "WHOLE_ROWS", 1000)
    monkeypatch.setattr(gs, "WHOLE_ROWS_FILLED", 4000)

    def whole(rows, size, n=10, replace=False):
        return gs.plan(rows, size, n, replace, 256, multiprocessors=8).whole_rows

    assert whole(1, 1000) and whole(7, 1000) and not whole(1, 1001) and not whole(7, 1001)
    assert whole(8, 1001) and whole(8, 4000) and whole(100, 4000) and not whole(8, 4001) and not whole(7, 4000)
    assert not whole(1, 1000, replace=True) and not whole(8, 4000, n=gs.MAX_SELECTION_N + 1)
    screened = max(n for n in range(1, gs.MAX_SELECTION_N + 1) if gs.screen_capacity(n, 1000, 256))
    assert 1000 < screened < gs.MAX_SELECTION_N
    assert whole(1, 1000, n=screened) and not whole(1, 1000, n=screened + 1) and not whole(100, 4000, n=screened + 1)
    monkeypatch.setattr(gs, "WHOLE_ROWS_UNSCREENED", True)
    assert whole(1, 1000, n=screened + 1) and whole(100, 4000, n=gs.MAX_SELECTION_N)
    assert not whole(1, 1000, n=gs.MAX_SELECTION_N + 1)
    assert gs.plan(1, 1000, gs.MAX_SELECTION_N, False, 256, multiprocessors=8, whole_rows=True).whole_rows


def test_row_cluster_plan_and_launch(monkeypatch):
    """ROW_CLUSTER: a whole-row plan splits each row into that many spans (whole tiles, the last ones possibly
    empty), one block each, launched as rows x cluster blocks of one sample_cluster_rows launch (no memset for one
    row) with the cluster's work space (partial statistics of two passes and logit maxima, the screened counts);
    larger than a portable cluster is refused; off by default."""
    from atskern.gpu import sampling as gs

    assert gs.ROW_CLUSTER == 0 and gs.plan(1, 5000, 10, False, 256, 4, whole_rows=True).row_cluster == 0
    monkeypatch.setattr(gs, "ROW_CLUSTER", 4)
    p = gs.plan(3, 5000, 10, False, 256, multiprocessors=4, whole_rows=True)
    tile = gs.PER_THREAD * 256
    assert p.whole_rows and p.row_cluster == 4 and p.nchunks == 4 and p.chunk % tile == 0
    assert p.chunk - tile < -(-5000 // 4) <= p.chunk and p.capacity == gs.screen_capacity(10, 5000, 256)
    assert gs.plan(1, 10, 3, False, 256, 4, whole_rows=True).chunk == tile  # spans 1-3 empty
    assert gs.plan(1, 5000, 10, False, 256, 4, whole_rows=True, row_cluster=0).row_cluster == 0
    assert gs.plan(1, 5000, 10, True, 256, 4, whole_rows=True).row_cluster == 0  # with replacement: chunks
    with pytest.raises(ValueError, match="row_cluster"):
        gs.plan(1, 5000, 10, False, 256, 4, whole_rows=True, row_cluster=gs.MAX_ROW_CLUSTER + 1)
    specs = gs.workspace_specs(3, 5000, 10, p, False, True)
    assert specs["cluster_stats"] == ((3 * 4 * (2 * gs.STATS + 1),), np.float64)
    assert specs["cluster_counts"] == ((3,), np.uint32) and specs["stats"] is None and specs["cand_keys"] is None
    for rows in (1, 3):
        q = gs.plan(rows, 5000, 10, False, 256, 4, whole_rows=True)
        ws = gs.workspace(np.empty, rows, 5000, 10, q, False, False)
        steps = gs.launches(np.zeros((rows, 5000), np.float32), 10, (50, 100), 1, False, False, ws, q,
                            np.empty((rows, 10, 2), np.int32), np.empty((rows, 10), np.float32))
        assert (steps[0] == gs.ZERO_STEP) == (rows > 1)
        name, grid, block, args = steps[-1]
        assert name == "sample_cluster_rows_f32" and grid == (rows * 4,) and block == (256,)
        assert args[13] == q.chunk  # span
    assert gs.compile_options(256, 4)[-1] == "-DATS_ROW_CLUSTER=4" and len(gs.compile_options(256)) == 3
    assert gs.kernel_group("sample_cluster_rows_f64") == 8


def names_whole(rows, dtype, n, replace, logits):
    """The steps of a sampling call on ``rows`` rows of 5000 weights (the plan of ``WHOLE_ROWS`` now)."""
    from atskern.gpu import sampling as gs

    weights = np.zeros((rows, 5000), dtype)
    p = gs.plan(rows, 5000, n, replace, 256, multiprocessors=4, chunk=1024)
    ws = gs.workspace(np.empty, rows, 5000, n, p, replace, logits)
    steps = gs.launches(weights, n, (50, 100), 1, replace, logits, ws, p, np.empty((rows, n, 2), np.int32),
                        np.empty((rows, n)))
    return [s if s in (gs.SORT_STEP, gs.ZERO_STEP) else s[0] for s in steps]
