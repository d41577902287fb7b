"""ATS versus dense processing: one training step and one inference pass, time and peak memory per sample.

The feature network is fixed (conv 7x7x32 / 2, three conv 3x3x32 / 2, global
max pool, ReLU; the ATS paper's Megapixel MNIST feature network with
strides). ATS runs an attention network on a 0.12-scale view, samples ``n``
patches of 50x50, runs the feature network on the patches and averages with
the expectation estimator; dense runs the feature network fully
convolutionally over the whole high-resolution image.

Every configuration runs in a fresh subprocess that first loads what all of
them pay for once (TensorFlow's runtime, the compiled kernels), so its peak
resident memory above that baseline belongs to that configuration alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ._timing import Table

NAME = "ats_dense"
ROOT = Path(__file__).resolve().parents[1]
SIZES = (256, 512, 1024, 1500, 2048, 4096)
QUICK_SIZES = (256,)
BATCHES = (1, 8)
PATCHES = (10, 50)
LOW_SCALE = 0.12
PATCH = 50
MEMORY_BUDGET = 12 << 30
"""Dense configurations whose estimated activations exceed this are not run (the machine has 24 GiB)."""


def dense_bytes_estimate(size: int, batch: int) -> int:
    """Rough float32 bytes a dense training step keeps: input, four activations and their gradients."""
    pixels = batch * size * size
    activations = pixels * 32 * 4 * (1 / 4 + 1 / 16 + 1 / 64 + 1 / 256)
    return int(pixels * 4 * 2 + activations * 3)


def unavailable():
    """Why this benchmark cannot run here (it is Keras on TensorFlow throughout), or None."""
    from ._timing import has_module

    if not (has_module("tensorflow") and has_module("keras")):
        return "TensorFlow/Keras is not installed (the ATS-versus-dense CPU benchmark is Keras throughout)"
    return None


def cases(quick: bool):
    sizes = QUICK_SIZES if quick else SIZES
    batches = (1, 2) if quick else BATCHES
    return [(method, size, batch) for size in sizes for batch in batches for method in ("ats", "dense")]


# --- the worker: one configuration in its own process --------------------------------------


class _PeakRSS:
    """Samples this process's resident memory every millisecond; ``peak`` since the last ``reset``."""

    def __init__(self):
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def current(self) -> int:
        return self._process.memory_info().rss

    def reset(self):
        self.peak = self.current()

    def stop(self):
        self._stop = True


def _feature_network(keras):
    return keras.Sequential(
        [
            keras.layers.Conv2D(32, 7, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalMaxPooling2D(),
        ]
    )


def _build(method: str, size: int, n: int):
    import keras

    x_high = keras.Input((size, size, 1), name="x_high")
    if method == "dense":
        features = _feature_network(keras)(x_high)
    else:
        from ats.core import attention_sampling
        from ats.utils.layers import SampleSoftmax

        low = max(8, round(size * LOW_SCALE))
        x_low = keras.layers.Resizing(low, low, interpolation="bilinear")(x_high)
        attention = keras.Sequential(
            [
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(1, 3, padding="same"),
                SampleSoftmax(squeeze_channels=True),
            ]
        )
        features, _, _ = attention_sampling(attention, _feature_network(keras), patch_size=(PATCH, PATCH), n_patches=n)(
            [x_low, x_high]
        )
    outputs = keras.layers.Dense(10)(features)
    return keras.Model(x_high, outputs)


def _measure(method: str, size: int, batch: int, n: int, steps: int, rss: _PeakRSS) -> dict:
    import numpy as np
    import tensorflow as tf

    model = _build(method, size, n)
    optimizer = tf.keras.optimizers.SGD(0.01)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = tf.constant(np.random.default_rng(0).random((batch, size, size, 1), dtype=np.float32))
    y = tf.constant(np.arange(batch) % 10)

    @tf.function(jit_compile=False)
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(jit_compile=False)
    def infer():
        return model(x, training=False)

    result = {}
    for name, fn in (("infer", infer), ("train", train_step)):
        rss.reset()
        base = rss.current()
        fn()  # trace, warm up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = fn()
            _ = out.numpy()
            times.append(time.perf_counter() - start)
        result[f"{name}_s"] = float(np.median(times)) / batch
        result[f"{name}_bytes"] = max(0, rss.peak - base) / batch
    return result


def _warm_up():
    """Load what every configuration pays for once (TF's runtime, Numba's compiled kernels) before the baseline."""
    import numpy as np
    import tensorflow as tf

    import atskern

    tf.reduce_sum(tf.nn.conv2d(tf.ones((1, 8, 8, 1)), tf.ones((3, 3, 1, 1)), 1, "SAME")).numpy()
    indices, probs = atskern.sample(np.ones((1, 4, 4), np.float32), 2, seed=0)
    offsets = atskern.patch_offsets(indices, (4, 4), (16, 16), (4, 4))
    patches = atskern.extract_patches(np.ones((1, 16, 16, 1), np.float32), offsets, (4, 4))
    atskern.scatter_patches(patches, offsets, (16, 16))
    atskern.expectation_grad(np.ones((1, 3)), np.ones((1, 2, 3)), probs.astype(np.float64))


def worker(spec: dict) -> dict:
    """Run one configuration (in this process) and return its figures per sample."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rss = _PeakRSS()
    _warm_up()

    figures = {}
    for n in spec["n"]:
        key = f"ats{n}" if spec["method"] == "ats" else "dense"
        figures[key] = _measure(spec["method"], spec["size"], spec["batch"], n, spec["steps"], rss)
    rss.stop()
    return figures


def _run_worker(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters")]), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-m", "bench.ats_dense", json.dumps(spec)], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, progress=None) -> Table:
    table = Table(
        NAME,
        "ATS versus dense, per sample: time (ms) and peak memory (MiB) of a training step and an inference pass",
        ["image", "B", "method", "train ms", "infer ms", "train MiB", "infer MiB", "dense/ATS time", "dense/ATS memory"],
    )
    steps = 2 if quick else 3
    results = {}
    for method, size, batch in cases(quick):
        if method == "dense" and dense_bytes_estimate(size, batch) > MEMORY_BUDGET:
            results[(method, size, batch)] = {"dense": None}
        elif method == "dense":
            results[(method, size, batch)] = _run_worker({"method": method, "size": size, "batch": batch, "n": [0], "steps": steps})
        else:
            figures = {}
            for n in PATCHES:  # one process each, so no configuration reuses memory another one freed
                figures.update(_run_worker({"method": method, "size": size, "batch": batch, "n": [n], "steps": steps}))
            results[(method, size, batch)] = figures
        if progress is not None:
            progress.update(1)
    for (method, size, batch), figures in results.items():
        if method != "ats":
            continue
        dense = results.get(("dense", size, batch), {}).get("dense")
        for n in PATCHES:
            ats = figures.get(f"ats{n}")
            if ats is None:
                table.rows.append([f"{size}²", batch, f"ATS n={n}", "error", figures.get("error", ""), "", "", "", ""])
                continue
            table.rows.append(
                [f"{size}²", batch, f"ATS n={n}", 1e3 * ats["train_s"], 1e3 * ats["infer_s"], ats["train_bytes"] / 2**20,
                 ats["infer_bytes"] / 2**20,
                 dense["train_s"] / ats["train_s"] if dense else "n/a",
                 dense["train_bytes"] / max(ats["train_bytes"], 1) if dense else "n/a"]
            )
        if dense:
            table.rows.append(
                [f"{size}²", batch, "dense", 1e3 * dense["train_s"], 1e3 * dense["infer_s"], dense["train_bytes"] / 2**20,
                 dense["infer_bytes"] / 2**20, 1.0, 1.0]
            )
        else:
            reason = results.get(("dense", size, batch), {}).get("error") or (
                f"not run: estimated {dense_bytes_estimate(size, batch) / 2**30:.0f} GiB > {MEMORY_BUDGET / 2**30:.0f} GiB budget"
            )
            table.rows.append([f"{size}²", batch, "dense", reason, "", "", "", "", ""])
    table.notes.append("ratios use the training step; memory is peak RSS above the built model and its input, per sample")
    table.notes.append(f"ATS: attention on a {LOW_SCALE}-scale view, {PATCH}x{PATCH} patches; dense: the same feature network on the full image")
    table.raw = {f"{m}/{s}/{b}": v for (m, s, b), v in results.items()}
    return table


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
