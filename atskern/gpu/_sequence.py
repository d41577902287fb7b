"""Launch sequences packed once per call shape and replayed with each call's addresses.

A call of the sampling backend issues a memset and two to six kernel launches whose arguments are, but for a few,
fixed by the call's shape: sizes, plan constants, and addresses inside the call's one allocation at fixed offsets.
Building those argument lists and packing them word by word on every call cost more host time than the launches
(about 20 µs of Python per call on a 2-core host, ``bench.gpu_host``). A :class:`LaunchSequence` packs every
argument of every step into one array of 64-bit words when the sequence is first built; a replay only adds the
allocation's base address to the words that hold offsets into it (one vector add), stores the call's own values
(the weights' address, the seed) into their slots, and hands the driver a pointer table per launch, built once per
thread.

A step's argument is one of:

- :class:`Offset`: an address inside the call's allocation (``base + offset`` at replay);
- a :class:`Slot`: a value given at replay (an integer or a device address);
- what :func:`atskern.gpu._launch.word` packs (an integer, None).

The driver copies a launch's arguments before ``cuLaunchKernel`` returns, so one buffer per thread and sequence is
reused by every replay on that thread.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from .._backend import cupy
from . import _launch


@dataclasses.dataclass(frozen=True)
class Offset:
    """An address ``offset`` bytes into the call's allocation; ``dtype`` for an array whose element type a launch
    list reads (the probabilities' precision)."""

    offset: int
    dtype: object = None


class Slot:
    """A per-call argument of a sequence, given at replay in the order of the sequence's ``slots``. ``shape`` and
    ``dtype`` are what a launch list may read of the array it stands for."""

    def __init__(self, name: str, shape=None, dtype=None):
        self.name, self.shape, self.dtype = name, shape, dtype

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


MEMSET = "memset"
"""A step ``(MEMSET, offset, nbytes)``: zero ``nbytes`` from ``base + offset`` with ``memsetAsync``."""


class LaunchSequence:
    """Kernel launches and memsets of one call shape, their arguments packed (see the module docstring).

    ``steps``: ``(kernel handle, grid, block, args)`` tuples (the handle a ``CUfunction`` address) and
    ``(MEMSET, offset, nbytes)`` tuples, in order; ``slots``: the :class:`Slot` objects a replay gives values for.

    ``ops`` lists the steps as issued: ``(MEMSET, offset, nbytes)``, or ``(handle, gx, gy, gz, bx, by, bz, first,
    count)`` for a launch whose arguments are words ``first .. first + count`` of :meth:`pack`'s result.
    """

    def __init__(self, steps, slots=()):
        self.slots = tuple(slots)
        words, relative = [], []
        where = {id(slot): [] for slot in self.slots}
        self.ops = []
        for step in steps:
            if step[0] == MEMSET:
                self.ops.append((MEMSET, int(step[1]), int(step[2])))
                continue
            handle, grid, block, args = step
            start = len(words)
            for arg in args:
                if isinstance(arg, Offset):
                    words.append(arg.offset)
                    relative.append(1)
                    continue
                if isinstance(arg, Slot):
                    if id(arg) not in where:
                        raise ValueError(f"{arg!r} is not one of the sequence's slots")
                    where[id(arg)].append(len(words))
                    words.append(0)
                else:
                    words.append(_launch.word(arg))
                relative.append(0)
            gx, gy, gz = (tuple(grid) + (1, 1))[:3]
            bx, by, bz = (tuple(block) + (1, 1))[:3]
            self.ops.append((int(handle), gx, gy, gz, bx, by, bz, start, len(words) - start))
        self.words = np.array(words or [0], np.uint64)
        self.relative = np.array(relative or [0], np.uint64)
        self.slot_words = tuple(tuple(where[id(slot)]) for slot in self.slots)
        self._local = threading.local()

    def _buffers(self):
        """This thread's word buffer and the address of each launch's pointer table (built on first use)."""
        local = self._local
        if not hasattr(local, "words"):
            local.words = np.zeros_like(self.words)
            first = local.words.ctypes.data
            local.pointers = (first + 8 * np.arange(max(len(self.words), 1), dtype=np.uint64)).astype(np.uint64)
            local.tables = [None if op[0] == MEMSET else int(local.pointers.ctypes.data) + 8 * op[7]
                            for op in self.ops]
        return local.words, local.tables

    def pack(self, base: int, values) -> np.ndarray:
        """The argument words of a replay at allocation ``base`` with ``values`` for the slots (in this thread's
        buffer, valid until the thread's next replay of this sequence)."""
        words, _ = self._buffers()
        np.multiply(self.relative, np.uint64(base), out=words)
        words += self.words
        for at, value in zip(self.slot_words, values):
            word = _launch.word(value)
            for i in at:
                words[i] = word
        return words

    def replay(self, base: int, values, stream: int):
        """Issue the steps on ``stream`` (a ``CUstream`` address) for the allocation at ``base``, with ``values``
        for the slots. Asynchronous, CUDA-graph capturable."""
        cp = cupy()
        self.pack(base, values)
        tables = self._local.tables  # built by pack's first call on this thread
        _launch.bind_context(cp)
        driver, runtime = cp.cuda.driver, cp.cuda.runtime
        for op, table in zip(self.ops, tables):
            if op[0] == MEMSET:
                runtime.memsetAsync(base + op[1], 0, op[2], stream)
            else:
                driver.launchKernel(op[0], op[1], op[2], op[3], op[4], op[5], op[6], 0, stream, table, 0)
