"""Patch gather and scatter: atskern (CPU) against what a user would otherwise write.

Gathers patches from 8 images of 2048 x 2048 x 3 (fresh random offsets on every
call) with atskern, NumPy fancy indexing, ``tf.gather_nd``,
``tf.image.crop_and_resize`` (nearest, exact boxes) and a per-patch slicing
loop; reports the bytes gathered per second against ``np.copyto`` bandwidth
measured in the same run, and times ``scatter_patches`` against
``tf.tensor_scatter_nd_add`` on the same work. Every method is checked against
atskern's result before it is timed. TensorFlow is imported only here.

    python -m bench.patches [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# With TensorFlow loaded, Numba's OpenMP workers that spin-wait cost ~8 ms per parallel
# call on a machine whose cores are busy; passive waiting removes that (must precede OpenMP start-up).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

import atskern

from ._timing import TENSORFLOW_MISSING, Table, memcpy_bandwidth, tensorflow_or_none

BATCH = 8
SIDE = 2048
CHANNELS = 3
CASES = [  # (dtype, patch side, patches per image)
    (np.float32, 32, 64),
    (np.float32, 32, 512),
    (np.uint8, 128, 64),
    (np.uint8, 128, 512),
]


def _median_seconds(fn, make_args, repeats):
    fn(*make_args())  # warm-up (compilation, TF tracing)
    times = []
    for _ in range(repeats):
        args = make_args()
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _numpy_fancy(x, offsets, patch):
    steps = np.arange(patch)
    rows = offsets[:, :, 0, None, None] + steps[:, None]
    cols = offsets[:, :, 1, None, None] + steps[None, :]
    batch = np.arange(x.shape[0])[:, None, None, None]
    return x[batch, rows, cols]


def _python_loop(x, offsets, patch):
    out = np.empty((x.shape[0], offsets.shape[1], patch, patch, x.shape[-1]), x.dtype)
    for b in range(x.shape[0]):
        for k, (r, c) in enumerate(offsets[b].tolist()):
            out[b, k] = x[b, r : r + patch, c : c + patch]
    return out


def _tf_methods(tf):
    def pixel_indices(offsets, patch):
        steps = tf.range(patch, dtype=tf.int32)
        batch, count = offsets.shape[0], offsets.shape[1]
        rows = offsets[:, :, 0, None, None] + steps[:, None]
        cols = offsets[:, :, 1, None, None] + steps[None, :]
        b = tf.broadcast_to(tf.range(batch, dtype=tf.int32)[:, None, None, None], (batch, count, patch, patch))
        rows = tf.broadcast_to(rows, (batch, count, patch, patch))
        cols = tf.broadcast_to(cols, (batch, count, patch, patch))
        return tf.stack([b, rows, cols], axis=-1)

    def gather_nd(x, offsets, patch):
        return tf.gather_nd(x, pixel_indices(tf.constant(offsets), patch)).numpy()

    def crop_and_resize(x, offsets, patch):
        batch, count = offsets.shape[:2]
        start = offsets.reshape(-1, 2).astype(np.float64)
        boxes = np.concatenate([start, start + patch - 1], axis=1)[:, [0, 1, 2, 3]] / (SIDE - 1)
        box_index = np.repeat(np.arange(batch, dtype=np.int32), count)
        crops = tf.image.crop_and_resize(x, boxes.astype(np.float32), box_index, (patch, patch), method="nearest")
        return crops.numpy().reshape(batch, count, patch, patch, -1)

    def scatter_nd_add(grad, offsets, patch):
        zeros = tf.zeros((grad.shape[0], SIDE, SIDE, grad.shape[-1]), grad.dtype)
        return tf.tensor_scatter_nd_add(zeros, pixel_indices(tf.constant(offsets), patch), grad).numpy()

    return gather_nd, crop_and_resize, scatter_nd_add


def _check(name, got, expected, exact=True):
    ok = np.array_equal(got, expected) if exact else np.allclose(got, expected, rtol=1e-5, atol=1e-4)
    if not ok:
        raise AssertionError(f"{name} disagrees with atskern")


NAME = "patches"


def cases(quick: bool):
    return CASES[::2] if quick else CASES


def run(quick: bool = False, progress=None):
    """The gather/scatter table for ``python -m bench``."""

    table = Table(NAME, f"Patch gather and scatter, {BATCH} images of {SIDE}x{SIDE}x{CHANNELS} (median ms per call)",
                  ["op", "case", "method", "ms", "atskern faster by", "GB/s", "% of memcpy"])
    for r in rows(quick, progress):
        table.rows.append([r["op"], r["case"], r["method"], r["ms"], r["atskern_speedup"], r["gb_per_s"], r["pct_memcpy"]])
    if tensorflow_or_none() is None:
        table.notes.append(TENSORFLOW_MISSING)
    table.notes.append("goals: >= 5x faster than tf.gather_nd and crop_and_resize, >= 10x faster than fancy indexing, "
                       ">= 60% of memcpy bandwidth; scatter >= 5x faster than tf.tensor_scatter_nd_add")
    return table


def rows(quick: bool, progress=None) -> list[dict]:
    """Rows of the gather/scatter table (one per case and method); medians over repeated calls."""
    tf = tensorflow_or_none()  # None: the TF methods are left out
    repeats = 3 if quick else 11
    rng = np.random.default_rng(0)
    memcpy = memcpy_bandwidth(repeats=repeats)
    gather_nd, crop_and_resize, scatter_nd_add = _tf_methods(tf) if tf is not None else (None, None, None)
    results = []
    images = {}
    for dtype, patch, count in cases(quick):
        if dtype not in images:
            images[dtype] = rng.integers(0, 256, (BATCH, SIDE, SIDE, CHANNELS)).astype(dtype)
            images[(dtype, "tf")] = tf.constant(images[dtype]) if tf is not None else None
        x, x_tf = images[dtype], images[(dtype, "tf")]
        label = f"{np.dtype(dtype).name} {patch}x{patch}x{CHANNELS}, {count} per image"

        def fresh():
            return (rng.integers(0, SIDE - patch + 1, (BATCH, count, 2)).astype(np.int32),)

        probe = fresh()[0]
        expected = atskern.extract_patches(x, probe, patch)
        methods = {
            "atskern (CPU)": lambda o: atskern.extract_patches(x, o, patch),
            "NumPy fancy indexing": lambda o: _numpy_fancy(x, o, patch),
            "tf.gather_nd": lambda o: gather_nd(x_tf, o, patch),
            "tf.image.crop_and_resize": lambda o: crop_and_resize(x_tf, o, patch),
            "Python slicing loop": lambda o: _python_loop(x, o, patch),
        }
        if tf is None:
            methods = {name: fn for name, fn in methods.items() if not name.startswith("tf.")}
        timed = {}
        for name, fn in methods.items():
            _check(name, fn(probe).astype(dtype), expected)
            timed[name] = _median_seconds(fn, fresh, repeats)
        for name, seconds in timed.items():
            rate = expected.nbytes / seconds
            results.append(dict(op="gather", case=label, method=name, ms=seconds * 1e3,
                             atskern_speedup=seconds / timed["atskern (CPU)"], gb_per_s=rate / 1e9,
                             pct_memcpy=100 * rate / memcpy))
        if progress is not None:
            progress.update(1)
        if dtype == np.float32 or patch == 128:
            grad = rng.standard_normal(expected.shape).astype(np.float32)
            expected_back = atskern.scatter_patches(grad, probe, (SIDE, SIDE))
            scatter = {
                "atskern (CPU)": lambda o: atskern.scatter_patches(grad, o, (SIDE, SIDE)),
                "tf.tensor_scatter_nd_add": lambda o: scatter_nd_add(grad, o, patch),
            }
            if tf is None:
                del scatter["tf.tensor_scatter_nd_add"]
            timed = {}
            for name, fn in scatter.items():
                _check(name, fn(probe), expected_back, exact=False)
                timed[name] = _median_seconds(fn, fresh, repeats)
            for name, seconds in timed.items():
                results.append(dict(op="scatter", case=f"float32 {patch}x{patch}x{CHANNELS}, {count} per image",
                                 method=name, ms=seconds * 1e3, atskern_speedup=seconds / timed["atskern (CPU)"],
                                 gb_per_s=grad.nbytes / seconds / 1e9, pct_memcpy=100 * grad.nbytes / seconds / memcpy))
    results.append(dict(op="memcpy", case="np.copyto 256 MiB", method="numpy", ms=256 * 2**20 / memcpy * 1e3,
                     atskern_speedup=float("nan"), gb_per_s=memcpy / 1e9, pct_memcpy=100.0))
    return results


def markdown(rows: list[dict]) -> str:
    lines = [
        "| op | case | method | median ms | atskern faster by | GB/s | % of memcpy |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = "" if r["atskern_speedup"] != r["atskern_speedup"] else f"{r['atskern_speedup']:.1f}x"
        lines.append(f"| {r['op']} | {r['case']} | {r['method']} | {r['ms']:.2f} | {speed} | "
                     f"{r['gb_per_s']:.2f} | {r['pct_memcpy']:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 11")
    args = parser.parse_args()
    import numba

    print(markdown(rows(args.quick)))
    print(f"\n{BATCH} images of {SIDE}x{SIDE}x{CHANNELS}; NumPy {np.__version__}, Numba {numba.__version__} "
          f"({numba.get_num_threads()} threads); bytes = patch bytes written per call.")
