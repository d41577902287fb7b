"""Sampling without replacement: atskern CPU versus the alternatives a user would pick.

(a) TF Gumbel-top-k (``tf.random.uniform`` + ``tf.math.top_k``, in a ``tf.function``),
(b) ``numpy.random.Generator.choice(replace=False, p=row)`` row by row,
(c) the floor: one streaming pass over the map (``np.sum``).
"""

from __future__ import annotations

import numpy as np

import atskern

from ._timing import TENSORFLOW_MISSING, Table, median_seconds, skipped, tensorflow_or_none

NAME = "sampling"


def cases(quick: bool):
    """The comparison table's cases (the fixed-cost table's, :func:`fixed_cost_cases`, come on top)."""
    if quick:
        return [(1, 256, 10), (4, 256, 100)]
    return [(b, side, n) for b in (1, 32) for side in (256, 1024) for n in (10, 100)]


def _tf_gumbel_top_k():
    tf = tensorflow_or_none()
    if tf is None:
        return None, None

    @tf.function(reduce_retracing=True)
    def gumbel_top_k(attention, n):
        flat = tf.reshape(attention, (tf.shape(attention)[0], -1))
        u = tf.random.uniform(tf.shape(flat), minval=1e-20, maxval=1.0, dtype=flat.dtype)
        keys = tf.math.log(flat) - tf.math.log(-tf.math.log(u))
        return tf.math.top_k(keys, k=n).indices

    return tf, gumbel_top_k


def run(quick: bool = False, progress=None) -> Table:
    table = Table(
        NAME,
        "Sampling without replacement, float32 (ms per call, median)",
        ["B", "grid", "n", "atskern", "TF Gumbel-top-k", "numpy choice", "np.sum floor", "vs TF", "vs choice", "/ floor"],
    )
    tf, gumbel_top_k = _tf_gumbel_top_k()
    rng = np.random.default_rng(0)
    repeats = 3 if quick else 9
    for rows, side, n in cases(quick):
        attention = rng.random((rows, side, side), dtype=np.float32) + np.float32(1e-3)
        flat = attention.reshape(rows, -1)
        probabilities = flat.astype(np.float64) / flat.sum(axis=1, dtype=np.float64, keepdims=True)
        generator = np.random.default_rng(1)
        tf_attention = tf.constant(attention) if tf is not None else None

        indices, probs = atskern.sample(attention, n, seed=3)
        assert indices.shape == (rows, n, 2) and np.all(probs > 0)
        t_ats = median_seconds(lambda: atskern.sample(attention, n, seed=3), repeats=repeats, min_time=0.05)
        t_tf = None
        if tf is not None:
            t_tf = median_seconds(lambda: gumbel_top_k(tf_attention, n).numpy(), repeats=repeats, min_time=0.05)
        choice_repeats = 1 if quick or rows * side * side > 4_000_000 else 3
        t_choice = median_seconds(
            lambda: [generator.choice(flat.shape[1], n, replace=False, p=row) for row in probabilities],
            repeats=choice_repeats,
            warmup=0,
        )
        t_sum = median_seconds(lambda: attention.sum(), repeats=repeats, min_time=0.05)
        table.rows.append(
            [rows, f"{side}x{side}", n, 1e3 * t_ats, skipped(t_tf and 1e3 * t_tf), 1e3 * t_choice, 1e3 * t_sum,
             skipped(t_tf and t_tf / t_ats), t_choice / t_ats, t_ats / t_sum]
        )
        if progress is not None:
            progress.update(1)
    if tf is None:
        table.notes.append(TENSORFLOW_MISSING)
    table.notes.append("goals: >= 3x faster than TF Gumbel-top-k, >= 20x faster than numpy choice, within 4x of np.sum")
    table.notes.append("atskern time includes the validation: each segment's statistics, taken just before its keys "
                       "while it is in cache")
    return [table, fixed_cost_table(quick)]


# --- fixed cost: small maps, every option ------------------------------------------------------

FIXED_COLUMNS = ["B", "grid", "n", "dtype", "replace", "atskern ms", "np.sum floor ms", "/ floor"]


def fixed_cost_cases(quick: bool):
    """``(rows, side, n, dtype, replace)``: the maps attention usually gives (150² to 1024²), B 1 and 32."""
    if quick:
        return [(1, 256, 10, "float32", False), (1, 256, 10, "float32", True)]
    sides = {1: (150, 256, 512, 1024), 32: (150, 256, 512, 1024)}
    return [(rows, side, n, dtype, replace) for rows in (1, 32) for side in sides[rows] for n in (10, 100)
            for dtype in ("float32", "float64") for replace in (False, True)]


def case_attention(rows: int, side: int, dtype: str):
    """The benchmark's map: uniform weights in [1e-3, 1 + 1e-3), the same for every run and version."""
    rng = np.random.default_rng(rows * 100_003 + side)
    return (rng.random((rows, side, side)) + 1e-3).astype(dtype)


def paired_seconds(attention, n: int, replace: bool, sample=None, repeats: int = 50) -> tuple[float, float]:
    """Median seconds of ``sample(attention, n, replace=replace, seed=3)`` (validation on, the default) and of
    ``attention.sum()`` (the read floor), the two calls alternated so that both see the same machine load."""
    import gc
    import statistics
    import time

    sample = atskern.sample if sample is None else sample
    for _ in range(3):
        sample(attention, n, replace=replace, seed=3)
        attention.sum()
    calls, floors = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            sample(attention, n, replace=replace, seed=3)
            middle = time.perf_counter()
            attention.sum()
            calls.append(middle - start)
            floors.append(time.perf_counter() - middle)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(calls), statistics.median(floors)


def _repeats(rows: int, side: int, quick: bool) -> int:
    if quick:
        return 10
    return max(10, min(400, 40_000_000 // (rows * side * side)))


def fixed_cost_table(quick: bool = False) -> Table:
    """Per case: ``atskern.sample`` against the read floor ``np.sum`` of the same map (goal: within 3x
    from 256² up)."""
    table = Table("sampling_fixed_cost",
                  "Sampling on small maps: fixed cost against the read floor (ms per call, median)", FIXED_COLUMNS)
    for rows, side, n, dtype, replace in fixed_cost_cases(quick):
        attention = case_attention(rows, side, dtype)
        call, floor = paired_seconds(attention, n, replace, repeats=_repeats(rows, side, quick))
        table.rows.append([rows, f"{side}x{side}", n, dtype, replace, 1e3 * call, 1e3 * floor, call / floor])
    table.notes.append("goal: within 3x of np.sum from 256² up; the two calls alternate, medians of up to 400 pairs")
    table.notes.append("A/B against another commit, interleaved in one run: python -m bench.sampling ab --base REV")
    return table


# --- A/B against another commit, interleaved -----------------------------------------------------

_WORKER = """
import json, sys
import numpy as np, atskern  # from PYTHONPATH: the side's own checkout
sys.path.insert(0, {bench_root!r})  # the benchmark code: the same on both sides
from bench.sampling import case_attention, paired_seconds
assert atskern.__file__.startswith({atskern_root!r}), atskern.__file__
maps = {{}}
for line in sys.stdin:
    rows, side, n, dtype, replace, repeats = json.loads(line)
    key = (rows, side, dtype)
    if key not in maps:
        maps[key] = case_attention(rows, side, dtype)
    call, floor = paired_seconds(maps[key], n, replace, sample=atskern.sample, repeats=repeats)
    print(json.dumps([call, floor]), flush=True)
"""


def _worker(atskern_root, bench_root):
    """A process that imports ``atskern`` from ``atskern_root`` and times the cases sent to it (bench code
    from ``bench_root``, the same for both sides, so only atskern differs)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(atskern_root))
    code = _WORKER.format(bench_root=str(bench_root), atskern_root=str(atskern_root))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=str(atskern_root))


def ab_table(base: str = "HEAD~1", rounds: int = 9, quick: bool = False, cases=None, root=None) -> str:
    """Markdown table of the fixed-cost cases for commit ``base`` (A) and this working tree (B), each in its
    own process; every round times each case once on both sides, in alternating order, and the table gives
    the medians over the rounds (the noise of a shared machine hits both sides alike)."""
    import json
    import os
    import statistics
    import subprocess
    import tarfile
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    cases = fixed_cost_cases(quick) if cases is None else cases
    revision = subprocess.run(["git", "rev-parse", "--short", base], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    base_root = Path(tempfile.gettempdir()) / f"atskern-ab-{revision}"  # kept: its Numba cache stays warm
    if not (base_root / "atskern").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "base.tar"
            subprocess.run(["git", "archive", "-o", str(archive), revision], cwd=root, check=True)
            with tarfile.open(archive) as tar:
                tar.extractall(Path(tmp) / "tree", filter="data")
            os.replace(Path(tmp) / "tree", base_root)
    workers = {"A": _worker(base_root, root), "B": _worker(root, root)}
    times = {(case, side): [] for case in cases for side in "AB"}
    floors = {case: [] for case in cases}
    try:
        for r in range(rounds):
            for i, case in enumerate(cases):
                rows, size = case[0], case[1]
                request = json.dumps([*case, _repeats(rows, size, quick) // 4 + 5]) + "\n"
                for side in ("AB" if (r + i) % 2 == 0 else "BA"):
                    workers[side].stdin.write(request)
                    workers[side].stdin.flush()
                    call, floor = json.loads(workers[side].stdout.readline())
                    times[case, side].append(call)
                    floors[case].append(floor)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    lines = [f"A = {revision} (base), B = this tree; medians of {rounds} interleaved rounds; load average "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end", "",
             "| B | grid | n | dtype | replace | A ms | B ms | B / A | floor ms | A / floor | B / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        rows, side, n, dtype, replace = case
        a, b = (statistics.median(times[case, s]) for s in "AB")
        floor = statistics.median(floors[case])
        lines.append(f"| {rows} | {side}x{side} | {n} | {dtype} | {replace} | {1e3 * a:.3f} | {1e3 * b:.3f} | "
                     f"{b / a:.2f} | {1e3 * floor:.4f} | {a / floor:.1f} | {b / floor:.1f} |")
    return "\n".join(lines)


# --- first-call latency ------------------------------------------------------------------

_FIRST_CALL = """
import time
clock = time.process_time
start, cpu0 = time.perf_counter(), clock()
import numpy as np, atskern
imported, cpu1 = time.perf_counter(), clock()
a = np.random.default_rng(0).random((1, 64, 64)).astype("{dtype}")
atskern.sample(a, 5, replace={replace}, seed=1)
done, cpu2 = time.perf_counter(), clock()
atskern.sample(a, 5, replace={replace}, seed=2)
again = time.perf_counter()
print(imported - start, cpu1 - cpu0, done - imported, cpu2 - cpu1, again - done)
"""


def first_call_seconds(dtype: str, replace: bool, cache_dir: str, root=None) -> dict:
    """One fresh process with the Numba cache in ``cache_dir``: wall and CPU seconds of
    ``import atskern`` (Numba included) and of the first ``sample`` call, and the second call's
    wall time. CPU seconds are what to compare on a loaded machine (compiling is one thread)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    env = dict(os.environ, XDG_CACHE_HOME=cache_dir, NUMBA_CACHE_DIR=str(Path(cache_dir) / "numba"),
               PYTHONPATH=str(root))
    code = _FIRST_CALL.format(dtype=dtype, replace=replace)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import_s, import_cpu, first_s, first_cpu, second_s = map(float, out.stdout.split())
    return {"import": import_s, "import cpu": import_cpu, "first call": first_s, "first call cpu": first_cpu,
            "second call": second_s}


def first_call_table(root=None) -> str:
    """Markdown table of cold (empty cache) and warm (cache filled by the cold run) first calls."""
    import tempfile

    lines = ["| attention | replace | cache | import atskern: wall / CPU s | first sample: wall / CPU s | second call ms |",
             "|---|---|---|---|---|---|"]
    for dtype in ("float32", "float64"):
        for replace in (False, True):
            with tempfile.TemporaryDirectory() as cache:
                for state in ("cold", "warm"):
                    r = first_call_seconds(dtype, replace, cache, root)
                    lines.append(f"| {dtype} | {replace} | {state} | {r['import']:.2f} / {r['import cpu']:.2f} | "
                                 f"{r['first call']:.2f} / {r['first call cpu']:.2f} | {1e3 * r['second call']:.2f} |")
    return "\n".join(lines)


# --- where one call's time goes ------------------------------------------------------------

def _part_kernels():
    """Numba loops over one row that time the kernel's per-block steps alone, block by block as
    ``atskern.cpu.sampling`` runs them: the statistics, the high words of every position's uniform (one
    Philox4x32-10 block per 4 positions: every position needs one, whatever the bound), and the flags."""
    from atskern.cpu import sampling as cs
    from atskern.cpu._jit import jit

    block = cs.BLOCK

    @jit
    def statistics_pass(row):
        total = 0.0
        for start in range(0, row.size, block):
            t, _, _, squares = cs._block_stats(row[start:start + block])
            total += t + squares
        return total

    @jit
    def high_words_pass(row):
        words = np.empty(block, np.uint32)
        check = 0
        for start in range(0, row.size, block):
            cs._fill_block(start, min(row.size, start + block), 0, np.uint64(1), np.uint64(2), words)
            check += words[0]
        return check

    @jit
    def flags_pass(row, bound):
        words = np.full(block, 7, np.uint32)
        flags = np.zeros(block, np.bool_)
        check = 0
        for start in range(0, row.size, block):
            stop = min(row.size, start + block)
            cs._flag_block(row[start:stop], words[:stop - start], bound, flags)
            check += flags[0]
        return check

    return statistics_pass, high_words_pass, flags_pass


def parts_table(side: int = 256, n: int = 10, repeats: int = 300) -> str:
    """Markdown table: one ``(1, side, side)`` map, without replacement, medians of CPU time per call (the
    process's, so a loaded machine inflates it less than wall time): ``atskern.sample``, the kernel alone
    (``atskern.cpu.sampling.sample``: the front end is the difference), the kernel's per-block steps alone, and
    the read floor ``np.sum``."""
    import statistics
    import time

    from atskern.cpu import sampling as cs

    statistics_pass, high_words_pass, flags_pass = _part_kernels()

    def cpu_us(fn, inner=10):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = time.process_time_ns()
            for _ in range(inner):
                fn()
            times.append((time.process_time_ns() - start) / inner)
        return statistics.median(times) / 1e3

    lines = [f"One {side}x{side} map, n = {n}, without replacement: CPU time per call (us, median of {repeats})", "",
             "| dtype | atskern.sample | kernel | front end | statistics | high words | flags | np.sum | "
             "sample / np.sum | high words / np.sum |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in ("float32", "float64"):
        attention = case_attention(1, side, dtype)
        weights = attention.reshape(1, -1)
        row = weights[0]
        grid = np.array([side, side], np.int64)
        call = cpu_us(lambda: atskern.sample(attention, n, seed=3))
        kernel = cpu_us(lambda: cs.sample(weights, n, grid, 3, False))
        stats = cpu_us(lambda: statistics_pass(row))
        words = cpu_us(lambda: high_words_pass(row))
        flags = cpu_us(lambda: flags_pass(row, 1e-4))
        floor = cpu_us(lambda: attention.sum())
        lines.append(f"| {dtype} | {call:.1f} | {kernel:.1f} | {call - kernel:.1f} | {stats:.1f} | {words:.1f} | "
                     f"{flags:.1f} | {floor:.1f} | {call / floor:.1f} | {words / floor:.1f} |")
    return "\n".join(lines)


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.sampling")
    commands = parser.add_subparsers(dest="command")
    first = commands.add_parser("first-call", help="cold and warm first-call latency (fresh processes)")
    first.add_argument("root", nargs="?", help="the atskern checkout to time (default: this one)")
    ab = commands.add_parser("ab", help="fixed-cost cases, another commit (A) against this tree (B), interleaved")
    ab.add_argument("--base", default="HEAD~1", help="the commit to compare with (default: HEAD~1)")
    ab.add_argument("--rounds", type=int, default=9)
    ab.add_argument("--quick", action="store_true")
    ab.add_argument("--rows", type=int, action="append", help="only these batch sizes (repeatable)")
    ab.add_argument("--side", type=int, action="append", help="only these map sides (repeatable)")
    parts = commands.add_parser("parts", help="where one small map's call goes: front end, kernel, its steps")
    parts.add_argument("--side", type=int, default=256)
    parts.add_argument("-n", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "parts":
        print(parts_table(args.side, args.n))
    elif args.command == "ab":
        cases = [c for c in fixed_cost_cases(args.quick)
                 if (not args.rows or c[0] in args.rows) and (not args.side or c[1] in args.side)]
        print(ab_table(args.base, args.rounds, args.quick, cases))
    else:
        print(first_call_table(getattr(args, "root", None)))


if __name__ == "__main__":
    _main()
