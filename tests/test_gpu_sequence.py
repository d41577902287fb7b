"""Packed launch sequences (``atskern.gpu._sequence``) and the sampling backend's recorded calls, on the CPU.

A replay's argument words are checked against the launch lists they were recorded from, packed the other way
(``atskern.gpu._launch.pack`` of :func:`atskern.gpu.sampling.launches` built with the call's real addresses); the
kernels themselves run through these words in ``test_cuda_host_sampling.py`` (the emulated device).
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from atskern.gpu import _launch, _sequence
from atskern.gpu import sampling as gs

from .cuda_host_build import kernel_parameters

NAMES = sorted(kernel_parameters(gs.SOURCE))
BASE = 0x7F12_3456_7800  # an allocation's address (256-byte aligned)


class _DeviceArray:
    """What the backend reads of a device array: shape, dtype and address."""

    def __init__(self, shape, dtype, ptr):
        self.shape, self.dtype, self.data = tuple(shape), np.dtype(dtype), types.SimpleNamespace(ptr=ptr)


@pytest.fixture
def handles(monkeypatch):
    monkeypatch.setattr(gs, "_handle", lambda name, options, device_id: 1000 + NAMES.index(name))
    monkeypatch.setattr(gs, "_multiprocessors", lambda device_id: 132)
    gs.recorded_call.cache_clear()
    yield
    gs.recorded_call.cache_clear()


def _knobs():
    return gs.BLOCKS_PER_SM, gs.MIN_BLOCKS, gs.SCREEN_UNROLL, gs.FUSED_FINISH


@pytest.mark.parametrize("fused", [False, True], ids=["finish_rows", "select_rows"])
@pytest.mark.parametrize("rows, size, n, replace, logits, dtype, seed_on_device", [
    (1, 65536, 10, False, False, np.float32, False),
    (32, 1 << 20, 100, False, False, np.float32, True),
    (3, 5000, 7, True, False, np.float64, False),
    (2, 70000, 50, False, True, np.float64, True),
    (4, 9000, 12, True, True, np.float32, True),
])
def test_replay_words_are_the_launch_lists_words(handles, monkeypatch, rows, size, n, replace, logits, dtype,
                                                 seed_on_device, fused):
    """Every launch of a recorded call replayed at an allocation gets the words ``_launch.pack`` makes of
    ``launches()`` built with that allocation's addresses, the weights' address and the seed; the memset comes
    first and clears the zeroed fields; handles, grids and blocks are the launch lists'."""
    monkeypatch.setattr(gs, "FUSED_FINISH", fused)
    grid = (size,) if size % 2 else (2, size // 2)
    call = gs.recorded_call(rows, size, n, grid, replace, logits, np.dtype(dtype), 256, None, 0,
                            seed_on_device, _knobs())
    weights = _DeviceArray((rows, size), dtype, 0x5000_0000_0100)
    seed = 2**64 - 5
    seed_array = _DeviceArray((1,), np.uint64, 0x6000_0000_0200) if seed_on_device else None
    values = (weights, seed) + ((seed_array,) if seed_on_device else ())
    words = call.sequence.pack(BASE, values).copy()

    lay = call.layout
    ws = gs.Workspace(**{name: None if lay.specs[name] is None else BASE + lay.offsets[name]
                         for name in gs._WORKSPACE_FIELDS})
    indices = _DeviceArray(*lay.specs["indices"], BASE + lay.offsets["indices"])
    probs = _DeviceArray(*lay.specs["probs"], BASE + lay.offsets["probs"])
    steps = gs.launches(weights, n, grid, seed, replace, logits, ws, call.plan, indices, probs, seed_array)
    assert call.plan.fused == (fused and not replace)
    assert steps[0] == gs.ZERO_STEP and call.sequence.ops[0] == (_sequence.MEMSET, 0, lay.zeroed)
    assert len(call.sequence.ops) == len(steps)
    for op, step in zip(call.sequence.ops[1:], steps[1:]):
        name, grid_dims, block, args = step
        handle, gx, gy, gz, bx, by, bz, first, count = op
        assert handle == 1000 + NAMES.index(name)
        assert (gx, gy, gz) == (tuple(grid_dims) + (1, 1))[:3] and (bx, by, bz) == (tuple(block) + (1, 1))[:3]
        assert count == len(kernel_parameters(gs.SOURCE)[name])
        assert words[first:first + count].tolist() == _launch.pack(args), name


def test_replays_on_two_threads_use_their_own_words(handles):
    """Two threads replaying one sequence at once pack into separate buffers (a shared one would hand a launch
    the other call's addresses)."""
    call = gs.recorded_call(1, 65536, 10, (256, 256), False, False, np.dtype(np.float32), 256,
                            None, 0, False, _knobs())
    meet = threading.Barrier(2)
    seen = {}

    def replay(base):
        words = call.sequence.pack(base, (_DeviceArray((1, 65536), np.float32, base + 0x100000), 9))
        meet.wait()  # both have packed before either reads its words back
        seen[base] = (words.ctypes.data, words.copy())

    threads = [threading.Thread(target=replay, args=(base,)) for base in (BASE, BASE + 0x1000_0000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (first_address, first), (second_address, second) = seen[BASE], seen[BASE + 0x1000_0000]
    assert first_address != second_address
    relative = call.sequence.relative.astype(bool)
    assert relative.any() and np.array_equal(second[relative] - first[relative], np.full(relative.sum(), 0x1000_0000, np.uint64))


def test_a_slot_the_sequence_does_not_declare_is_refused():
    with pytest.raises(ValueError, match="not one of the sequence's slots"):
        _sequence.LaunchSequence([(1, (1,), (32,), (_sequence.Slot("weights"),))], slots=())


def test_a_tuning_knob_change_takes_effect_on_the_next_call(handles, monkeypatch):
    """``sample`` keys its recorded calls by the tuning knobs' values: ``BLOCKS_PER_SM = 4`` doubles the chunks of
    a 1 x 4096² call on 132 multiprocessors at once (a memo keyed by the shape alone kept the old plan)."""
    launched = []
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0, memsetAsync=lambda *args: None),
        driver=types.SimpleNamespace(ctxGetCurrent=lambda: 1, launchKernel=lambda *args: launched.append(args)),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0))

    class Memory:
        ptr = BASE

        def __add__(self, offset):
            return offset

    cuda.alloc = lambda size: Memory()
    fake = types.SimpleNamespace(cuda=cuda, ndarray=lambda shape, dtype, memptr: (shape, dtype, memptr))
    for module in (gs, _launch, _sequence):
        monkeypatch.setattr(module, "cupy", lambda: fake)
    weights = _DeviceArray((1, 4096 * 4096), np.float32, 0x5000_0000_0000)

    def stats_blocks():
        launched.clear()
        gs.sample(weights, 10, np.array([4096, 4096]), 3, False)
        return [args[1] for args in launched if args[0] == 1000 + NAMES.index("chunk_stats_f32")]

    size = 4096 * 4096
    default = gs.plan(1, size, 10, False, 256, 132).nchunks
    assert stats_blocks() == [default]
    monkeypatch.setattr(gs, "BLOCKS_PER_SM", 2 * gs.BLOCKS_PER_SM)
    doubled = gs.plan(1, size, 10, False, 256, 132).nchunks
    assert doubled > 1.9 * default and stats_blocks() == [doubled]


@pytest.mark.parametrize("fused", [False, True], ids=["finish_rows", "select_rows"])
@pytest.mark.parametrize("replace, logits, dtype", [(False, False, np.float32), (True, False, np.float64),
                                                    (False, True, np.float32)])
def test_replay_passes_the_status_host_copy_to_every_finish(handles, monkeypatch, fused, replace, logits, dtype):
    """With a ``status_host`` slot (MAPPED_STATUS) the mapped buffer's address reaches the last argument of every
    finishing launch (finish_rows, select_rows) and nothing else changes: the status itself stays in the
    allocation."""
    monkeypatch.setattr(gs, "FUSED_FINISH", fused)
    rows, size, n, host = 3, 70000, 9, 0x7F00_1234_5600
    weights = _DeviceArray((rows, size), dtype, 0x5000_0000_0100)
    plain = gs.recorded_call(rows, size, n, (size,), replace, logits, np.dtype(dtype), 256, None, 0, False, _knobs())
    mapped = gs.recorded_call(rows, size, n, (size,), replace, logits, np.dtype(dtype), 256, None, 0, False, _knobs(),
                              True)
    before = plain.sequence.pack(BASE, (weights, 5)).copy()
    after = mapped.sequence.pack(BASE, (weights, 5, host)).copy()
    finishing = 0
    for op in mapped.sequence.ops[1:]:
        handle, *_, first, count = op
        name = NAMES[handle - 1000]
        last = first + count - 1
        if name.startswith(("finish_rows_", "select_rows_")):
            assert kernel_parameters(gs.SOURCE)[name][-1] == "ptr" and after[last] == host and before[last] == 0
            finishing += 1
            last -= 1
        assert np.array_equal(after[first:last + 1], before[first:last + 1]), name
    assert finishing >= 1


def test_more_draws_with_replacement_than_one_launch_takes_are_refused_by_the_plan():
    limit = 2**31 - 1  # CUDA's largest gridDim.x: replacement_draws runs a block a draw
    assert gs.plan(1, 64 * 64, limit, True, 256, 132) is not None
    for rows, n in ((1024, 2**21), (1, 2**31), (3, 2**30)):
        with pytest.raises(ValueError, match=rf"n={n} draws with replacement from each of {rows} rows make "
                                             rf"{rows * n} draws, more than one GPU launch takes"):
            gs.plan(rows, 64 * 64, n, True, 256, 132)
