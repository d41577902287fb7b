"""Tuning probe of the GPU sampling kernels: registers and spills per compile option, the GPU time of each
launch of one call, and ``atskern.sample`` under each block size and ``MIN_BLOCKS`` (draws checked unchanged);
``--only where`` splits a call's time into host and device parts; ``--only status`` times the status read-back
by a copy against mapped host memory (``MAPPED_STATUS``); ``--only whole`` times small maps sampled by one block a
row (``WHOLE_ROWS``) against the chunked launches; ``--only cluster`` adds clusters of blocks a row
(``ROW_CLUSTER``); ``--only gather`` times the patch gather's knobs; ``--only ncu`` adds
Nsight Compute's sections for the streaming kernels where ``ncu`` is installed, ``--only ncu-small`` for the three
kernels of a small call, ``--only ncu-gather`` for the patch gather.

    PYTHONPATH=.:adapters python3 -m bench.gpu_tuning [--quick]

Prints markdown tables; the session script (``bench.gpu_session``) keeps them in its report. The knobs are module
attributes of ``atskern.gpu.sampling`` (``MIN_BLOCKS``, ``BLOCKS_PER_SM``) and ``atskern.gpu._module``
(``THREADS_PER_BLOCK``); the draws do not depend on any of them, which this script checks on every case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from . import _gpu

CONFIGS = [(256, 2, 4), (256, 3, 4), (256, 4, 4), (128, 2, 4), (128, 4, 4), (256, 2, 8), (256, 2, 2)]
"""(threads per block, MIN_BLOCKS, BLOCKS_PER_SM)."""
CASES = [(1, 1024, 10), (1, 4096, 10), (1, 4096, 100), (32, 1024, 100), (256, 256, 10), (32, 256, 100), (1, 256, 10)]
KERNELS = ("chunk_topn_f32", "finish_rows_f32", "chunk_stats_f32", "replacement_draws_f32", "chunk_topn_f64",
           "finish_rows_f64")


class knobs:
    """Set the tuning attributes for a ``with`` block."""

    def __init__(self, threads, min_blocks, blocks_per_sm):
        self.values = {"threads": threads, "min_blocks": min_blocks, "blocks_per_sm": blocks_per_sm}

    def __enter__(self):
        from atskern.gpu import _module, sampling

        self.saved = (_module.THREADS_PER_BLOCK, sampling.MIN_BLOCKS, sampling.BLOCKS_PER_SM)
        _module.THREADS_PER_BLOCK = self.values["threads"]
        sampling.MIN_BLOCKS = self.values["min_blocks"]
        sampling.BLOCKS_PER_SM = self.values["blocks_per_sm"]

    def __exit__(self, *exc):
        from atskern.gpu import _module, sampling

        _module.THREADS_PER_BLOCK, sampling.MIN_BLOCKS, sampling.BLOCKS_PER_SM = self.saved
        return False


def register_table() -> str:
    from atskern.gpu import _module, sampling

    lines = ["| threads | MIN_BLOCKS | kernel | registers | local bytes | static shared bytes |", "|---|---|---|---|---|---|"]
    seen = set()
    for threads, min_blocks, _ in CONFIGS:
        if (threads, min_blocks) in seen:
            continue
        seen.add((threads, min_blocks))
        with knobs(threads, min_blocks, 4):
            options = sampling.compile_options(threads)
            for kernel in KERNELS:
                attributes = sampling.function(kernel, options).attributes
                lines.append(f"| {threads} | {min_blocks} | {kernel} | {attributes['num_regs']} | "
                             f"{attributes['local_size_bytes']} | {attributes['shared_size_bytes']} |")
    for kernel in ("gather_u32_i32", "gather_u8_i32", "scatter_f32_i32", "scatter_atomic_f32_i32"):
        try:
            attributes = _module.function("patches.cu", kernel).attributes
            lines.append(f"| - | - | {kernel} | {attributes['num_regs']} | {attributes['local_size_bytes']} | "
                         f"{attributes['shared_size_bytes']} |")
        except Exception as error:  # noqa: BLE001 - a name that is not in the module: say so, go on
            lines.append(f"| - | - | {kernel} | ({type(error).__name__}) | | |")
    return "\n".join(lines)


def launch_breakdown(rows, side, n, replace=False, repeats=20) -> list[str]:
    """GPU microseconds of each step of one ``sample`` call: the launches are queued behind a spin kernel, so the
    CUDA events between them time the GPU work alone (each kernel and the gap before it), not the host's launch
    time; median of ``repeats``."""
    import cupy

    from atskern.gpu import _module, sampling

    from .gpu_patches import _spin_kernel

    attention = cupy.asarray(np.random.default_rng(0).random((rows, side * side), dtype=np.float32) + 1e-3)
    threads = _module.THREADS_PER_BLOCK
    device = cupy.cuda.Device().id
    p = sampling.plan(rows, side * side, n, replace, threads, sampling._multiprocessors(device))
    lay = sampling.layout(rows, side * side, n, p, replace, False, 2, np.dtype(np.float32))
    ws, indices, probs, memory = sampling.allocate(lay, arrays=p.sort)
    steps = sampling.launches(attention, n, (side, side), 3, replace, False, ws, p, indices, probs)
    options = sampling.compile_options(threads, p.row_cluster)
    stream = cupy.cuda.get_current_stream()
    times = {i: [] for i in range(len(steps))}
    for repeat in range(repeats + 2):
        events = [cupy.cuda.Event() for _ in range(len(steps) + 1)]
        recorded = iter(events)
        _spin_kernel()((1,), (1,), (np.uint64(300_000),))  # 0.3 ms: the host queues every step meanwhile
        next(recorded).record(stream)
        sampling.run_steps(steps, ws, n, lay, memory, options, device, after_step=lambda: next(recorded).record(stream))
        events[-1].synchronize()
        if repeat >= 2:
            for i in range(len(steps)):
                times[i].append(cupy.cuda.get_elapsed_time(events[i], events[i + 1]) * 1000)
    out = []
    for i, step in enumerate(steps):
        name = step if isinstance(step, str) else f"{step[0]} grid {step[1][0]} x {step[2][0]}"
        out.append(f"| {rows} | {side}² | {n} | {'yes' if replace else 'no'} | {p.chunk} x {p.nchunks} | {name} | "
                   f"{statistics.median(times[i]):.1f} |")
    return out


def breakdown_table(quick: bool) -> str:
    lines = ["| B | grid | n | replace | chunk x chunks | launch | GPU us (queued) |", "|---|---|---|---|---|---|---|"]
    for rows, side, n in (CASES[:2] if quick else CASES):
        lines += launch_breakdown(rows, side, n)
    lines += launch_breakdown(1, 4096, 100, replace=True)
    return "\n".join(lines)


def config_table(quick: bool) -> str:
    import cupy

    import atskern

    rng = np.random.default_rng(0)
    header = "| B | grid | n | " + " | ".join(f"t{t} mb{m} bps{b}" for t, m, b in CONFIGS) + " |"
    lines = ["GPU ms (wall ms) of `atskern.sample` per configuration: threads, MIN_BLOCKS, BLOCKS_PER_SM", "",
             header, "|" + "---|" * (3 + len(CONFIGS))]
    for rows, side, n in (CASES[:2] if quick else CASES):
        attention = cupy.asarray(rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3))
        reference = None
        cells = []
        for config in CONFIGS:
            with knobs(*config):
                drawn = atskern.sample(attention, n, seed=3)[0].get()
                if reference is None:
                    reference = drawn
                elif not np.array_equal(drawn, reference):
                    raise AssertionError(f"draws depend on the configuration {config} at {(rows, side, n)}")
                t = _gpu.timings(lambda: atskern.sample(attention, n, seed=3), repeats=10 if quick else 20)
                cells.append(f"{t['gpu']:.3f} ({t['wall']:.3f})")
        lines.append(f"| {rows} | {side}² | {n} | " + " | ".join(cells) + " |")
        del attention
        cupy.get_default_memory_pool().free_all_blocks()
    return "\n".join(lines)


def _draws_equal(first, second) -> bool:
    """Whether two ``(indices, probs)`` host copies hold the same draws, probabilities within 8 units in the last
    place (float64 rows are summed in each plan's own order)."""
    ulps = 8 * np.finfo(first[1].dtype).eps
    return np.array_equal(first[0], second[0]) and np.allclose(first[1], second[1], rtol=ulps, atol=0)


def _same_draws_both_ways(sampling, knob: str, attention, n: int, what: str, values=(False, True)) -> None:
    """``atskern.sample``'s draws with ``knob`` of ``sampling`` at each of ``values`` (off and on, or more) equal the
    first value's (:func:`_draws_equal`), or an AssertionError saying ``what`` differs (the knob is left at the last
    value)."""
    import atskern

    drawn = {}
    for value in values:
        setattr(sampling, knob, value)
        indices, probs = atskern.sample(attention, n, seed=3)
        drawn[value] = (indices.get(), probs.get())
    first, *others = (drawn[value] for value in values)
    if not all(_draws_equal(first, other) for other in others):
        raise AssertionError(f"{what} at {(attention.shape, n)}")


def _alternating(sampling, knob: str, measure, rounds: int, values=(False, True)) -> dict:
    """``{value: [...]}``: ``measure()`` with ``knob`` of ``sampling`` at each of ``values`` (off and on), in
    turn, ``rounds`` times each (so drift on a shared machine hits both)."""
    timed = {value: [] for value in values}
    for _ in range(rounds):
        for value in values:
            setattr(sampling, knob, value)
            timed[value].append(measure())
    return timed


def _knob_cells(sampling, knob: str, attention, n: int, what: str, quick: bool, values=(False, True)) -> dict:
    """``{value: (GPU ms, wall ms)}``: medians of ``atskern.sample(attention, n)`` with ``knob`` of ``sampling`` at
    each of ``values``, alternating (:func:`_alternating`), after checking that the draws are the same
    (:func:`_same_draws_both_ways`, ``what`` naming the difference)."""
    import atskern

    _same_draws_both_ways(sampling, knob, attention, n, what, values)
    timed = _alternating(sampling, knob, lambda: _gpu.timings(
        lambda: atskern.sample(attention, n, seed=3), repeats=10 if quick else 25), 2 if quick else 4, values)
    return {v: (statistics.median(t["gpu"] for t in timed[v]), statistics.median(t["wall"] for t in timed[v]))
            for v in values}


def finish_table(quick: bool) -> str:
    """``atskern.sample`` with each row finished by a ``finish_rows`` launch against by its last ``select_rows``
    block (``FUSED_FINISH``), in one process, alternating, draws and probabilities checked equal; then the GPU time
    per launch of the fused plan. The knob's default is set from this table."""
    import cupy

    from atskern.gpu import sampling

    lines = ["| B | grid | n | finish_rows: GPU ms (wall ms) | select_rows: GPU ms (wall ms) | wall: finish_rows / "
             "select_rows |", "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    saved = sampling.FUSED_FINISH
    try:
        for rows, side, n in (CASES[:2] if quick else CASES):
            attention = cupy.asarray(rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3))
            cells = _knob_cells(sampling, "FUSED_FINISH", attention, n, "select_rows draws differ from finish_rows'",
                                quick)
            lines.append(f"| {rows} | {side}² | {n} | {cells[False][0]:.3f} ({cells[False][1]:.3f}) | "
                         f"{cells[True][0]:.3f} ({cells[True][1]:.3f}) | {cells[False][1] / cells[True][1]:.2f} |")
            del attention
            cupy.get_default_memory_pool().free_all_blocks()
        sampling.FUSED_FINISH = True
        lines += ["", "GPU time per launch with FUSED_FINISH = True:", "",
                  "| B | grid | n | replace | chunk x chunks | launch | GPU us (queued) |", "|---|---|---|---|---|---|---|"]
        for rows, side, n in CASES[:2]:
            lines += launch_breakdown(rows, side, n)
    finally:
        sampling.FUSED_FINISH = saved
    return "\n".join(lines)


WHOLE_CASES = [(1, 128, 10), (1, 181, 10), (1, 256, 10), (1, 256, 100), (1, 362, 10), (8, 180, 10), (32, 128, 10),
               (32, 256, 100), (132, 256, 10), (132, 362, 100), (256, 256, 10), (264, 362, 10), (264, 512, 10),
               (528, 256, 100), (1024, 128, 10)]
"""Small maps (B, side, n): where one block a row might beat the chunked launches (``WHOLE_ROWS`` for any row
count, ``WHOLE_ROWS_FILLED`` for at least a row per multiprocessor; 132 on the H100 and H200)."""


def _top_k_cells(torch, attention, n: int, quick: bool, atskern_ms: float) -> str:
    """Two table cells: the wall ms of torch's Gumbel top-k on the rows of ``attention`` (a CuPy array, timed as
    ``bench.gpu_sampling`` times it) and its ratio to ``atskern_ms``; ``n/a`` twice without torch."""
    if torch is None:
        return "n/a | n/a"
    scores = torch.from_dlpack(attention.reshape(attention.shape[0], -1))
    top_k_ms = _gpu.timings(lambda: _gpu.torch_gumbel_top_k(scores, n), repeats=10 if quick else 25)["wall"]
    return f"{top_k_ms:.3f} | {top_k_ms / atskern_ms:.2f}"


def whole_rows_limit(ratios) -> tuple[int, list]:
    """From ``(positions a row, chunked time / whole-row time)`` pairs: the largest row size below which every case
    was faster whole (0: none), and the sizes of the cases that were not."""
    slower = sorted({size for size, ratio in ratios if not ratio > 1.0})
    limit = max((size for size, _ in ratios if not slower or size < slower[0]), default=0)
    return limit, slower


def whole_table(quick: bool, cases=None, dtype=np.float32, breakdown: bool = True) -> str:
    """``atskern.sample`` (``dtype``, validated) on small maps (``cases``, default :data:`WHOLE_CASES`) with each
    row sampled by one ``sample_rows`` block (``WHOLE_ROWS`` above the row's size) against the chunked launches
    (``WHOLE_ROWS = 0``), in one process, alternating, the draws checked equal (:func:`_same_draws_both_ways`),
    with torch's Gumbel top-k in the same loop; then (``breakdown``) the GPU time per launch of a few whole-row
    calls. ``WHOLE_ROWS`` and ``WHOLE_ROWS_FILLED`` are set from this table: the largest row size up to which every
    case (every case of at least a row per multiprocessor) was faster whole."""
    import cupy

    from atskern.gpu import sampling

    lines = ["| B | grid | n | chunked: GPU ms (wall ms) | whole rows: GPU ms (wall ms) | wall: chunked / whole | "
             "torch Gumbel top-k wall ms | top-k / whole |", "|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    saved = sampling.WHOLE_ROWS
    values = (0, 1 << 30)
    try:
        import torch
    except ImportError:
        torch = None
    ratios = []  # (rows, positions a row, wall chunked / whole)
    try:
        cases = cases or (WHOLE_CASES[:3] if quick else WHOLE_CASES)
        for rows, side, n in cases:
            attention = cupy.asarray(rng.random((rows, side, side), dtype=dtype) + dtype(1e-3))
            cells = _knob_cells(sampling, "WHOLE_ROWS", attention, n, "sample_rows draws differ from the chunked "
                                "launches'", quick, values)
            ratio = cells[0][1] / cells[values[1]][1]
            ratios.append((rows, side * side, ratio))
            lines.append(f"| {rows} | {side}² | {n} | {cells[0][0]:.3f} ({cells[0][1]:.3f}) | {cells[values[1]][0]:.3f} "
                         f"({cells[values[1]][1]:.3f}) | {ratio:.2f} | "
                         f"{_top_k_cells(torch, attention, n, quick, cells[values[1]][1])} |")
            del attention
            cupy.get_default_memory_pool().free_all_blocks()
        multiprocessors = sampling._multiprocessors(cupy.cuda.runtime.getDevice())
        limit, slower = whole_rows_limit([(size, ratio) for rows, size, ratio in ratios])
        filled, filled_slower = whole_rows_limit([(size, r) for rows, size, r in ratios if rows >= multiprocessors])
        lines += ["", f"- every case up to {limit} positions a row faster whole (a WHOLE_ROWS that this table "
                      f"supports); slower whole at {slower or 'none'}",
                  f"- with at least one row per multiprocessor ({multiprocessors}): every case up to {filled} "
                  f"positions faster whole (a WHOLE_ROWS_FILLED); slower at {filled_slower or 'none'}",
                  f"- now: WHOLE_ROWS = {saved}, WHOLE_ROWS_FILLED = {sampling.WHOLE_ROWS_FILLED}", ""]
        sampling.WHOLE_ROWS = values[1]
        if not breakdown:
            return "\n".join(lines)
        lines += ["GPU time per launch with WHOLE_ROWS on:", "",
                  "| B | grid | n | replace | chunk x chunks | launch | GPU us (queued) |", "|---|---|---|---|---|---|---|"]
        for rows, side, n in ((1, 256, 10), (32, 256, 100), (256, 256, 10)):
            lines += launch_breakdown(rows, side, n)
    finally:
        sampling.WHOLE_ROWS = saved
    return "\n".join(lines)


CLUSTER_CASES = [(1, 128, 10), (1, 256, 10), (1, 256, 100), (1, 512, 10), (1, 1024, 10), (8, 256, 10),
                 (32, 181, 100), (32, 256, 100)]
"""Small maps (B, side, n) where a cluster of blocks a row (``ROW_CLUSTER``) might beat both one block a row and
the chunked launches."""
CLUSTER_PLANS = {"chunked": {"WHOLE_ROWS": 0, "ROW_CLUSTER": 0}, "one block": {"WHOLE_ROWS": 1 << 30, "ROW_CLUSTER": 0},
                 **{f"cluster of {c}": {"WHOLE_ROWS": 1 << 30, "ROW_CLUSTER": c} for c in (2, 4, 8)}}
"""The plans the cluster table compares: knob values of ``atskern.gpu.sampling`` each."""


class PlanKnob:
    """One knob standing for several of ``sampling``: setting its ``PLAN`` to a name of ``plans`` sets that plan's
    knob values, so the knob tables' helpers (:func:`_knob_cells`) time and check plans of several knobs. Every
    plan sets the same knobs (none keeps a value the plan before it left)."""

    def __init__(self, sampling, plans: dict):
        if len({frozenset(knobs) for knobs in plans.values()}) > 1:
            raise ValueError(f"every plan must set the same knobs, got {plans}")
        self.__dict__.update(sampling=sampling, plans=plans, PLAN=None)

    def __setattr__(self, name: str, value) -> None:
        if name != "PLAN":
            raise AttributeError(f"a PlanKnob has no knob {name!r}")
        for knob, setting in self.plans[value].items():
            setattr(self.sampling, knob, setting)
        self.__dict__["PLAN"] = value


def cluster_table(quick: bool, cases=None) -> str:
    """``atskern.sample`` (float32, validated) on small maps under each of :data:`CLUSTER_PLANS`: the chunked
    launches, one ``sample_rows`` block a row, and ``sample_cluster_rows`` with clusters of 2, 4 and 8 blocks a row
    (Hopper's thread block clusters), in one process, alternating, the draws checked equal; with torch's Gumbel top-k
    in the same loop; then the GPU time per launch of two calls with clusters of 4. ``ROW_CLUSTER`` and where it
    applies are set from this table."""
    import cupy

    from atskern.gpu import sampling

    if not sampling._clusters(cupy.cuda.runtime.getDevice()):
        return "skipped: this GPU has no thread block clusters (compute capability below 9.0)"
    try:
        import torch
    except ImportError:
        torch = None
    names = tuple(CLUSTER_PLANS)
    plan_knob = PlanKnob(sampling, CLUSTER_PLANS)
    lines = ["wall ms (GPU ms) per plan; the last columns: the fastest plan, and torch's Gumbel top-k over it", "",
             "| B | grid | n | " + " | ".join(names) + " | fastest | torch top-k ms | top-k / fastest |",
             "|---|---|---|" + "---|" * (len(names) + 3)]
    rng = np.random.default_rng(0)
    saved = sampling.WHOLE_ROWS, sampling.ROW_CLUSTER
    try:
        for rows, side, n in cases or (CLUSTER_CASES[:3] if quick else CLUSTER_CASES):
            attention = cupy.asarray(rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3))
            cells = _knob_cells(plan_knob, "PLAN", attention, n, "draws differ between the plans", quick, names)
            fastest = min(names, key=lambda name: cells[name][1])
            lines.append(f"| {rows} | {side}² | {n} | "
                         + " | ".join(f"{cells[name][1]:.3f} ({cells[name][0]:.3f})" for name in names)
                         + f" | {fastest} | {_top_k_cells(torch, attention, n, quick, cells[fastest][1])} |")
            del attention
            cupy.get_default_memory_pool().free_all_blocks()
        lines += ["", "GPU time per launch with clusters of 4 blocks a row:", "",
                  "| B | grid | n | replace | chunk x chunks | launch | GPU us (queued) |",
                  "|---|---|---|---|---|---|---|"]
        sampling.WHOLE_ROWS, sampling.ROW_CLUSTER = 1 << 30, 4
        for rows, side, n in ((1, 256, 10), (32, 256, 100)):
            lines += launch_breakdown(rows, side, n)
    finally:
        sampling.WHOLE_ROWS, sampling.ROW_CLUSTER = saved
    return "\n".join(lines)


GATHER_UNIT_ROWS = (8, 16, 32)


def gather_table(quick: bool) -> str:
    """The gather of ``bench.gpu_patches``' cases with each chunk's place in a row computed per row or once per unit
    (``GATHER_PERIODIC``) and ``GATHER_UNIT_ROWS`` rows per unit: kernel ms (queued behind a spin kernel: no host
    time) and wall ms, the output checked equal to the first configuration's; the knobs' defaults are set from it."""
    import cupy

    import atskern
    from atskern.gpu import patches

    from .gpu_patches import BATCH, CASES, CHANNELS, SIDE, queued_device_ms

    copy = _gpu.copy_bandwidth(repeats=5)
    configs = [(periodic, rows) for periodic in (False, True) for rows in GATHER_UNIT_ROWS]
    header = " | ".join(f"{'once' if periodic else 'per row'}, {rows} rows" for periodic, rows in configs)
    lines = ["kernel ms (% of d2d copy) / wall ms of `atskern.extract_patches` per configuration: the chunk's place "
             "computed per row or once per unit (GATHER_PERIODIC), rows per unit (GATHER_UNIT_ROWS)", "",
             f"| case | {header} |", "|---" * (1 + len(configs)) + "|"]
    saved = patches.GATHER_PERIODIC, patches.GATHER_UNIT_ROWS
    rng = np.random.default_rng(0)
    try:
        for dtype, patch, count in (CASES[1:3] if quick else CASES):
            x = cupy.asarray(rng.integers(0, 256, (BATCH, SIDE, SIDE, CHANNELS)).astype(dtype))
            offsets = cupy.asarray(rng.integers(0, SIDE - patch + 1, (BATCH, count, 2)).astype(np.int32))
            reference, cells = None, []

            def gather():
                return atskern.extract_patches(x, offsets, patch)

            for periodic, rows in configs:
                patches.GATHER_PERIODIC, patches.GATHER_UNIT_ROWS = periodic, rows
                patches.clear_caches()
                got = gather()
                if reference is None:
                    reference = got
                elif not bool(cupy.array_equal(got, reference)):
                    raise AssertionError(f"the gather differs at GATHER_PERIODIC={periodic}, {rows} rows")
                t = _gpu.timings(gather, repeats=10 if quick else 20)
                kernel = min(queued_device_ms(gather, t["host"]) for _ in range(3))
                cells.append(f"{kernel:.4f} ({200 * reference.nbytes / copy / kernel / 1e-3:.0f}%) / {t['wall']:.4f}")
            lines.append(f"| {np.dtype(dtype).name} {patch}²x{CHANNELS}, {count} per image | " + " | ".join(cells) + " |")
            del x, offsets, reference
            cupy.get_default_memory_pool().free_all_blocks()
    finally:
        patches.GATHER_PERIODIC, patches.GATHER_UNIT_ROWS = saved
        patches.clear_caches()
    return "\n".join(lines)


WHERE_CASES = [(1, 256, 10), (32, 256, 100), (1, 1024, 10), (1, 4096, 100), (32, 1024, 100), (256, 256, 10)]


def _host_us(fn, reps=150) -> float:
    """Mean host µs of ``fn()`` over ``reps`` calls back to back, no wait between them."""
    for _ in range(15):
        fn()
    _gpu.synchronize()
    start = time.perf_counter_ns()
    for _ in range(reps):
        fn()
    host = (time.perf_counter_ns() - start) / reps / 1000
    _gpu.synchronize()
    return host


def where_table() -> str:
    """Where a validated float32 ``atskern.sample`` call's time goes, wall µs: the call as the benchmarks time it
    (then a device synchronize), the same call without that wait (it has waited for its status already), and
    ``validate=False`` followed by the steps a validated call adds one by one (a stream synchronize; the status
    copied to pinned memory, then the synchronize); then the backend's host time issuing its memset and launches (no
    wait), the front end's host time (the rest, validate=False), torch Gumbel top-k (rand, log, top-k) and
    ``a.sum()`` read back, in the same run."""
    import cupy

    import atskern
    from atskern.gpu import sampling

    torch = _gpu.torch_cuda()

    def median_us(fn, wait=None):
        return 1e6 * _gpu.median_wall(fn, wait, repeats=150, warmup=15)

    def nothing():
        return None

    lines = ["| B | grid | n | sample | sample, no wait after | validate=False | + stream sync | + status copy, sync | "
             "backend host (no wait) | front host | torch top-k | a.sum() | torch top-k / sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for rows, side, n in WHERE_CASES:
        attention = cupy.asarray(rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3))
        weights = attention.reshape(rows, -1)
        topk = float("nan")
        if torch is not None:
            flat = torch.as_tensor(weights, device="cuda")
            topk = median_us(lambda: _gpu.torch_gumbel_top_k(flat, n), torch.cuda.synchronize)
        floor = median_us(lambda: float(attention.sum()))
        stream = cupy.cuda.get_current_stream()

        def synced():
            atskern.sample(attention, n, seed=1, validate=False)
            stream.synchronize()

        def copied():
            status = atskern.sample(attention, n, seed=1, validate=False, return_status=True)[2]
            sampling.read_status(status)

        total = median_us(lambda: atskern.sample(attention, n, seed=1))
        no_wait = median_us(lambda: atskern.sample(attention, n, seed=1), nothing)
        unchecked = median_us(lambda: atskern.sample(attention, n, seed=1, validate=False))
        with_sync = median_us(synced, nothing)
        with_copy = median_us(copied, nothing)
        backend = _host_us(lambda: sampling.sample(weights, n, (side, side), 1, False))
        front = _host_us(lambda: atskern.sample(attention, n, seed=1, validate=False)) - backend
        lines.append(f"| {rows} | {side}² | {n} | {total:.1f} | {no_wait:.1f} | {unchecked:.1f} | {with_sync:.1f} | "
                     f"{with_copy:.1f} | {backend:.1f} | {front:.1f} | {topk:.1f} | {floor:.1f} | "
                     f"{topk / total:.2f} |")
        del attention, weights
        cupy.get_default_memory_pool().free_all_blocks()
    return "\n".join(lines)


def status_table(quick: bool) -> str:
    """A validated float32 ``atskern.sample`` with its status read back by a copy from device memory against written
    by the kernels into mapped host memory (``MAPPED_STATUS``): wall µs per call, alternating in one process, the
    draws and probabilities checked equal; ``validate=False`` (no read-back) for reference. The knob's default is
    set from this table."""
    import cupy

    import atskern
    from atskern.gpu import sampling

    def median_us(fn):
        return 1e6 * _gpu.median_wall(fn, None, repeats=60 if quick else 150, warmup=15)

    lines = ["| B | grid | n | status copied (µs) | status mapped (µs) | validate=False (µs) | copied / mapped |",
             "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    saved = sampling.MAPPED_STATUS
    try:
        # B = 1024: the summary's copy of many rows into host memory
        for rows, side, n in (WHERE_CASES[:3] if quick else WHERE_CASES + [(1024, 64, 10)]):
            attention = cupy.asarray(rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3))
            _same_draws_both_ways(sampling, "MAPPED_STATUS", attention, n, "draws with the mapped status differ")
            timed = _alternating(sampling, "MAPPED_STATUS",
                                 lambda: median_us(lambda: atskern.sample(attention, n, seed=3)), 2 if quick else 3)
            unchecked = median_us(lambda: atskern.sample(attention, n, seed=3, validate=False))
            copied, mapped = statistics.median(timed[False]), statistics.median(timed[True])
            lines.append(f"| {rows} | {side}² | {n} | {copied:.1f} | {mapped:.1f} | {unchecked:.1f} | "
                         f"{copied / mapped:.2f} |")
            del attention
            cupy.get_default_memory_pool().free_all_blocks()
    finally:
        sampling.MAPPED_STATUS = saved
    return "\n".join(lines)


def torch_step_profile(batch: int = 8, size: int = 1500, steps: int = 5) -> str:
    """torch's profiler over ``steps`` ATS training steps of ``bench.torch_ats`` on CUDA: the top operators by
    host time, and host against CUDA time per step (where a step's time goes when it is host-bound)."""
    from . import torch_ats

    torch = _gpu.torch_cuda()
    if torch is None:
        return "skipped: torch with CUDA is not installed"
    torch.manual_seed(0)
    forward, module = torch_ats._model(torch, "ats")
    module.cuda()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, size, size, device="cuda")
    low = torch.nn.functional.interpolate(x, scale_factor=torch_ats.LOW_SCALE, mode="area")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(low, x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    return f"B={batch}, {size}², {steps} steps\n\n```\n{table}\n```"


def host_profile(calls: int = 200) -> str:
    """cProfile of eager ``ats.torch`` calls on CUDA tensors (sample, extract_patches, expectation forward and
    backward) and of ``atskern`` on CuPy arrays: where the host time of a call goes."""
    import cProfile
    import io
    import pstats

    import cupy

    import atskern

    torch = _gpu.torch_cuda()
    if torch is None:
        return "skipped: torch with CUDA is not installed"
    from ats.torch import functional as F

    attention = torch.rand(8, 180, 180, device="cuda") + 0.01
    image = torch.rand(8, 1, 1500, 1500, device="cuda", requires_grad=True)
    offsets = torch.randint(0, 1450, (8, 10, 2), device="cuda", dtype=torch.int32)
    features = torch.rand(8, 10, 32, device="cuda", requires_grad=True)
    probs = torch.full((8, 10), 0.01, dtype=torch.float32, device="cuda", requires_grad=True)
    a_cp = cupy.asarray(np.random.default_rng(0).random((8, 180, 180), dtype=np.float32) + 0.01)
    x_cp = cupy.asarray(np.random.default_rng(0).random((8, 1500, 1500, 3), dtype=np.float32))
    o_cp = cupy.asarray(np.random.default_rng(0).integers(0, 1450, (8, 10, 2)).astype(np.int32))
    work = {
        "ats.torch sample (host key)": lambda: F.sample(attention, 10, key=5),
        "ats.torch extract_patches": lambda: F.extract_patches(image, offsets, 50),
        "ats.torch expectation fwd+bwd": lambda: F.expectation(features, probs).sum().backward(),
        "ats.torch extract fwd+bwd": lambda: F.extract_patches(image, offsets, 50).sum().backward(),
        "atskern.sample (CuPy)": lambda: atskern.sample(a_cp, 10, seed=5),
        "atskern.sample validate=False (CuPy)": lambda: atskern.sample(a_cp, 10, seed=5, validate=False),
        "atskern.extract_patches (CuPy)": lambda: atskern.extract_patches(x_cp, o_cp, (50, 50)),
    }
    out = []
    for name, fn in work.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        host = (time.perf_counter() - start) / calls
        torch.cuda.synchronize()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(22)
        text = "\n".join(line for line in stream.getvalue().splitlines() if line.strip())
        out.append(f"#### {name}: {1e6 * host:.0f} us of host time per call under cProfile\n\n```\n{text}\n```")
    return "\n\n".join(out)


NCU_KERNELS = "regex:^(chunk_stats|chunk_topn|finish_rows)_f32$"
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "MemoryWorkloadAnalysis", "WarpStateStats")
NCU_TARGET = """
import cupy, numpy as np, atskern
x = cupy.asarray(np.random.default_rng(0).random((1, {side}, {side}), dtype=np.float32) + np.float32(1e-3))
for seed in range(3):
    atskern.sample(x, {n}, seed=seed)
"""
"""The profiled program: three calls on 1 x side², n (the first compiles; ncu profiles the last call's kernels)."""
NCU_SMALL_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "SchedulerStats")


def _ncu() -> str | None:
    import glob
    import shutil

    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return candidates[-1] if candidates else None


def _run_ncu(kernels: str, skip: int, count: int, sections, target: str, timeout: float) -> str:
    """Nsight Compute's ``sections`` for ``count`` launches of ``kernels`` (a regex) after ``skip`` of them in the
    program ``target``, as markdown (the command, its exit status and the report's last lines)."""
    import os
    import subprocess

    ncu = _ncu()
    if ncu is None:
        return "- skipped: ncu (Nsight Compute) not found"
    command = [ncu, "--kernel-name", kernels, "--launch-skip", str(skip), "--launch-count", str(count),
               "--target-processes", "all"]
    for section in sections:
        command += ["--section", section]
    command += [sys.executable, "-c", target]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [".", "adapters", os.environ.get("PYTHONPATH")])))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"- ncu timed out after {timeout:.0f} s"
    text = result.stdout.strip() or result.stderr.strip()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("==PROF==")]
    return f"`{' '.join(command[:3])} ... ({', '.join(sections)})`, exit {result.returncode}\n\n```\n" + \
        "\n".join(lines[-400:]) + "\n```"


def ncu_profile(timeout: float = 120.0) -> str:
    """Nsight Compute's view of the streaming kernels of one call on 1 x 4096², n=100: bandwidth reached (speed of
    light), occupancy, registers and what the warps wait on -- what the read-floor goal of issue 10 hinges on."""
    return _run_ncu(NCU_KERNELS, 6, 3, NCU_SECTIONS, NCU_TARGET.format(side=4096, n=100), timeout)


def ncu_small(timeout: float = 120.0) -> str:
    """Nsight Compute on the three kernels of the last of three calls on 1 x 256², n=10 (statistics, screening,
    finish): on small maps each launch is mostly latency, and the warp states say what it waits on."""
    return _run_ncu(NCU_KERNELS, 6, 3, NCU_SMALL_SECTIONS, NCU_TARGET.format(side=256, n=10), timeout)


NCU_GATHER_TARGET = """
import cupy, numpy as np, atskern
rng = np.random.default_rng(0)
x = cupy.asarray(rng.random((8, 2048, 2048, 3), dtype=np.float32))
offsets = cupy.asarray(rng.integers(0, 2048 - 32 + 1, (8, 512, 2)).astype(np.int32))
for _ in range(3):
    atskern.extract_patches(x, offsets, 32)
"""


def ncu_gather(timeout: float = 120.0) -> str:
    """Nsight Compute on the gather of 512 patches of 32²x3 float32 from each of 8 images of 2048²x3 (the last of
    three calls): 40% of the copy bandwidth in kernel time on the H200, short of issue 10's 50%."""
    return _run_ncu("regex:^gather_", 2, 1, NCU_SECTIONS, NCU_GATHER_TARGET, timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["registers", "breakdown", "finish", "configs", "torch-profile", "host-profile",
                                           "where", "status", "ncu", "ncu-small", "ncu-gather", "gather", "whole",
                                           "cluster"],
                        action="append", help="run only these parts (repeatable; default all but ncu)")
    args = parser.parse_args(argv)
    parts = set(args.only or ["registers", "breakdown", "finish", "cluster", "whole", "where", "status", "configs",
                              "torch-profile", "host-profile"])
    reason = _gpu.unavailable()
    if reason:
        print(f"skipped: {reason}")
        return 0
    if "registers" in parts:
        print("### Registers per compile option\n\n" + register_table() + "\n", flush=True)
    if "breakdown" in parts:
        print("### GPU time per launch (default configuration)\n\n" + breakdown_table(args.quick) + "\n", flush=True)
    if "finish" in parts:
        print("### Rows finished apart or in the selecting launch (FUSED_FINISH)\n\n" + finish_table(args.quick) + "\n",
              flush=True)
    if "cluster" in parts:
        print("### Small maps sampled by a cluster of blocks a row (ROW_CLUSTER), one block, or the chunked "
              "launches (float32)\n\n" + cluster_table(args.quick) + "\n", flush=True)
    if "whole" in parts:
        print("### Small maps sampled by one block a row (WHOLE_ROWS) or by the chunked launches (float32)\n\n"
              + whole_table(args.quick) + "\n", flush=True)
    if "where" in parts:
        print("### Where a sampling call's time goes (float32, µs)\n\n" + where_table() + "\n", flush=True)
    if "status" in parts:
        print("### The status read back by a copy or written into mapped host memory (MAPPED_STATUS, float32)\n\n"
              + status_table(args.quick) + "\n", flush=True)
    if "configs" in parts:
        print("### Configurations\n\n" + config_table(args.quick) + "\n", flush=True)
    if "torch-profile" in parts:
        print("### torch profile of the ATS training step\n\n" + torch_step_profile() + "\n", flush=True)
    if "ncu" in parts:
        print("### Nsight Compute profile of the streaming kernels\n\n" + ncu_profile() + "\n", flush=True)
    if "ncu-small" in parts:
        print("### Nsight Compute profile of a small call's kernels (1 x 256², n=10)\n\n" + ncu_small() + "\n", flush=True)
    if "gather" in parts:
        print("### Patch gather configurations\n\n" + gather_table(args.quick) + "\n", flush=True)
    if "ncu-gather" in parts:
        print("### Nsight Compute profile of the gather (8 x 512 patches of 32²x3 float32)\n\n" + ncu_gather() + "\n",
              flush=True)
    if "host-profile" in parts:
        print("### Host time of single calls (cProfile)\n\n" + host_profile() + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
