"""GPU host path: atskern's own host work per GPU call, with the device calls stubbed (runs without a GPU).

On small attention maps a GPU call's wall time is mostly host time (``bench.gpu_sampling``'s host column), and
part of it is atskern's Python: argument checks, the plan, the launch arguments. This benchmark runs the GPU front
ends and backends against a stand-in CuPy whose allocations, launches, memsets and synchronizations return at once
(``bench._stand_in_cupy``), so what it times is that Python work alone, on any machine; on a GPU host the CUDA
driver's own time per launch (about 4.4 µs on the H100 host) comes on top.

The sampling backend records each call shape's launches once and replays them (``atskern.gpu._sequence``); the
second column times the same backend call with its launch lists built and packed per call
(``sampling.launches`` + ``allocate`` + ``run_steps``, as before the recording: measured in the same run). The
patch calls answer a repeated call signature from ``atskern._check_memo``; their second column runs the checks
every call.

    python -m bench.host_path [--quick]
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from ._timing import Table, median_seconds

NAME = "host_path"
SAMPLE_CASES = [(1, 256, 10), (32, 256, 100), (1, 4096, 100)]  # (rows, grid side, n)
PATCH_CASES = [(50, 10), (32, 512)]  # (patch side, patches per image) of 8 images of 2048 x 2048 x 3, float32
CALLS = 2000


def cases(quick: bool):
    return SAMPLE_CASES[:1] + PATCH_CASES[:1] if quick else SAMPLE_CASES + PATCH_CASES


def _per_call_us(fn, quick: bool) -> float:
    calls = CALLS // 10 if quick else CALLS

    def batch():
        for _ in range(calls):
            fn()

    return median_seconds(batch, repeats=3 if quick else 7, warmup=1) / calls * 1e6


def _launch_lists_per_call(weights, n, grid, seed):
    """The sampling backend's call with its launch lists built and packed per call (no recording)."""
    from atskern.gpu import sampling as gs

    rows, size = weights.shape
    p = gs.plan(rows, size, n, False, 256, gs._multiprocessors(0))
    lay = gs.layout(rows, size, n, p, False, False, len(grid), weights.dtype)
    return gs.sample_from_lists(weights, n, grid, seed, False, False, None, p, lay, 0)


@contextlib.contextmanager
def _checks_every_call():
    """The patch calls without their check memo (every signature None), as before ``atskern._check_memo``."""
    from atskern import _check_memo

    saved = _check_memo.gather_signature, _check_memo.scatter_signature
    _check_memo.gather_signature = _check_memo.scatter_signature = lambda *args: None
    try:
        yield
    finally:
        _check_memo.gather_signature, _check_memo.scatter_signature = saved


def run(quick: bool = False, progress=None) -> Table:
    import atskern
    from atskern.gpu import sampling as gs

    from . import _stand_in_cupy

    table = Table(NAME, "GPU host path: atskern's Python work per call, device calls stubbed (µs per call)",
                  ["call", "case", "atskern (front end + backend)", "backend: recorded launches",
                   "backend: launch lists per call", "atskern, checks run every call", "faster by"])
    sample_cases, patch_cases = (SAMPLE_CASES[:1], PATCH_CASES[:1]) if quick else (SAMPLE_CASES, PATCH_CASES)
    with _stand_in_cupy.installed() as cp:
        for rows, side, n in sample_cases:
            attention = cp.ndarray((rows, side, side), np.float32)
            weights = attention.reshape(rows, -1)
            grid = np.array([side, side], np.int64)
            whole = _per_call_us(lambda: atskern.sample(attention, n, seed=5), quick)
            recorded = _per_call_us(lambda: gs.sample(weights, n, grid, 5, False), quick)
            listed = _per_call_us(lambda: _launch_lists_per_call(weights, n, grid, 5), quick)
            table.rows.append(["atskern.sample", f"B={rows}, {side}², n={n}", round(whole, 1), round(recorded, 1),
                               round(listed, 1), "", round(listed / recorded, 2)])
            if progress is not None:
                progress.update()
        for patch, count in patch_cases:
            images = cp.ndarray((8, 2048, 2048, 3), np.float32)
            offsets = cp.ndarray((8, count, 2), np.int64)
            grads = cp.ndarray((8, count, patch, patch, 3), np.float32)
            gather = _per_call_us(lambda: atskern.extract_patches(images, offsets, patch), quick)
            scatter = _per_call_us(lambda: atskern.scatter_patches(grads, offsets, (2048, 2048)), quick)
            with _checks_every_call():
                gather_checked = _per_call_us(lambda: atskern.extract_patches(images, offsets, patch), quick)
                scatter_checked = _per_call_us(lambda: atskern.scatter_patches(grads, offsets, (2048, 2048)), quick)
            label = f"8 x 2048² x 3, {count} of {patch}²"
            table.rows.append(["atskern.extract_patches", label, round(gather, 1), "", "", round(gather_checked, 1),
                               round(gather_checked / gather, 2)])
            table.rows.append(["atskern.scatter_patches", label, round(scatter, 1), "", "", round(scatter_checked, 1),
                               round(scatter_checked / scatter, 2)])
            if progress is not None:
                progress.update()
    table.notes.append("float32, validation on (the status read-back reports valid rows); the stand-in's own "
                       "calls (array objects, no-op launches) are included, CUDA's are not")
    table.notes.append("faster by: launch lists per call / recorded launches (sample); checks run every call / "
                       "atskern (patches: `atskern._check_memo` answers a repeated call signature)")
    return table


def main(argv=None) -> int:
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    print(run(quick=quick).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
