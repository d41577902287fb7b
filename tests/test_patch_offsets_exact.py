"""Exact .5 ties in patch offsets (issue 11, item 9; rule R5): atskern, ats.ops and ats.torch agree with the
exact rational formula everywhere, receptive fields included."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

import atskern
from atskern import reference

from .conftest import to_backend, to_numpy


def oracle(cell, grid, level, patch, margin: Fraction) -> int:
    """``round(L (m + (s + 1/2) / G (1 - 2 m)) - P / 2)`` with rationals; Python rounds half to even."""
    centre = level * (margin + Fraction(2 * cell + 1, 2 * grid) * (1 - 2 * margin))
    return round(centre - Fraction(patch, 2))


def sweep():
    """(grid, level, patch, receptive_field, low) with many exact ties among them."""
    cases = []
    for grid, level, patch in itertools.product((1, 3, 8, 10, 25), (7, 50, 150, 1000), (1, 2, 5, 8, 50)):
        for receptive_field, low in ((0, 10), (3, 50), (5, 16), (2, 8), (7, 20)):
            if low >= grid:
                cases.append((grid, level, patch, receptive_field, low))
    return cases


CASES = sweep()


def expected_offsets(grid, level, patch, receptive_field, low):
    margin = Fraction(receptive_field, 2 * low)
    return np.array([oracle(s, grid, level, patch, margin) for s in range(grid)])


def test_sweep_has_ties_that_float64_misses():
    ties = missed = 0
    for grid, level, patch, rf, low in CASES:
        m = Fraction(rf, 2 * low)
        for s in range(grid):
            t = level * (m + Fraction(2 * s + 1, 2 * grid) * (1 - 2 * m)) - Fraction(patch, 2)
            if (2 * t).denominator == 1 and (2 * t).numerator % 2:
                ties += 1
                mf = rf / 2 / low
                missed += int(np.rint(level * (mf + (s + 0.5) / grid * (1 - 2 * mf)) - patch / 2)) != round(t)
    assert ties > 100 and missed > 10, (ties, missed)


def test_atskern_sweep(backend):
    for grid, level, patch, rf, low in CASES:
        samples = to_backend(np.arange(grid, dtype=np.int32).reshape(1, grid, 1), backend)
        want = expected_offsets(grid, level, patch, rf, low)
        for margin in ((rf, (low,)), Fraction(rf, 2 * low), rf / 2 / low):
            got = to_numpy(atskern.patch_offsets(samples, (grid,), (level,), (patch,), margin=margin)).ravel()
            assert got.tolist() == want.tolist(), (grid, level, patch, rf, low, margin)
        ref = reference.patch_offsets(to_numpy(samples), (grid,), (level,), (patch,), margin=(rf, (low,)))
        assert ref.ravel().tolist() == want.tolist()


def test_cells_outside_the_grid_round_their_ties_as_the_rational_formula():
    """Cells before and past the grid (any integer cell is accepted): the whole offset's parity breaks a tie
    (``s = -2, G = 15, L = 1105, P = 132`` gave -177 for -176.5, the parity of the fraction part's quotient),
    in atskern, ats.torch and ats.ops alike."""
    torch = pytest.importorskip("torch")
    from ats.torch import functional as F

    cases = CASES + [(15, 1105, 132, 0, 15), (1, 3, 2, 0, 1)]
    ties = 0
    for grid, level, patch, rf, low in cases:
        cells = np.arange(-2 * grid, 3 * grid).reshape(1, -1, 1)
        margin = Fraction(rf, 2 * low)
        want = [oracle(int(s), grid, level, patch, margin) for s in cells.ravel()]
        ties += sum((2 * (level * (margin + Fraction(2 * int(s) + 1, 2 * grid) * (1 - 2 * margin))
                          - Fraction(patch, 2))).denominator == 1 for s in cells.ravel() if not 0 <= s < grid)
        got = atskern.patch_offsets(cells, (grid,), (level,), (patch,), margin=(rf, (low,)))
        assert got.ravel().tolist() == want, (grid, level, patch, rf, low)
        got = F.patch_offsets(torch.from_numpy(cells), (grid,), (level,), (patch,), margin=(rf, (low,)))
        assert got.ravel().tolist() == want, (grid, level, patch, rf, low)
    assert ties > 100, ties
    tf = pytest.importorskip("tensorflow")
    from ats import ops

    for grid, level, patch, rf, low in cases[-2:] + cases[:-2:40]:
        cells = np.arange(-2 * grid, 3 * grid, dtype=np.int32).reshape(1, -1, 1)
        want = [oracle(int(s), grid, level, patch, Fraction(rf, 2 * low)) for s in cells.ravel()]
        got = ops.patch_offsets(tf.constant(cells), (grid,), (level,), (patch,), margin=(rf, (low,)))
        assert got.numpy().ravel().tolist() == want, (grid, level, patch, rf, low)


def test_issue_reproduction_and_worked_examples():
    assert atskern.patch_offsets(np.array([[[3]]]), [50], [150], [8]).tolist() == [[[6]]]
    for grid, cell, start in [(25, 12, 475), (25, 0, -5), (100, 0, -20)]:
        assert atskern.patch_offsets(np.array([[[cell]]]), (grid,), (1000,), 50).tolist() == [[[start]]]


def test_margin_forms_and_errors():
    samples = np.array([[[3, 1]]])
    pair = atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=(3, (8, 8)))
    per_dim = atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=[Fraction(3, 16), 3 / 16])
    assert pair.tolist() == per_dim.tolist() == [[[44, 21]]]
    with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\)"):
        atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=0.7)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\)"):
        atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=(8, (8, 8)))
    with pytest.raises(ValueError, match=r"margin must be a number, 2 numbers"):
        atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=[0.1, 0.1, 0.1])
    with pytest.raises(TypeError, match=r"margin must be a real number"):
        atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin="0.1")
    with pytest.raises(ValueError, match=r"margin's low_shape must have 2 entries"):
        atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=(3, (8,)))


def test_huge_denominators_stay_exact():
    """A float margin that is no small fraction: exact in Python ints, still the rational formula."""
    margin = 0.1 + 1e-12
    samples = np.arange(7).reshape(1, 7, 1)
    got = atskern.patch_offsets(samples, (7,), (1001,), (3,), margin=margin).ravel().tolist()
    assert got == [oracle(s, 7, 1001, 3, Fraction(margin)) for s in range(7)]


def test_tensorflow_sweep():
    tf = pytest.importorskip("tensorflow")
    from ats import ops

    assert ops.patch_offsets(tf.constant([[[3]]]), [50], [150], [8]).numpy().tolist() == [[[6]]]
    for grid, level, patch, rf, low in CASES[::3]:
        samples = tf.reshape(tf.range(grid, dtype=tf.int32), (1, grid, 1))
        want = expected_offsets(grid, level, patch, rf, low).tolist()
        got = ops.patch_offsets(samples, (grid,), (level,), (patch,), margin=(rf, (low,)))
        assert got.numpy().ravel().tolist() == want, (grid, level, patch, rf, low)
        dynamic = ops.patch_offsets(samples, tf.constant([grid]), tf.constant([level]), patch,
                                    margin=(rf, tf.constant([low])))
        assert dynamic.numpy().ravel().tolist() == want
    with pytest.raises(TypeError, match=r"samples must be an integer tensor"):
        ops.patch_offsets(tf.constant([[[3.0]]]), [50], [150], [8])
    with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\)"):
        ops.patch_offsets(tf.constant([[[3]]]), [50], [150], [8], margin=0.7)



def test_xla_front_ends_take_the_receptive_field_pair():
    """``margin=(receptive_field, low_shape)``, the layers' form, which atskern, ats.torch and ats.ops take: ats.jax
    and ats.tf.xla refused it ("margin must be in [0, 0.5), got (3, (5, 7))", reading the 3 as a margin)."""
    tf = pytest.importorskip("tensorflow")
    jnp = pytest.importorskip("jax.numpy")
    from ats import jax as aj
    from ats.tf import xla

    for grid, level, patch, rf, low in CASES[::2]:
        samples = np.arange(grid, dtype=np.int32).reshape(1, grid, 1)
        want = expected_offsets(grid, level, patch, rf, low).tolist()
        for offsets in (aj.patch_offsets(jnp.asarray(samples), (grid,), (level,), (patch,), margin=(rf, (low,))),
                        xla.patch_offsets(tf.constant(samples), (grid,), (level,), (patch,), margin=(rf, [low]))):
            assert np.asarray(offsets).ravel().tolist() == want, (grid, level, patch, rf, low)
    samples = np.array([[[2, 3], [0, 6]]], np.int32)
    image = np.arange(40 * 56 * 2, dtype=np.float32).reshape(1, 40, 56, 2)
    want = atskern.extract_multiscale([image], samples, (5, 7), [(8, 8)], margin=(3, (5, 7)))[0]
    for got in (aj.extract_multiscale([jnp.asarray(image)], jnp.asarray(samples), (5, 7), [(8, 8)], margin=(3, (5, 7))),
                xla.extract_multiscale([tf.constant(image)], tf.constant(samples), (5, 7), [(8, 8)], margin=(3, (5, 7)))):
        np.testing.assert_array_equal(np.asarray(got[0]), want)
    for bad in ((-1, (5, 7)), (3, (5,)), (30, (5, 7))):
        with pytest.raises(ValueError, match="margin"):
            aj.patch_offsets(jnp.asarray(samples), (5, 7), (40, 56), (8, 8), margin=bad)

def test_tensorflow_dynamic_low_shape_in_a_graph():
    tf = pytest.importorskip("tensorflow")
    from ats import ops

    @tf.function(input_signature=[tf.TensorSpec([None, None, 2], tf.int32), tf.TensorSpec([None, None, None], tf.float32)])
    def offsets(samples, low):
        spatial = tf.shape(low)[1:]
        return ops.patch_offsets(samples, (8, 8), (150, 150), (50, 50), margin=(3, spatial))

    assert offsets(tf.constant([[[3, 1]]]), tf.zeros((1, 8, 8))).numpy().tolist() == [[[44, 21]]]


def test_torch_sweep():
    torch = pytest.importorskip("torch")
    from ats.torch import functional as F

    assert F.patch_offsets(torch.tensor([[[3]]]), [50], [150], [8]).tolist() == [[[6]]]
    for grid, level, patch, rf, low in CASES:
        samples = torch.arange(grid).reshape(1, grid, 1)
        want = expected_offsets(grid, level, patch, rf, low).tolist()
        for margin in ((rf, (low,)), rf / 2 / low):
            got = F.patch_offsets(samples, (grid,), (level,), (patch,), margin=margin)
            assert got.ravel().tolist() == want, (grid, level, patch, rf, low, margin)
    with pytest.raises(TypeError, match=r"samples must be an integer tensor"):
        F.patch_offsets(torch.tensor([[[3.0]]]), [50], [150], [8])
    with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\)"):
        F.patch_offsets(torch.tensor([[[3]]]), [50], [150], [8], margin=0.7)
    with pytest.raises(ValueError, match=r"samples must be \(batch, K, D\)"):
        F.patch_offsets(torch.tensor(3), [50], [150], [8])



def _torch_offset_cases(rng):
    """(samples (B, K, D) int64 NumPy, grid, level, patch, margin) over 1-3 dims and every margin form, cells in the
    grid."""
    cases = []
    for trial in range(60):
        dims = 1 + trial % 3
        grid = tuple(int(g) for g in rng.integers(1, 40, dims))
        level = tuple(int(v) for v in rng.integers(1, 3000, dims))
        patch = tuple(int(p) for p in rng.integers(1, 200, dims))
        margin = [0, Fraction(int(rng.integers(0, 50)), 101),
                  (int(rng.integers(0, 20)), tuple(int(v) for v in rng.integers(20, 60, dims)))][trial % 3]
        samples = np.stack([rng.integers(0, g, (2, 5)) for g in grid], axis=-1)
        cases.append((samples, grid, level, patch, margin))
    return cases


def test_torch_offset_lookup_equals_the_arithmetic():
    """Eager ats.torch offsets of cells in the grid come from cached per-dim tables (``sampled_offsets`` always,
    ``patch_offsets`` and ``extract_multiscale`` once CPU cells are checked): the same offsets as the arithmetic
    path and atskern for every integer dtype, and cells outside the grid still take the arithmetic."""
    torch = pytest.importorskip("torch")
    from ats.torch import functional as F

    lookups = []
    real_table = F._offset_table

    def counting_table(*args):
        lookups.append(args)
        return real_table(*args)

    rng = np.random.default_rng(7)
    for samples, grid, level, patch, margin in _torch_offset_cases(rng):
        want = atskern.patch_offsets(samples, grid, level, patch, margin=margin)
        outside = samples.copy()
        outside[0, 0, -1] = -2 * grid[-1] - 1
        outside[1, 4, 0] = grid[0] + 3
        want_outside = atskern.patch_offsets(outside, grid, level, patch, margin=margin)
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            cells = torch.from_numpy(samples).to(dtype)
            F._offset_table = counting_table
            try:
                sampled = F.sampled_offsets(cells, grid, level, patch, margin=margin)
                checked = F.patch_offsets(cells, grid, level, patch, margin=margin)
            finally:
                F._offset_table = real_table
            assert sampled.dtype == checked.dtype == torch.int32
            assert sampled.tolist() == checked.tolist() == want.tolist(), (grid, level, patch, margin, dtype)
            if dtype != torch.uint8:
                beyond = F.patch_offsets(torch.from_numpy(outside).to(dtype), grid, level, patch, margin=margin)
                assert beyond.tolist() == want_outside.tolist(), (grid, level, patch, margin, dtype)
        image = torch.zeros(2, 1, *level) if np.prod(level) <= 2**21 else None
        if image is not None:  # the multiscale patches of the looked-up int64 offsets against atskern's
            got = F.extract_multiscale([image + torch.arange(float(np.prod(level))).reshape(level)], torch.from_numpy(samples),
                                       grid, [patch], margin=margin)[0]
            ref = atskern.extract_multiscale([(image + torch.arange(float(np.prod(level))).reshape(level)).numpy()],
                                             samples, grid, [patch], margin=margin, channels_first=True)[0]
            assert np.array_equal(got.numpy(), ref)
    assert len(lookups) >= 60 * 4 * 2, len(lookups)  # the lookup path ran for every case and dtype


def test_torch_sampled_offsets_cost_one_op_per_dim():
    """An eager ``sampled_offsets`` call is one indexing op per dim and a stack (the exact arithmetic is about
    twenty torch ops per dim, each a kernel launch with its host time on a GPU); ``patch_offsets`` adds the
    check of the CPU cells."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    from ats.torch import functional as F

    class TensorOps(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.count += isinstance(out, torch.Tensor)
            return out

    cells = torch.randint(0, 30, (8, 10, 2))
    counts = {}
    for name in ("sampled_offsets", "patch_offsets"):
        getattr(F, name)(cells, (30, 30), (256, 256), (16, 16))  # the tables are made on the first call
        with TensorOps() as ops:
            getattr(F, name)(cells, (30, 30), (256, 256), (16, 16))
        counts[name] = ops.count
    assert counts == {"sampled_offsets": 5, "patch_offsets": 7}, counts

def test_uint64_samples_clamp_instead_of_wrapping():
    """uint64 cells past 2**63 clamp to the far end like the reference (a cast first wrapped them to negatives)."""
    samples = np.array([[[2**64 - 1], [2**63], [2**31 + 5], [3]]], dtype=np.uint64)
    got = atskern.patch_offsets(samples, (7,), (1000,), 10)
    want = reference.patch_offsets(samples, (7,), (1000,), 10)
    assert got.tolist() == want.tolist()
    assert got[0, :3, 0].tolist() == [2**31 - 1] * 3 and got[0, 3, 0] == oracle(3, 7, 1000, 10, Fraction(0))
    image = np.arange(1000.0).reshape(1, 1000, 1)
    (patches,) = atskern.extract_multiscale([image], samples, (7,), [10], fill=-1.0)
    assert np.all(patches[0, :3] == -1.0)  # clamped past the image's end: all fill


@pytest.mark.parametrize("kind", [np.float16, np.float32, np.float64, np.longdouble])
def test_numpy_float_margins_read_as_python_floats(kind):
    samples = np.array([[[3, 1]]])
    margin = kind(0.03)
    want = atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=float(margin))
    assert atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=margin).tolist() == want.tolist()
    pair = atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=(kind(3), (8, 8)))
    assert pair.tolist() == atskern.patch_offsets(samples, (8, 8), (150, 150), 50, margin=(3.0, (8, 8))).tolist()


LONG = 5 << 29
"""A level length that int32 offsets cannot address: its last quarter starts past 2**31 - 1."""


@pytest.fixture
def long_level(tmp_path):
    """A sparse (1, 1, LONG, 1) uint8 memmap (no disk or memory used) with 7, 8, 9, 10 where the patch of 4
    around cell 3 of a 4-cell grid starts: ``LONG * 7 / 8 - 2`` (the formula's exact value)."""
    path = tmp_path / "level.bin"
    with open(path, "wb") as f:
        f.truncate(LONG)
    level = np.memmap(path, dtype=np.uint8, mode="r+", shape=(1, 1, LONG, 1))
    start = oracle(3, 4, LONG, 4, Fraction(0))
    assert start == LONG * 7 // 8 - 2 > 2**31
    level[0, 0, start:start + 4, 0] = [7, 8, 9, 10]
    yield level
    del level


def test_multiscale_reads_a_level_longer_than_int32_addresses(long_level):
    """The multiscale gathers place a patch by its exact int64 offset (clipped to int32, the far quarter of a
    level over 2**31 pixels read the pixel 2**31 - 1 instead); patch_offsets, which returns int32, refuses it."""
    torch = pytest.importorskip("torch")
    import ats.torch as ats_torch

    cells = np.array([[[0, 3]]])
    patch = atskern.extract_multiscale([long_level], cells, (1, 4), [(1, 4)])[0]
    np.testing.assert_array_equal(patch.ravel(), [7, 8, 9, 10])
    torch_patch = ats_torch.extract_multiscale([torch.from_numpy(np.asarray(long_level))], torch.tensor(cells), (1, 4),
                                               [(1, 4)], channels_first=False)[0]
    np.testing.assert_array_equal(torch_patch.numpy().ravel(), [7, 8, 9, 10])
    for patch_offsets, samples in ((atskern.patch_offsets, cells), (reference.patch_offsets, cells),
                                   (ats_torch.patch_offsets, torch.tensor(cells))):
        with pytest.raises(ValueError, match="longer than 2\\*\\*31 - 1"):
            patch_offsets(samples, (1, 4), (1, LONG), (1, 4))
    with pytest.raises(ValueError, match=r"patch_size \(1, 2684354560\) has a dim of 2684354560 pixels"):
        atskern.patch_offsets(cells, (1, 4), (1, 8), (1, LONG))
