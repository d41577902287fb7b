"""Per-call overhead of the TF <-> kernel bridge and of the ats ops (CPU): ``python -m ats._overhead``.

Prints a markdown table of median times (microseconds) over repeated calls,
each op next to the bare atskern call it wraps.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import tensorflow as tf

import atskern

from . import _bridge, _kernels, ops


def median_us(fn, repeat: int = 200, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def rows():
    rng = np.random.default_rng(0)
    image = _kernels.aligned_empty((1, 1500, 1500, 1), np.float32)
    image[...] = rng.uniform(size=image.shape)
    misaligned = np.empty(image.nbytes + 16, np.uint8)[4 : 4 + image.nbytes].view(np.float32).reshape(image.shape)
    misaligned[...] = image
    tensor = tf.constant(image)
    scalar = tf.constant(1.0)

    yield "DLPack NumPy -> TF, aligned 1500x1500 f32 (zero-copy)", median_us(lambda: _bridge.from_numpy(image))
    yield "DLPack NumPy -> TF, misaligned 1500x1500 f32 (aligned copy)", median_us(
        lambda: _bridge.from_numpy(misaligned), repeat=50
    )
    yield "DLPack TF -> NumPy 1500x1500 f32 (read-only view)", median_us(lambda: _bridge.to_numpy(tensor))
    identity_np = tf.function(lambda x: tf.numpy_function(lambda a: a, [x], tf.float32))
    identity_py = tf.function(lambda x: tf.py_function(lambda a: a, [x], tf.float32))
    yield "tf.numpy_function, scalar identity, in tf.function", median_us(lambda: identity_np(scalar))
    yield "tf.py_function, scalar identity, in tf.function", median_us(lambda: identity_py(scalar))
    yield "empty tf.function call (floor)", median_us(lambda: _plus(scalar))
    yield "tf.numpy_function inside a graph, per call (50 chained)", median_us(
        lambda: _chained_numpy(scalar), repeat=50
    ) / 50
    yield "tf.py_function inside a graph, per call (50 chained)", median_us(lambda: _chained_py(scalar), repeat=50) / 50

    logits = rng.normal(size=(1, 150 * 150))
    attention = (np.exp(logits) / np.exp(logits).sum()).reshape(1, 150, 150).astype(np.float32)
    att_tensor = tf.constant(attention)
    sample_op = tf.function(lambda a: ops.sample(a, 10, seed=1))
    yield "atskern.sample 150x150, n=10 (bare kernel)", median_us(lambda: atskern.sample(attention, 10, seed=1))
    yield "ats.ops.sample 150x150, n=10, in tf.function", median_us(lambda: sample_op(att_tensor))
    yield "ats.ops.sample top-k 150x150, n=10, in tf.function", median_us(
        tf.function(lambda: ops.sample(att_tensor, 10, deterministic=True))
    )

    indices, _ = atskern.sample(attention, 10, seed=1)
    offsets = (indices * 10 - 11).astype(np.int32)
    offsets_tensor = tf.constant(offsets)
    extract_op = tf.function(lambda x, o: ops.extract_patches(x, o, (32, 32)))
    yield "extract 10 patches 32x32 from 1500x1500 (bare kernel)", median_us(
        lambda: _kernels.extract_patches(image, offsets, (32, 32))
    )
    yield "ats.ops.extract_patches, same, in tf.function", median_us(lambda: extract_op(tensor, offsets_tensor))

    @tf.function
    def extract_with_grad(x, o):
        with tf.GradientTape() as tape:
            tape.watch(x)
            patches = ops.extract_patches(x, o, (32, 32))
        return tape.gradient(patches, x)

    yield "ats.ops.extract_patches forward + scatter gradient, in tf.function", median_us(
        lambda: extract_with_grad(tensor, offsets_tensor), repeat=50
    )
    features = tf.constant(rng.normal(size=(8, 10, 64)).astype(np.float32))
    probs = tf.constant(np.full((8, 10), 0.01, np.float32))

    @tf.function
    def estimator(f, p):
        with tf.GradientTape() as tape:
            tape.watch([f, p])
            value = ops.expectation(f, p)
        return tape.gradient(value, [f, p])

    yield "ats.ops.expectation forward + gradients (8x10x64), in tf.function", median_us(
        lambda: estimator(features, probs)
    )


@tf.function
def _plus(x):
    return x + 1


@tf.function
def _chained_numpy(x):
    for _ in range(50):
        x = tf.numpy_function(lambda a: a, [x], tf.float32)
    return x


@tf.function
def _chained_py(x):
    for _ in range(50):
        x = tf.py_function(lambda a: a, [x], tf.float32)
    return x


def main():
    print(f"| call | median µs |\n| --- | ---: |")
    for name, value in rows():
        print(f"| {name} | {value:,.0f} |")
    print(
        f"\n{platform.processor() or platform.machine()}, {tf.config.threading.get_inter_op_parallelism_threads()} "
        f"inter-op threads, TensorFlow {tf.__version__}, NumPy {np.__version__}, "
        f"atskern {atskern.__version__}"
    )


if __name__ == "__main__":
    main()
