"""GPU sampling without replacement: ``atskern.sample`` on CuPy arrays against what a GPU user would write.

(a) torch Gumbel top-k (``rand``, ``log``, ``topk``), (b) ``torch.multinomial(replacement=False)`` (it refuses
rows of more than 2**24 cells), (c) CuPy Gumbel keys + ``argpartition`` (then the n drawn sorted by key),
(d) the read floor: one pass over the map (``a.sum()``). atskern runs with its default validation (one status
read-back), and also with ``validate=False`` (no host synchronization) and ``replace=True``. torch
columns are skipped with a note without torch's CUDA build.

    python -m bench.gpu_sampling [--quick]
"""

from __future__ import annotations

import sys

import numpy as np

from . import _gpu
from ._timing import Table

NAME = "gpu_sampling"
CASES = [(1, 1024, 10), (1, 4096, 100), (32, 1024, 100), (256, 256, 10), (1, 256, 10), (32, 256, 100), (1, 1024, 2048),
         (32, 256, 2048)]  # n = 2048: the largest n selected in shared memory (atskern.gpu.sampling.MAX_SELECTION_N)
MULTINOMIAL_LIMIT = 2**24


def cases(quick: bool):
    return CASES[:2] if quick else CASES


def unavailable():
    return _gpu.unavailable()


def _cupy_gumbel(cupy, flat, n):
    keys = cupy.log(flat) - cupy.log(-cupy.log(cupy.random.random(flat.shape, dtype=flat.dtype)))
    top = cupy.argpartition(-keys, n - 1, axis=1)[:, :n]
    order = cupy.argsort(-cupy.take_along_axis(keys, top, axis=1), axis=1)
    return cupy.take_along_axis(top, order, axis=1)


def run(quick: bool = False, progress=None) -> Table:
    import cupy

    import atskern

    torch = _gpu.torch_cuda()
    repeats = 10 if quick else 20
    table = Table(NAME, "GPU sampling without replacement, float32 (median wall ms per call, synchronized)",
                  ["B", "grid", "n", "atskern", "atskern GPU ms", "atskern host us", "validate=False",
                   "replace=True", "torch Gumbel top-k",
                   "torch.multinomial", "CuPy Gumbel + argpartition", "a.sum() floor", "vs torch top-k",
                   "vs multinomial", "/ floor"])
    rng = np.random.default_rng(0)
    for rows, side, n in cases(quick):
        attention = cupy.asarray(rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3))
        flat = attention.reshape(rows, -1)
        indices, probs = atskern.sample(attention, n, seed=3)
        assert indices.shape == (rows, n, 2) and bool((probs > 0).all())
        ours = _gpu.timings(lambda: atskern.sample(attention, n, seed=3), repeats=repeats)
        unvalidated = _gpu.timings(lambda: atskern.sample(attention, n, seed=3, validate=False), repeats=repeats)["wall"]
        replaced = _gpu.timings(lambda: atskern.sample(attention, n, seed=3, replace=True), repeats=repeats)["wall"]
        cupy_gumbel = _gpu.timings(lambda: _cupy_gumbel(cupy, flat, n), repeats=repeats)["wall"]
        floor = _gpu.timings(lambda: attention.sum(), repeats=repeats)["wall"]
        top_k = multinomial = None
        if torch is not None:
            flat_t = torch.from_dlpack(flat)
            top_k = _gpu.timings(lambda: _gpu.torch_gumbel_top_k(flat_t, n), repeats=repeats)["wall"]
            if flat.shape[1] <= MULTINOMIAL_LIMIT:
                multinomial = _gpu.timings(lambda: torch.multinomial(flat_t, n, replacement=False),
                                           repeats=repeats)["wall"]
        table.rows.append([rows, f"{side}x{side}", n, ours["wall"], ours["gpu"], 1e3 * ours["host"], unvalidated, replaced,
                           _gpu.cell(top_k),
                           _gpu.cell(multinomial), cupy_gumbel, floor, _gpu.cell(_gpu.ratio(top_k, ours["wall"])),
                           _gpu.cell(_gpu.ratio(multinomial, ours["wall"])), ours["wall"] / floor])
        del attention, flat, indices, probs
        cupy.get_default_memory_pool().free_all_blocks()
        if progress is not None:
            progress.update(1)
    if torch is None:
        table.notes.append("torch columns skipped: torch with CUDA is not installed")
    table.notes.append("torch.multinomial: n/a where a row has more than 2**24 cells (it refuses them)")
    table.notes.append("goals (issue 10): within 3x of the floor from 4M cells in total (below: under 0.1 ms), "
                       ">= 3x faster than torch Gumbel top-k and torch.multinomial")
    return table


if __name__ == "__main__":
    _gpu.script_main(sys.modules[__name__])
