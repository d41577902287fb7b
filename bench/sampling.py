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
    table.notes.append("atskern time includes the validation, fused into the sampling pass (one read of the map)")
    return table


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


if __name__ == "__main__":
    import sys

    print(first_call_table(sys.argv[1] if len(sys.argv) > 1 else None))
